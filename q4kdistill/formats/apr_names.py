"""Tensor names in APR files: llama.cpp's GGUF names (ours) and the Hugging Face names `apr import` writes.

aprender maps names on import with ``Architecture::map_name``
(paiml/aprender crates/aprender-core/src/format/tensor_expectation.rs):

  GGUF general.architecture  aprender Architecture  map_name on GGUF names
  qwen2, qwen, qwen2.5        Qwen2                 qwen2_map_name: HF names (table below)
  qwen3                       Qwen3                 qwen2_map_name
  llama, llama2, llama3       Llama                 passthrough (GGUF names stay)
  gemma, gemma2, gemma3       Gemma                 passthrough (GGUF names stay)

A SafeTensors import keeps the checkpoint's own (Hugging Face) names for every architecture.
``qwen2_map_name`` maps ``blk.N.<suffix>`` to ``model.layers.N.<HF suffix>`` (a suffix it does
not know is kept: ``model.layers.N.<suffix>``) and three global names; ``HF_LAYER`` and
``HF_GLOBAL`` below are that table, and ``to_hf`` is that function. Reading inverts it.

Whatever the naming, ``resolve_tied_embeddings`` (converter/write.rs) adds ``lm_head.weight``, a
copy of the token embedding, to a model without an output matrix; the reader drops that copy
again (``apr.py``), so a tied model stays tied.

Hugging Face names mean Hugging Face weight conventions where they differ from llama.cpp's:
llama's q/k rows are not permuted for adjacent-pair rope (so the exact model runs "neox" rope on
them), and gemma's norm weights are stored as w for a scale of (1 + w), which llama.cpp's
converter folds into the GGUF. We read HF-named llama and qwen2/qwen3 files; an HF-named gemma3
file is refused (we cannot tell whether its norms were folded).
"""
from __future__ import annotations

import re

from ..errors import FileFormatError

# qwen2_map_name's layer table: GGUF suffix -> HF suffix (tensor_expectation.rs, PMAT-205 / GH-279)
HF_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# qwen2_map_name's global names (PMAT-222)
HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
LM_HEAD = "lm_head.weight"       # the output matrix under any naming (write.rs resolve_tied_embeddings)

# architecture (GGUF family) -> naming `apr import` gives a GGUF of it ("hf" or "gguf")
IMPORT_NAMING = {"qwen2": "hf", "qwen": "hf", "qwen2.5": "hf", "qwen3": "hf",
                 "llama": "gguf", "llama2": "gguf", "llama3": "gguf",
                 "gemma": "gguf", "gemma2": "gguf", "gemma3": "gguf"}
# architectures whose HF-named files we read (see the module doc for gemma3)
HF_READABLE = ("llama", "qwen2", "qwen3")

_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FROM_HF_LAYER = {hf: gguf for gguf, hf in HF_LAYER.items()}
_FROM_HF_GLOBAL = {hf: gguf for gguf, hf in HF_GLOBAL.items()}


def to_hf(name: str) -> str:
    """aprender's qwen2_map_name: a GGUF tensor name as `apr import` of a qwen2 GGUF writes it."""
    m = _GGUF_LAYER.fullmatch(name)
    if m:
        return f"model.layers.{m[1]}.{HF_LAYER.get(m[2], m[2])}"
    return HF_GLOBAL.get(name, name)


def from_hf(name: str) -> str:
    """The inverse of ``to_hf`` (GGUF names pass through unchanged)."""
    m = _HF_LAYER.fullmatch(name)
    if m:
        return f"blk.{m[1]}.{_FROM_HF_LAYER.get(m[2], m[2])}"
    return _FROM_HF_GLOBAL.get(name, name)


def is_hf(name: str) -> bool:
    """True for a Hugging Face name (``model.*``); ``lm_head.weight`` appears under both namings."""
    return name.startswith("model.")


def naming_for_write(arch: str) -> str:
    """"hf" or "gguf": the naming `apr import` would give a GGUF of ``arch``."""
    return IMPORT_NAMING.get(arch, "gguf")


def names_for_write(arch: str, names) -> dict:
    """GGUF name -> name in the APR we write for ``arch`` (as `apr import` names it)."""
    hf = naming_for_write(arch) == "hf"
    return {n: (to_hf(n) if hf else n) for n in names}


def canonical_names(path, arch: str, names) -> tuple[dict, bool]:
    """({stored name: GGUF name}, whether the file used HF names); FileFormatError for HF names
    of an architecture we cannot run exactly, or two stored names for one tensor."""
    stored = list(names)
    hf = any(is_hf(n) for n in stored)
    if hf and arch not in HF_READABLE:
        raise FileFormatError(path, f"{arch or 'architecture-less'} APR files with Hugging Face tensor names "
                                    f"(from a SafeTensors import) are not supported; import the model from its GGUF")
    out, owner = {}, {}                          # stored -> GGUF name; GGUF name -> stored
    for name in stored:
        gguf_name = "output.weight" if name == LM_HEAD else (from_hf(name) if hf else name)
        if gguf_name in owner:
            raise FileFormatError(path, f"tensors {owner[gguf_name]!r} and {name!r} are both {gguf_name!r}")
        out[name], owner[gguf_name] = gguf_name, name
    return out, hf
