"""APR files as aprender's `apr import` writes them load with logits identical to their source GGUF
(or are refused with one line), and what we write passes aprender's and realizar's reader rules.

``aprender_import`` below builds the fixture from a GGUF with gguf-py, following the Rust code of
paiml/aprender (read 2026-12-03), not q4kdistill.formats.apr:
  crates/aprender-core/src/format/converter/import.rs        apr_import_gguf_raw, try_gguf_raw_import
  crates/aprender-core/src/format/tensor_expectation.rs      Architecture::map_name (qwen2_map_name)
  crates/aprender-core/src/format/layout_contract*.rs         enforce_import_contract (2-D shapes reversed)
  crates/aprender-core/src/format/converter/write_model_config.rs  write_apr_file_raw, map_gguf_dtype
  crates/aprender-core/src/format/converter/write.rs           write_apr_file (F32 fallback), tokenizer keys
  crates/apr-format/src/v2/writer.rs, tensor_index_impl.rs    AprV2Writer::write, TensorIndexEntry::to_bytes
``aprender_read`` is aprender's AprV2Reader::from_bytes plus realizar's TensorEntry::from_binary and
AprMetadata (serde aliases), used to check our writer.
"""
import json
import struct
import zlib

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q4kdistill.formats import apr

from q4kdistill.formats import synthetic
from q4kdistill.errors import FileFormatError, Q4KError
from q4kdistill.formats.model_file import ModelFile
from q4kdistill.teacher import Teacher

T = gguf.GGMLQuantizationType

# -- aprender's `apr import`, written from its Rust code ---------------------------------

QWEN2_LAYER = {   # qwen2_map_name (tensor_expectation.rs)
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_norm.weight": "input_layernorm.weight", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
QWEN2_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                "output_norm.weight": "model.norm.weight"}
HF_CLASS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}
RAW_DTYPES = {0: 0, 1: 1, 12: 12, 14: 14}          # map_gguf_dtype: the GGUF types imported raw
REALIZAR_ALIASES = [                               # realizar src/apr/metadata.rs AprMetadata serde aliases
    ("hidden_size", "hidden_dim", "d_model", "n_embd"), ("num_layers", "n_layers", "num_hidden_layers", "n_layer"),
    ("num_heads", "n_heads", "num_attention_heads", "n_head"), ("num_kv_heads", "n_kv_heads", "num_key_value_heads"),
    ("vocab_size", "n_vocab"), ("intermediate_size", "ffn_dim", "intermediate_dim", "n_inner"),
    ("max_position_embeddings", "max_seq_len", "context_length", "n_ctx"),
    ("rms_norm_eps", "layer_norm_eps", "norm_eps"),
]
APRENDER_CODES = {0, 1, 30, 3, 4, 5, 6, 7, 8, 128, 9, 129, 12, 14}    # TensorDType::from_u8


def map_name(arch, name):
    """Architecture::map_name for the GGUF families: qwen2/qwen3 -> HF names, others passthrough."""
    if arch not in ("qwen2", "qwen3"):
        return name
    if name.startswith("blk."):
        layer, suffix = name[4:].split(".", 1)
        return f"model.layers.{layer}.{QWEN2_LAYER.get(suffix, suffix)}"
    return QWEN2_GLOBAL.get(name, name)


def f32_json(x):
    """A Rust f32 through serde_json: the shortest decimal that rounds to it."""
    return float(str(np.float32(x)))


def apr_q4_from_q4_0(block_bytes):
    """Q4_0 blocks [n, 18] -> APR_Q4 blocks (writer.rs add_q4_tensor layout) of the same numbers:
    Q4_0 keeps weight j in the low nibble of byte j and j + 16 in the high one; APR_Q4 keeps weights
    2i and 2i + 1 in the low and high nibble of byte i."""
    out = bytearray()
    for b in block_bytes:
        qs = b[2:]
        nib = [qs[j] & 15 for j in range(16)] + [qs[j] >> 4 for j in range(16)]
        out += bytes(b[:2]) + bytes(nib[2 * i] | (nib[2 * i + 1] << 4) for i in range(16))
    return bytes(out)


def aprender_import(src, out, *, footer=True, head_dim=True, magic=b"APR\0", as_apr_q4=(), edit=None,
                    hf_llama=False):
    """Write ``out`` from the GGUF ``src`` the way `apr import src -o out` does.

    Raw path when every tensor is F32/F16/Q4_K/Q6_K, else the dequantize-to-F32 fallback
    (import.rs try_gguf_raw_import). ``as_apr_q4``: GGUF names of Q4_0 tensors to store as
    APR_Q4 (what `--quantize int4` writes; the numbers are the Q4_0 ones). ``edit``: metadata
    entries to overwrite (tests of damaged files). ``hf_llama``: a llama as a SafeTensors import
    gives it: Hugging Face names, q/k rows as HF keeps them (llama.cpp's convert permutes them)."""
    r = gguf.GGUFReader(src)
    kv = {f.name: f.contents() for f in r.fields.values()}
    arch = kv["general.architecture"]
    raw_path = all(int(t.tensor_type) in RAW_DTYPES for t in r.tensors)
    tensors = {}                                   # mapped name -> (dtype code, shape, bytes)
    heads = {"attn_q": kv[f"{arch}.attention.head_count"],
             "attn_k": kv.get(f"{arch}.attention.head_count_kv", kv[f"{arch}.attention.head_count"])}
    for t in r.tensors:
        shape = [int(d) for d in t.shape]          # GGUF order
        rows = np.asarray(t.data)
        role = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if hf_llama and role in heads:             # undo convert_hf_to_gguf.py LlamaModel.permute
            n = heads[role]
            rows = rows.reshape(n, rows.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)
        shape = shape[::-1] if len(shape) == 2 else shape     # enforce_import_contract
        if t.name in as_apr_q4:
            code, data = 128, apr_q4_from_q4_0(np.asarray(t.data).reshape(-1, 18))
        elif raw_path:
            code, data = RAW_DTYPES[int(t.tensor_type)], np.ascontiguousarray(rows).tobytes()
        else:
            code, data = 0, gguf.quants.dequantize(rows, t.tensor_type).astype(np.float32).tobytes()
        tensors[map_name("qwen2" if hf_llama else arch, t.name)] = (code, shape, data)
    tied = not any(n in tensors for n in ("lm_head.weight", "output.weight"))
    if tied:                                       # resolve_tied_embeddings
        embed = next(n for n in tensors if "embed_tokens.weight" in n or n == "token_embd.weight")
        tensors["lm_head.weight"] = tensors[embed]
    cfg = {"hidden_size": kv[f"{arch}.embedding_length"], "num_layers": kv[f"{arch}.block_count"],
           "num_heads": kv[f"{arch}.attention.head_count"], "num_kv_heads": kv.get(f"{arch}.attention.head_count_kv"),
           "vocab_size": len(kv["tokenizer.ggml.tokens"]), "intermediate_size": kv[f"{arch}.feed_forward_length"],
           "max_position_embeddings": kv.get(f"{arch}.context_length"),
           "rope_theta": f32_json(kv[f"{arch}.rope.freq_base"]),
           "rope_type": 2 if arch in ("qwen2", "qwen2.5", "qwen") else 0,          # gguf api.rs PMAT-114
           "rms_norm_eps": f32_json(kv[f"{arch}.attention.layer_norm_rms_epsilon"])}
    if head_dim:
        cfg["head_dim"] = kv.get(f"{arch}.attention.key_length",
                                 cfg["hidden_size"] // cfg["num_heads"])
    vocab = kv["tokenizer.ggml.tokens"]
    tok = {"tokenizer.vocabulary": vocab, "tokenizer.vocab_size": len(vocab)}
    model_key = "tokenizer.model" if raw_path else "tokenizer.model_type"
    tok[model_key] = kv["tokenizer.ggml.model"]
    for key, gkey in (("tokenizer.bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("tokenizer.eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("tokenizer.pre_type", "tokenizer.ggml.pre"), ("tokenizer.merges", "tokenizer.ggml.merges"),
                      ("tokenizer.scores", "tokenizer.ggml.scores")):
        if kv.get(gkey) not in (None, []):
            tok[key] = kv[gkey]
    if raw_path:
        for key, gkey in (("tokenizer.token_type", "tokenizer.ggml.token_type"),
                          ("tokenizer.padding_token_id", "tokenizer.ggml.padding_token_id"),
                          ("tokenizer.add_bos_token", "tokenizer.ggml.add_bos_token")):
            if kv.get(gkey) is not None:
                tok[key] = kv[gkey]
    shapes = {n: s for n, (_, s, _) in tensors.items()}
    custom = {"tensor_shapes": shapes, **tok}
    if raw_path:
        custom.update({f"model.{k}": v for k, v in [("architecture", arch), *cfg.items()] if k != "head_dim"})
    if tied:
        custom["tied_embeddings"] = True
    typed = {k: v for k, v in cfg.items() if v is not None}
    if raw_path:                                   # write_apr_file_raw
        meta = {"model_type": arch, "name": arch, "description": "GGUF Q4_K model imported with native quantization",
                "license": None, "data_source": None, "data_license": None, "version": "1.0.0",
                "original_format": "gguf", "total_size": 0,
                "param_count": sum(int(np.prod(s)) for s in shapes.values()),
                "architecture": arch, "hf_architecture": HF_CLASS[arch], "hf_model_type": arch, **typed, **custom}
    else:                                          # write_apr_file: model_type is the CLI's {:?} arch
        meta = {"model_type": "Auto", "name": "model", "license": None, "data_source": None, "data_license": None,
                "total_size": 0, "param_count": sum(int(np.prod(s)) for s in shapes.values()),
                "architecture": arch, **typed, **custom}
    meta.update(edit or {})
    _v2_write(out, meta, tensors, footer, magic)
    return out


def _v2_write(out, meta, tensors, footer, magic):
    """AprV2Writer::write: sort by name, JSON, index, 64-aligned data, footer CRC."""
    pad = lambda n: -(-n // 64) * 64                                          # noqa: E731
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    names = sorted(tensors, key=str.encode)
    index, data, off = b"", b"", 0
    for n in names:
        code, shape, blob = tensors[n]
        index += (struct.pack("<H", len(n.encode())) + n.encode() + bytes([code, len(shape)])
                  + struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<QQ", off, len(blob)))
        data += blob + bytes(pad(len(blob)) - len(blob))
        off += pad(len(blob))
    index_off = 64 + pad(len(meta_bytes))
    data_off = index_off + pad(len(index))
    head = struct.pack("<4sBBHIQIQQ", magic, 2, 0, 0x0400, len(names), 64, len(meta_bytes), index_off, data_off)
    head += struct.pack("<I", zlib.crc32(head + bytes(20))) + bytes(20)
    body = (head + meta_bytes + bytes(index_off - 64 - len(meta_bytes)) + index
            + bytes(data_off - index_off - len(index)) + data)
    with open(out, "wb") as f:
        f.write(body + (struct.pack("<I", zlib.crc32(body)) if footer else b""))


def aprender_read(path):
    """AprV2Reader::from_bytes + realizar's reader rules: (metadata, [(name, code, shape, offset, size)])."""
    raw = open(path, "rb").read()
    magic, major, _, flags, n, meta_off, meta_size, index_off, data_off, crc = struct.unpack_from("<4sBBHIQIQQI", raw)
    assert magic == b"APR\0" and major == 2                          # aprender takes no other magic
    assert crc == zlib.crc32(raw[:40] + raw[44:64])                   # verify_checksum
    assert flags & 0x0400 and not flags & 0x0800                      # LAYOUT-002
    meta = json.loads(raw[meta_off:meta_off + meta_size])
    pos, entries = index_off, []
    for _ in range(n):                                                # TensorIndexEntry::from_bytes
        (name_len,) = struct.unpack_from("<H", raw, pos)
        name = raw[pos + 2:pos + 2 + name_len].decode()
        code, ndim = raw[pos + 2 + name_len], raw[pos + 3 + name_len]
        assert code in APRENDER_CODES, (name, code)                   # TensorDType::from_u8
        assert code not in (8, 9), (name, code)                       # realizar: its own q4/q8
        shape = struct.unpack_from(f"<{ndim}Q", raw, pos + 4 + name_len)
        offset, size = struct.unpack_from("<QQ", raw, pos + 4 + name_len + 8 * ndim)
        pos += 4 + name_len + 8 * ndim + 16
        entries.append((name, code, shape, offset, size))
    assert [e[0] for e in entries] == sorted((e[0] for e in entries), key=str.encode)   # "tensor index not sorted"
    assert all((data_off + e[3]) % 64 == 0 for e in entries)          # verify_alignment
    assert max(data_off + e[3] + e[4] for e in entries) <= len(raw)   # required_file_len (issue #2612)
    assert int.from_bytes(raw[-4:], "little") == zlib.crc32(raw[:-4])  # footer as AprV2Writer writes it
    for group in REALIZAR_ALIASES:                                    # two spellings: serde "duplicate field"
        assert sum(k in meta for k in group) <= 1, group
    return meta, entries


# -- fixtures ----------------------------------------------------------------------------

RAW_QTYPES = {"*": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K", "token_embd": "Q6_K"}
CONFIGS = {
    "llama": dict(),
    "qwen2": dict(),
    "gemma3": dict(n_layers=18, sliding_window=512, d_ff=256),     # gemma-3-270m's depth and window
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("aprender")
    return {arch: synthetic.write_gguf(d / f"{arch}.gguf", synthetic.tiny_config(arch, **over), RAW_QTYPES, seed=5)
            for arch, over in CONFIGS.items()}


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 384, size=(2, 11))


def _logits(path, ids):
    return Teacher.load(str(path), device="cpu", log=None).logits_for_batch(ids)


# -- `apr import` output as a teacher ------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("footer", [True, False], ids=["footer", "no-footer"])
def test_apr_import_output_gives_the_source_logits(sources, ids, tmp_path, arch, footer, capfd):
    out = aprender_import(sources[arch], tmp_path / f"{arch}.apr", footer=footer)
    g, a = ModelFile.open(sources[arch]), ModelFile.open(out)
    assert a.config == g.config == ModelFile.open(out, header_only=True).config
    assert sorted(a.tensors) == sorted(g.tensors)            # HF names mapped back, lm_head copy dropped
    assert a.metadata["tokenizer.ggml.tokens"] == g.metadata["tokenizer.ggml.tokens"]
    np.testing.assert_array_equal(_logits(out, ids), _logits(sources[arch], ids))
    err = capfd.readouterr().err
    assert ("sliding window" in err) == (arch == "gemma3")   # the window default is said on stderr


def test_names_in_the_fixture_are_aprenders(sources, tmp_path):
    meta, entries = aprender_read(aprender_import(sources["qwen2"], tmp_path / "q.apr"))
    names = {e[0] for e in entries}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_proj.bias", "model.layers.0.post_attention_layernorm.weight"} <= names
    assert not any(n.startswith("blk.") for n in names)
    _, entries = aprender_read(aprender_import(sources["gemma3"], tmp_path / "g.apr"))
    assert {"token_embd.weight", "lm_head.weight", "blk.17.post_ffw_norm.weight"} <= {e[0] for e in entries}


def test_hf_named_llama_runs_the_hf_model(sources, tmp_path, ids, capfd):
    """HF llama q/k rows are unpermuted; rotate-half rope on them is llama.cpp's adjacent-pair rope on
    the permuted rows, so the logits match the GGUF's up to summation order."""
    out = aprender_import(sources["llama"], tmp_path / "hf.apr", hf_llama=True)
    a, g = ModelFile.open(out), ModelFile.open(sources["llama"])
    assert a.config == g.config.replace(rope_style="neox") and sorted(a.tensors) == sorted(g.tensors)
    assert not np.array_equal(a.tensor_data("blk.0.attn_q.weight"), g.tensor_data("blk.0.attn_q.weight"))
    # 2.6e-6 apart; 2.5 apart if the HF rows ran with llama's "norm" rope
    np.testing.assert_allclose(_logits(out, ids), _logits(sources["llama"], ids), rtol=1e-5, atol=1e-5)
    assert "neox rope" in capfd.readouterr().err


def test_name_table_is_qwen2_map_name_and_inverts():
    from q4kdistill.formats import apr_names
    cfg = synthetic.tiny_config("qwen2").replace(qk_norm=True, post_norms=True, tied_output=False)
    for name in cfg.tensor_shapes():
        assert apr_names.to_hf(name) == map_name("qwen2", name)
        assert apr_names.from_hf(apr_names.to_hf(name)) == name
    assert apr_names.to_hf("blk.3.post_ffw_norm.weight") == "model.layers.3.post_ffw_norm.weight"   # kept suffix
    with pytest.raises(FileFormatError, match="are both 'blk.0.attn_q.weight'"):
        apr_names.canonical_names("x", "qwen2", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.attn_q.weight"])


def test_cli_inspects_and_converts_apr_import_output(sources, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "q4kdistill", *map(str, args)], capture_output=True, text=True,
                              timeout=300)
    out = aprender_import(sources["gemma3"], tmp_path / "g.apr")
    r = cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    got, want = json.loads(r.stdout), json.loads(cli("inspect", sources["gemma3"], "--json").stdout)
    assert got["config"] == want["config"] and got["tensor_count"] == want["tensor_count"]
    assert "sliding window" in r.stderr
    mixed = synthetic.write_gguf(tmp_path / "m.gguf", synthetic.tiny_config("qwen2"), {"token_embd": "Q8_0"}, seed=1)
    r = cli("convert", mixed, tmp_path / "m.apr")
    assert r.returncode == 0 and "convert: 1 Q8_0 tensor(s) written as F32" in r.stderr, r.stderr
    bad = aprender_import(synthetic.write_gguf(tmp_path / "g2.gguf", synthetic.tiny_config("gemma3"), {"*": "F32"}),
                          tmp_path / "g2.apr")
    r = cli("inspect", bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sliding window" in r.stderr, r.stderr


def test_head_dim_comes_from_the_shapes_when_metadata_lacks_it(tmp_path, ids):
    cfg = synthetic.tiny_config("gemma3", n_layers=18, sliding_window=512, d_ff=256, head_dim=32)   # 4 x 32 != 256
    src = synthetic.write_gguf(tmp_path / "hd.gguf", cfg, {"*": "F32"}, seed=1)
    out = aprender_import(src, tmp_path / "hd.apr", head_dim=False)
    assert ModelFile.open(out).config == cfg
    np.testing.assert_array_equal(_logits(out, ids), _logits(src, ids))


def test_dequantized_fallback_path_and_legacy_magic(tmp_path, ids):
    """A GGUF with Q8_0/Q5_0 makes `apr import` dequantize everything to F32 (GH-375)."""
    cfg = synthetic.tiny_config("llama")
    src = synthetic.write_gguf(tmp_path / "q8.gguf", cfg, {"token_embd": "Q8_0", "attn_k": "Q5_0"}, seed=2)
    out = aprender_import(src, tmp_path / "q8.apr", magic=b"APR2")
    a = ModelFile.open(out)
    assert a.config == cfg and set(a.dtype_histogram()) == {"F32"}
    np.testing.assert_array_equal(_logits(out, ids), _logits(src, ids))


def test_apr_q4_tensors_are_read_as_their_float32_values(tmp_path):
    """`--quantize int4` output: APR_Q4 blocks hold Q4_0's numbers; we decode them to float32."""
    cfg = synthetic.tiny_config("qwen2")
    src = synthetic.write_gguf(tmp_path / "q40.gguf", cfg, {"*": "F32", "attn_q": "Q4_0", "ffn_up": "Q4_0"}, seed=4)
    q4 = [f"blk.{i}.{r}.weight" for i in range(cfg.n_layers) for r in ("attn_q", "ffn_up")]
    out = aprender_import(src, tmp_path / "q40.apr", as_apr_q4=q4)
    g, a = ModelFile.open(src), ModelFile.open(out)
    assert a.config == g.config.replace(pad_token_id=None)     # the F32 path writes no padding token id
    for name in q4:
        assert a.tensors[name].qtype == T.F32
        want = gguf.quants.dequantize(g.tensor_data(name), T.Q4_0)
        np.testing.assert_array_equal(a.tensor_data(name), want)


def test_apr_q8_and_odd_apr_q4_decode_to_float32(tmp_path):
    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, size=(3, 40)).astype(np.int8)
    scale = np.float32(0.0123)
    q8 = np.float32(scale).tobytes() + q.tobytes()                           # writer.rs add_q8_tensor layout
    nib = rng.integers(0, 16, size=120)                                       # 3 x 40 weights: 4 blocks, last partial
    nib = np.concatenate([nib, np.full(8, 8)])
    scales = rng.uniform(0.01, 0.1, size=4).astype(np.float16)
    q4 = b"".join(scales[b].tobytes() + bytes(int(nib[32 * b + 2 * i]) | int(nib[32 * b + 2 * i + 1]) << 4
                                              for i in range(16)) for b in range(4))
    tensors = {"a.weight": (129, [3, 40], q8), "b.weight": (9, [3, 40], q8), "c.weight": (128, [3, 40], q4)}
    path = tmp_path / "q8.apr"
    _v2_write(path, {"model_type": "x"}, tensors, True, b"APR\0")
    a = ModelFile.open(path)
    want8 = q.astype(np.float32) * scale
    for name in ("a.weight", "b.weight"):                                    # 129 and the legacy 9
        assert a.tensors[name].qtype == T.F32
        np.testing.assert_array_equal(a.tensor_data(name), want8)
    want4 = ((nib[:120].astype(np.float32) - 8) * np.repeat(scales.astype(np.float32), 32)[:120]).reshape(3, 40)
    assert a.tensors["c.weight"].qtype == T.F32                              # blocks cross rows of 40
    np.testing.assert_array_equal(a.tensor_data("c.weight"), want4)


def test_code_meanings_are_told_apart_by_size(tmp_path):
    """8 is APR_Q4 to aprender and Q8_0 to GGML (files of GGML-code writers); the byte size decides."""
    q8_0 = np.zeros((2, 64 // 32 * 34), np.uint8).tobytes()
    i8 = bytes(2 * 64)
    tensors = {"a.weight": (8, [2, 64], q8_0), "b.weight": (6, [2, 64], i8), "c.weight": (8, [2, 64], bytes(4 * 18))}
    path = tmp_path / "codes.apr"
    _v2_write(path, {"model_type": "x"}, tensors, True, b"APR\0")
    a = ModelFile.open(path)
    assert (a.tensors["a.weight"].qtype, a.tensors["b.weight"].qtype, a.tensors["c.weight"].qtype) == \
           (T.Q8_0, T.I8, T.F32)
    _v2_write(path, {"model_type": "x"}, {"d.weight": (7, [2, 64], bytes(128))}, True, b"APR\0")
    with pytest.raises(FileFormatError, match="U8"):
        ModelFile.open(path)
    _v2_write(path, {"model_type": "x"}, {"e.weight": (2, [2, 64], bytes(100))}, True, b"APR\0")
    with pytest.raises(FileFormatError, match="100 bytes do not fit dtype code 2"):
        ModelFile.open(path)


# -- what cannot be computed exactly is refused --------------------------------------------

def test_gemma3_without_a_known_window_is_refused(tmp_path):
    src = synthetic.write_gguf(tmp_path / "g2.gguf", synthetic.tiny_config("gemma3"), {"*": "F32"}, seed=1)
    out = aprender_import(src, tmp_path / "g2.apr")
    with pytest.raises(FileFormatError, match="gemma3 APR without a sliding window, and 2 layers"):
        ModelFile.open(out, header_only=True)


def test_hf_named_gemma3_is_refused(sources, tmp_path):
    out = aprender_import(sources["gemma3"], tmp_path / "g.apr")
    raw = bytearray(out.read_bytes())
    pos = raw.rindex(b"blk.0.attn_k.weight")                                  # its index entry (JSON comes first)
    raw[pos - 2:pos + len("blk.0.attn_k.weight")] = struct.pack("<H", 19) + b"model.layers.0.xk.w"
    out.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="gemma3 APR files with Hugging Face tensor names"):
        ModelFile.open(out, header_only=True)


def test_trailing_garbage_and_bad_footer_are_refused(sources, tmp_path):
    out = aprender_import(sources["llama"], tmp_path / "l.apr")
    good = out.read_bytes()
    out.write_bytes(good + bytes(7))
    with pytest.raises(FileFormatError, match="unexpected bytes after the tensor data"):
        ModelFile.open(out)
    out.write_bytes(good[:-4] + bytes(4))
    with pytest.raises(FileFormatError, match="footer CRC32 mismatch"):
        ModelFile.open(out)


# -- our writer, checked against the readers -----------------------------------------------

@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_convert_writes_what_aprender_and_realizar_read(sources, tmp_path, arch, ids):
    g = ModelFile.open(sources[arch])
    out = tmp_path / f"{arch}.apr"
    apr.write(g, out)
    meta, entries = aprender_read(out)
    want = aprender_read(aprender_import(sources[arch], tmp_path / "ref.apr"))[1]
    # names, dtype codes and shapes are those `apr import` writes for the same GGUF
    assert [(e[0], e[1], e[2], e[4]) for e in entries] == [(e[0], e[1], e[2], e[4]) for e in want]
    cfg = g.config
    assert (meta["architecture"], meta["hidden_size"], meta["num_layers"], meta["num_heads"], meta["num_kv_heads"],
            meta["vocab_size"], meta["intermediate_size"], meta["head_dim"]) == \
           (arch, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.d_ff, cfg.head_dim)
    assert meta["rope_type"] == (0 if arch == "llama" else 2)                 # realizar applies it
    assert meta["tokenizer.vocabulary"] == g.metadata["tokenizer.ggml.tokens"]   # realizar's tokenizer keys
    assert meta["tokenizer.bos_token_id"] == g.metadata["tokenizer.ggml.bos_token_id"]
    assert {"lm_head.weight", "output.weight"} & {e[0] for e in entries}     # realizar's GPU loader needs one
    assert meta.get("tied_embeddings", False) == cfg.tied_output
    np.testing.assert_array_equal(_logits(out, ids), _logits(sources[arch], ids))


def test_convert_turns_types_aprender_lacks_into_f32(tmp_path):
    cfg = synthetic.tiny_config("llama")
    src = synthetic.write_gguf(tmp_path / "m.gguf", cfg, {"token_embd": "Q8_0", "attn_k": "Q5_0", "attn_q": "Q4_0",
                                                          "ffn_up": "BF16", "ffn_gate": "F16"}, seed=6)
    lines = []
    apr.write(ModelFile.open(src), tmp_path / "m.apr", log=lines.append)
    _, entries = aprender_read(tmp_path / "m.apr")
    codes = {e[0]: e[1] for e in entries}
    assert (codes["token_embd.weight"], codes["blk.0.attn_k.weight"], codes["blk.0.attn_q.weight"],
            codes["blk.0.ffn_up.weight"], codes["blk.0.ffn_gate.weight"], codes["blk.0.attn_v.weight"]) == \
           (0, 0, 0, 30, 1, 14)
    assert sorted(line.split(" written")[0] for line in lines) == \
           ["1 Q8_0 tensor(s)", "2 Q4_0 tensor(s)", "2 Q5_0 tensor(s)"]
    assert "73,728 -> 524,288 bytes" in next(line for line in lines if "Q4_0" in line)   # 2 x 256 x 256 weights


def test_three_dimensional_shapes_keep_gguf_order():
    info = apr.tensor_info("x", "t", T.F32, (4, 3, 2))                       # GGUF order: ne0 = 4
    assert apr.apr_dims(info) == (4, 3, 2) and apr.shape_ggml_of((4, 3, 2)) == (4, 3, 2)
    info2 = apr.tensor_info("x", "m", T.F32, (4, 3))
    assert apr.apr_dims(info2) == (3, 4) and apr.shape_ggml_of((3, 4)) == (4, 3)



# -- metadata of any shape: a config or one line ---------------------------------------------

JSON_VALUES = st.one_of(
    st.sampled_from(["gemma3", "llama", "qwen2", 18, 0, -1, 1e6, 2 ** 64]),
    st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=6))
KEYS = ["architecture", "model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
        "intermediate_size", "rope_theta", "rms_norm_eps", "head_dim", "tokenizer.vocabulary", "tokenizer.bos_token_id",
        "tied_embeddings", "gguf_metadata", "model.architecture", "max_position_embeddings"]


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, min_size=1, max_size=4))
def test_any_metadata_gives_a_config_or_one_line(sources, tmp_path_factory, changes):
    out = aprender_import(sources["llama"], tmp_path_factory.mktemp("meta") / "m.apr", edit=changes)
    try:
        ModelFile.open(out, header_only=True).config
    except Q4KError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])      # GPT-2 BPE (merges), SentencePiece (scores)
def test_the_tokenizer_comes_from_aprenders_keys(sources, tmp_path, arch):
    from q4kdistill.formats.tokenizer import Tokenizer
    out = aprender_import(sources[arch], tmp_path / "t.apr")
    text = "Hello world, hello APR!"
    want = Tokenizer.from_gguf(sources[arch]).encode(text)
    assert Tokenizer.from_gguf(str(out)).encode(text) == want and len(want) > 3


# -- on the GPU (`pytest -m gpu`; skipped without one) ----------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_apr_import_output_on_the_gpu(sources, ids, tmp_path, arch):
    """Same bytes, same types: the GPU teacher from the APR is the GPU teacher from the GGUF."""
    from q4kdistill.backend import to_host
    out = aprender_import(sources[arch], tmp_path / f"{arch}.apr")
    want = to_host(Teacher.load(sources[arch], device="cuda", log=None).logits_for_batch(ids))
    got = to_host(Teacher.load(str(out), device="cuda", log=None).logits_for_batch(ids))
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_converted_real_gemma_on_the_gpu(gemma_path, tmp_path):
    """convert's APR (Q8_0/Q5_0 as F32) against the GGUF on the GPU: the same model, other kernels."""
    from q4kdistill.backend import to_host
    from q4kdistill.formats.tokenizer import Tokenizer
    from test_teacher_real import TEXTS, cosine_rows
    out = tmp_path / "g.apr"
    apr.write(ModelFile.open(gemma_path), out)
    ids = np.array([Tokenizer.from_gguf(gemma_path).encode(TEXTS["prose"])[:64]])
    tok = Tokenizer.from_gguf(str(out)).encode(TEXTS["prose"])[:64]
    assert tok == ids[0].tolist()
    want = to_host(Teacher.load(gemma_path, device="cuda", log=None).logits_for_batch(ids))[0]
    got = to_host(Teacher.load(str(out), device="cuda", log=None).logits_for_batch(ids))[0]
    assert cosine_rows(got, want).min() > 0.999
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95
