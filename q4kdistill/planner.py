"""Memory planner: GPU bytes of a distillation run, predicted from the teacher's header alone.

    plan = make_plan("teacher.gguf" | "x.manifest.json", batch=8, seq=512, student="params=0.5e9")
    plan.teacher_resident_bytes      {"native": ..., "dequant-f32": ..., "dequant-bf16": ...}
    plan.teacher_forward_peak_bytes  resident + the forward's largest stage at B x T
    plan.distill_step_peak_bytes     teacher + student state + the step's largest stage
    plan.rows                        every number with what it counts (docs/memory.md has the table)

A *stage* is a point of the code where the most buffers are alive at once: the buffers are
listed below with their shapes, as teacher.py / teacher_forward.py / student.py / losses.py /
optim.py allocate them on CuPy (which, unlike NumPy, never elides a temporary). A working set
is its largest stage. Pool rounding (512-byte blocks) is below 0.1 % and left out.

Shapes: N = B*T tokens, D d_model, Q = heads*head_dim, KV = kv_heads*head_dim, F d_ff, V vocab,
S = one float32 [B, heads, T, T] score tensor, U = one float32 [C, V] logits chunk.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .config import ModelConfig
from .errors import Q4KError

if TYPE_CHECKING:
    from .model_file import ModelFile

F32 = 4
BACKENDS = ("native", "dequant-f32", "dequant-bf16")


# -- the teacher file --------------------------------------------------------------------------

def open_teacher(source) -> ModelFile:
    """Header only: a GGUF (a truncated one too), an APR file, a manifest JSON or dict; a
    ModelFile is taken as it is."""
    from .model_file import ModelFile

    return source if isinstance(source, ModelFile) else ModelFile.open(source, header_only=True)


# -- the teacher's weights: resident and while loading (teacher.py: upload, decode_weight) --------

def kept_bytes(t, backend: str) -> int:
    """Bytes Teacher.load keeps for tensor ``t``: vectors (norms, biases) always as float32;
    matrices as stored (native), or decoded to float32 / bfloat16 bits."""
    if len(t.shape) == 1:
        return F32 * t.n_elements
    return {"native": t.nbytes, "dequant-f32": F32 * t.n_elements, "dequant-bf16": 2 * t.n_elements}[backend]


def teacher_resident(tensors) -> dict:
    """{backend: bytes Teacher.load keeps} for each of BACKENDS (inspect reports these too)."""
    tensors = list(tensors)
    return {b: sum(kept_bytes(t, b) for t in tensors) for b in BACKENDS}


def decode_transient(t, backend: str) -> int:
    """Bytes alive besides the kept result while decode_weight turns matrix ``t`` into its form:
    the uploaded blocks; for bf16 also the float32 decode and f32_to_bf16's three uint32
    temporaries alive at once ((n + 0x7FFF), (n >> 16), (... & 1))."""
    if len(t.shape) == 1 or backend == "native":
        return 0
    n = t.n_elements
    return t.nbytes + (0 if backend == "dequant-f32" else F32 * n + 3 * F32 * n)


def teacher_load_peak(tensors, backend: str) -> int:
    """Peak while Teacher.load uploads and decodes tensor after tensor in file order."""
    peak = kept = 0
    for t in tensors:
        kept += kept_bytes(t, backend)
        peak = max(peak, kept + decode_transient(t, backend))
    return peak


# -- the teacher's forward (teacher_forward.hidden_states, Teacher.iter_logits / logits_fn) ---------

def _sizes(cfg: ModelConfig, B: int, T: int) -> dict:
    N = B * T
    return dict(N=N, ND=N * cfg.d_model * F32, NQ=N * cfg.q_dim * F32, NKV=N * cfg.kv_dim * F32,
                NF=N * cfg.d_ff * F32, S=B * cfg.n_heads * T * T * F32,
                rope=8 * T * cfg.head_dim * len({cfg.layer_rope_base(i) for i in range(cfg.n_layers)}))


def _head(info: ModelFile):
    return info.tensors["token_embd.weight" if info.config.tied_output else "output.weight"]


def _matmul_variant(t, M: int):
    """The kernels.matmul variant a GPU would run for weight ``t`` at M activation rows."""
    import kernels

    N, K = t.shape
    return kernels.get(kernels.choose(t.type_name, M, N, K, on_gpu=True))


def _decodes_to_scratch(variant) -> bool:
    from kernels.scratch import dequant_matmul

    return variant.fn is dequant_matmul


def decode_scratch(info: ModelFile, m_trunk: int, m_head: int) -> int:
    """kernels.scratch: the decode-then-cuBLAS variants keep one reusable buffer per dtype, grown
    to the largest matrix they decoded and held until kernels.release_scratch() (from the first
    forward on, this is the LM head when it takes that path)."""
    import numpy as np

    used = [(t, m_trunk) for n, t in info.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    used.append((_head(info), m_head))
    sizes = {}
    for t, M in used:
        v = _matmul_variant(t, M) if t.quantized else None
        if v is not None and _decodes_to_scratch(v):
            dtype = v.params.get("dtype", "float16")
            sizes[dtype] = max(sizes.get(dtype, 0), t.n_elements * np.dtype(dtype).itemsize)
    return sum(sizes.values())


def linear_bytes(t, backend: str, M: int, out_bytes: int) -> int:
    """Bytes teacher_forward.linear holds at its fullest besides its input and the decode scratch,
    for weight ``t``, M activation rows and an output of ``out_bytes``:
      dequant-bf16  the matrix upcast (astype uint32, then << 16: two uint32 copies at once,
                    then the float32 one during the product)
      dequant-f32   the output only
      native        the output, the fp16 copy of x [M, K] (decode-then-cuBLAS), and the padded
                    copy kernels.weights.device_views makes of rows not a multiple of 4 bytes"""
    N, K = t.shape
    if backend == "dequant-bf16":
        return max(2 * F32 * N * K, F32 * N * K + out_bytes)
    if backend != "native" or not t.quantized:
        return out_bytes
    row = t.nbytes // N
    pad = N * (-(-row // 4) * 4) if row % 4 else 0
    x16 = 2 * M * K if _decodes_to_scratch(_matmul_variant(t, M)) else 0
    return out_bytes + x16 + pad


def teacher_stages(info: ModelFile, B: int, T: int, head_chunk: int | None, backend: str) -> dict:
    """Stages of hidden_states() -- one block's attention (at the softmax's exp), FFN (at the
    GLU's tanh) and ffn_down's product -- and, when ``head_chunk`` is given, of iter_logits (the
    final hidden [N, D], the chunk the caller's loop variable still holds, the head's product).
    Every stage holds the decode scratch too (native)."""
    s, N = _sizes(info.config, B, T), B * T
    down = info.tensors.get("blk.0.ffn_down.weight")
    C = min(head_chunk or N, N)
    U = C * info.config.vocab_size * F32
    common = dict(residual_and_normed=2 * s["ND"], rope_tables=s["rope"],
                  decode_scratch=decode_scratch(info, N, C) if backend == "native" else 0)
    stages = {
        "attention": dict(common, q_and_grouped_q=2 * s["NQ"], k_and_v=2 * s["NKV"],
                          scores_masked_shifted_probs=4 * s["S"], causal_mask=T * T),
        "ffn": dict(common, gate_up_and_two_act_temps=4 * s["NF"]),
        "ffn_down": dict(common, gate_up_glu=3 * s["NF"],
                         product=linear_bytes(down, backend, N, s["ND"]) if down else s["ND"]),
    }
    if head_chunk:
        stages["head"] = dict(decode_scratch=common["decode_scratch"], final_hidden=s["ND"],
                              previous_chunk=U if N > C else 0, product=linear_bytes(_head(info), backend, C, U))
    return stages


# -- the student (student.py, losses.py, optim.py) -------------------------------------------------

STUDENT_KEYS = ("layers", "n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "tied", "params")


def parse_student_spec(spec: str | None) -> dict:
    """'layers=4' | 'layers=0,9,18,27' | 'd_model=896,n_layers=24,...' | 'params=0.5e9' -> dict."""
    out, key = {}, None
    for item in (spec or "").split(","):
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in STUDENT_KEYS:
                raise Q4KError(f"--student: unknown key {key!r} (known: {', '.join(STUDENT_KEYS)})")
            out[key] = [value]
        elif key == "layers" and item.strip():     # layers=0,9,18,27: the teacher blocks kept
            out[key].append(item.strip())
        elif item.strip():
            raise Q4KError(f"--student {spec!r}: expected key=value items separated by commas")
    try:
        return {k: float(v[0]) if k == "params" else [int(x) for x in v] if k == "layers" else int(v[0])
                for k, v in out.items()}
    except ValueError:
        raise Q4KError(f"--student {spec!r}: values must be numbers") from None


def student_config(teacher: ModelConfig, spec: dict) -> ModelConfig:
    """The student's ModelConfig: the teacher's family and vocabulary, widths from ``spec``."""
    if "params" in spec:
        return config_with_params(teacher, spec["params"])
    cfg = teacher
    if "layers" in spec:                    # blocks taken from the teacher (Student.from_teacher)
        layers = spec["layers"]
        cfg = cfg.replace(n_layers=layers[0] if len(layers) == 1 else len(layers))
    widths = {k: spec[k] for k in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim") if k in spec}
    if widths:
        n_heads = widths.get("n_heads", cfg.n_heads)
        widths.setdefault("head_dim", widths.get("d_model", cfg.d_model) // n_heads)
        widths.setdefault("n_kv_heads", math.gcd(cfg.n_kv_heads, n_heads))
        cfg = cfg.replace(**widths)
    if "tied" in spec:
        cfg = cfg.replace(tied_output=bool(spec["tied"]))
    if min(cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) < 1:
        raise Q4KError(f"student: every width must be >= 1 ({spec})")
    if cfg.n_heads % cfg.n_kv_heads:
        raise Q4KError(f"student: n_heads {cfg.n_heads} is not a multiple of n_kv_heads {cfg.n_kv_heads}")
    return cfg.replace(swa_layers=[i for i in cfg.swa_layers if i < cfg.n_layers])


def config_with_params(teacher: ModelConfig, n_params: float) -> ModelConfig:
    """A qwen2-like student of about ``n_params`` parameters with the teacher's vocabulary.

    Shape rule, from Qwen2-0.5B (d 896, 24 layers, d_ff 4864, 14 heads of 64, 2 kv heads, tied):
    head_dim 64, d_ff = 5.43 d rounded to 64, kv heads = the largest divisor of the heads up to
    heads / 7. For each width d (multiples of 64) the layer count that best hits ``n_params``
    is taken; among widths within 5 % of the count, the one closest to Qwen2-0.5B's depth/width
    ratio wins (0.5e9 gives Qwen2-0.5B's shape).
    """
    if not 1e6 <= n_params <= 1e12:
        raise Q4KError(f"--student-params {n_params:g}: expected a count between 1e6 and 1e12")
    candidates = []
    for d in range(64, 16385, 64):
        heads = d // 64
        kv = max(k for k in range(1, heads + 1) if heads % k == 0 and k <= max(1, round(heads / 7)))
        cfg = teacher.replace(d_model=d, n_layers=1, d_ff=64 * round(5.43 * d / 64), n_heads=heads, n_kv_heads=kv,
                              head_dim=64, tied_output=True, swa_layers=[], sliding_window=None)
        one, per_layer = count_params(cfg), count_params(cfg.replace(n_layers=2)) - count_params(cfg)
        layers = max(1, round((n_params - one) / per_layer) + 1)
        error = abs(one + (layers - 1) * per_layer - n_params) / n_params
        aspect = abs(math.log(layers / d * 896 / 24))
        candidates.append((error > 0.05, aspect if error <= 0.05 else error, cfg.replace(n_layers=layers)))
    return min(candidates, key=lambda c: c[:2])[2]


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in cfg.tensor_shapes().values())


def block_cache_bytes(cfg: ModelConfig, B: int, T: int) -> dict:
    """What block_forward's cache keeps for the backward."""
    s = _sizes(cfg, B, T)
    return dict(input_normed_mid_normed2=4 * s["ND"], grouped_q_and_attn_out=2 * s["NQ"], k_and_v=2 * s["NKV"],
                probs=s["S"], gate_up_glu=3 * s["NF"])


def student_block_stages(cfg: ModelConfig, B: int, T: int) -> dict:
    """One block's forward and backward on top of its own cache (see block_cache_bytes)."""
    s = _sizes(cfg, B, T)
    cache = sum(block_cache_bytes(cfg, B, T).values())
    return {
        # attention_forward at the exp: scores, masked, shifted, probs; the cache is not complete yet
        "block forward (attention)": 2 * s["ND"] + 2 * s["NQ"] + 2 * s["NKV"] + 4 * s["S"] + T * T,
        # glu at the tanh: cache (less the glu output) + rotated q + attn out + two act temps
        "block forward (ffn)": cache + s["NQ"] + s["ND"] + s["NF"],
        # glu_backward: dm, act, act', dy*up, dgate besides the cache
        "block backward (ffn)": cache + 2 * s["ND"] + 5 * s["NF"],
        # attention_backward: dp, (dp - sum), ds besides the probs, and the grouped grads
        "block backward (attention)": cache + 2 * s["ND"] + 3 * s["S"] + 3 * s["NQ"] + 2 * s["NKV"],
    }


def loss_chunk_bytes(n: int, V: int, n_chunks: int) -> int:
    """losses.chunk_loss (kind kl, T = 1) at its fullest: student and teacher logits, the CE
    grads (dce and ds), both log-softmaxes, q, p, and _plogp_diff's mask (bool), difference and
    where-result = 10.25 U; from the second chunk on the previous chunk's ds is still held."""
    U = n * V * F32
    return int((10.25 + (1 if n_chunks > 1 else 0)) * U)


def head_chunk_bytes(n: int, V: int, D: int, n_chunks: int) -> int:
    """Student._head_backward per chunk: the loss at its fullest, or linear_backward's moment
    (logits, d logits, dx [n, D] and the head's full-size dW [V, D] before it is added)."""
    return max(loss_chunk_bytes(n, V, n_chunks), 2 * n * V * F32 + V * D * F32 + n * D * F32)


# -- the plan ---------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    predicted_bytes: int
    counts: str                 # what the row counts
    measured: bool = False      # reproduce-memory measures this row

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    teacher: dict
    student: dict
    batch: int
    seq: int
    chunk_tokens: int           # student LM head + loss (and the teacher's chunks inside a step)
    teacher_chunk_tokens: int   # Teacher.iter_logits in a plain teacher forward
    checkpoint: bool
    teacher_backend: str
    rows: list = field(default_factory=list)

    def add(self, name, predicted_bytes, counts, measured=False) -> int:
        self.rows.append(Row(name, int(predicted_bytes), counts, measured))
        return int(predicted_bytes)

    def row(self, name) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def teacher_resident_bytes(self) -> dict:
        return {b: self.row(f"teacher resident ({b})").predicted_bytes for b in BACKENDS}

    @property
    def teacher_forward_peak_bytes(self) -> int:
        return self.row(f"teacher forward peak ({self.teacher_backend})").predicted_bytes

    @property
    def distill_step_peak_bytes(self) -> int:
        return self.row("distill step peak").predicted_bytes

    def to_json(self) -> dict:
        return {"teacher": self.teacher, "student": self.student, "batch": self.batch, "seq": self.seq,
                "chunk_tokens": self.chunk_tokens, "teacher_chunk_tokens": self.teacher_chunk_tokens,
                "checkpoint": self.checkpoint, "teacher_backend": self.teacher_backend,
                "teacher_resident_bytes": self.teacher_resident_bytes,
                "teacher_forward_peak_bytes": self.teacher_forward_peak_bytes,
                "distill_step_peak_bytes": self.distill_step_peak_bytes,
                "rows": [r.to_dict() for r in self.rows]}

    def table(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"{'row':<{width}}  {'predicted':>12}  counts"]
        lines += [f"{r.name:<{width}}  {r.predicted_bytes / 1e9:>9.3f} GB  {r.counts}" for r in self.rows]
        return "\n".join(lines)


def make_plan(teacher, batch: int, seq: int, student: str | dict | None = None, *,
              chunk_tokens: int | None = None, teacher_chunk_tokens: int | None = None,
              checkpoint: bool = True, teacher_backend: str = "native") -> Plan:
    """The plan for a teacher (path, manifest dict or ModelFile) and a student spec
    (see parse_student_spec; default 'layers=4'). chunk_tokens None: the student's own choice."""
    from .student import chunk_size
    from .teacher import DEFAULT_CHUNK_TOKENS

    if min(batch, seq, chunk_tokens or 1, teacher_chunk_tokens or 1) < 1:
        raise Q4KError(f"batch, seq and chunk tokens must be >= 1 (got {batch}, {seq}, {chunk_tokens})")
    if teacher_backend not in BACKENDS:
        raise Q4KError(f"teacher backend {teacher_backend!r}: expected one of {', '.join(BACKENDS)}")
    info = open_teacher(teacher)
    spec = parse_student_spec(student or "layers=4") if not isinstance(student, dict) else dict(student)
    scfg = student_config(info.config, spec)
    n_params = count_params(scfg)
    plan = Plan(teacher={"source": info.path, "architecture": info.config.architecture,
                         "tensor_count": len(info.tensors), "total_tensor_bytes": info.total_tensor_bytes,
                         "n_elements": info.n_elements},
                student={"config": scfg.to_dict(), "n_params": n_params, "spec": spec},
                batch=batch, seq=seq, chunk_tokens=chunk_size(scfg.vocab_size, batch * seq, chunk_tokens),
                teacher_chunk_tokens=teacher_chunk_tokens or DEFAULT_CHUNK_TOKENS, checkpoint=checkpoint,
                teacher_backend=teacher_backend)
    _add_teacher_rows(plan, info)
    _add_step_rows(plan, info, scfg, n_params)
    return plan


def _stage_text(name, bufs) -> str:
    return f"stage '{name}': " + ", ".join(k for k, v in bufs.items() if v)


def _add_teacher_rows(plan: Plan, info: ModelFile) -> None:
    B, T = plan.batch, plan.seq
    resident = teacher_resident(info.tensors.values())
    counts = {"native": "every matrix as stored (quantized blocks) + vectors as float32",
              "dequant-f32": "4 bytes x every element", "dequant-bf16": "2 bytes x matrix elements + 4 x vector elements"}
    for b in BACKENDS:
        plan.add(f"teacher resident ({b})", resident[b], counts[b], measured=True)
    for b in BACKENDS:
        plan.add(f"teacher load peak ({b})", teacher_load_peak(info.tensors.values(), b),
                 "resident so far + the tensor being uploaded and decoded", measured=True)
    scratch = teacher_stages(info, B, T, plan.teacher_chunk_tokens, "native")["head"]["decode_scratch"]
    plan.add("teacher decode scratch (native)", scratch, "kernels' reusable decode buffer, kept after the forward "
             "(the largest matrix a decode-then-cuBLAS product decoded)", measured=True)
    for b in BACKENDS:
        stages = teacher_stages(info, B, T, plan.teacher_chunk_tokens, b)
        name = max(stages, key=lambda k: sum(stages[k].values()))
        work = plan.add(f"teacher forward working set ({b})", sum(stages[name].values()), _stage_text(name, stages[name]))
        plan.add(f"teacher forward peak ({b})", resident[b] + work,
                 f"resident + working set: iter_logits at {B}x{T}, chunks of {plan.teacher_chunk_tokens} tokens",
                 measured=True)


def _add_step_rows(plan: Plan, info: ModelFile, cfg: ModelConfig, n_params: int) -> None:
    """Teacher trunk (logits_fn), then loss_and_grads, then AdamW.step (as distill.py runs them)."""
    B, T, b = plan.batch, plan.seq, plan.teacher_backend
    s, N, V = _sizes(cfg, B, T), B * T, cfg.vocab_size
    params = plan.add("student params", F32 * n_params, f"{n_params:,} float32 parameters (one flat buffer)")
    grads = plan.add("student grads", F32 * n_params, "the flat float32 grad buffer")
    adam = plan.add("AdamW m and v", 2 * F32 * n_params, "two float32 moments per parameter")
    base = plan.row(f"teacher resident ({b})").predicted_bytes + params + grads + adam
    plan.add("student state", params + grads + adam, "params + grads + AdamW m and v")

    trunk = teacher_stages(info, B, T, plan.chunk_tokens, b)       # the head runs inside the loss (below)
    trunk.pop("head")
    scratch = trunk["ffn"]["decode_scratch"]                          # held from the teacher's first product on
    name = max(trunk, key=lambda k: sum(trunk[k].values()))
    plan.add("distill: teacher trunk peak", base + sum(trunk[name].values()),
             f"teacher + student state + teacher {_stage_text(name, trunk[name])}", measured=True)
    teacher_hidden = N * info.config.d_model * F32                    # logits_fn keeps h [N, D_teacher]

    cache = sum(block_cache_bytes(cfg, B, T).values())
    inputs = (cfg.n_layers + 1) * s["ND"]                             # each block's input + the last output
    kept = inputs if plan.checkpoint else cfg.n_layers * cache + s["ND"]
    plan.add("student activations (checkpointing on)", inputs + cache,
             "each block's input [N, D] + one block's cache, recomputed in the backward")
    plan.add("student activations (checkpointing off)", cfg.n_layers * cache + s["ND"],
             "every block's cache: " + ", ".join(block_cache_bytes(cfg, B, T)))
    C = min(plan.chunk_tokens, N)
    n_chunks = -(-N // C)
    loss = plan.add("loss chunk working set", head_chunk_bytes(C, V, cfg.d_model, n_chunks),
                    f"losses.chunk_loss on [{C}, {V}] logits: 10.25 (+1 from the 2nd chunk) x [C, V] float32, "
                    f"or the head's backward (logits, d logits, dW [V, D])")
    block = max(student_block_stages(cfg, B, T).values())            # includes the block's own cache
    if plan.checkpoint:
        fwd = inputs + cache + block          # saved inputs, the previous block's cache (still bound), this block
        bwd = inputs + 3 * s["ND"] + block    # inputs left, final hidden, dh, dx + the recomputed block
    else:
        fwd = (cfg.n_layers - 1) * cache + s["ND"] + block
        bwd = kept + 3 * s["ND"] + block - cache
    head = kept + 3 * s["ND"] + loss          # + final hidden, its norm input, dh
    work, where = max((fwd, "block forward"), (head, "LM head + loss chunk"), (bwd, "block backward"))
    fb = plan.add("distill: student forward/backward peak", base + scratch + teacher_hidden + work,
                  f"teacher + student state + decode scratch + teacher hidden [N, D] + activations + {where}",
                  measured=True)
    opt = plan.add("distill: optimizer step peak", base + scratch, "teacher + student state + decode scratch "
                   "(the fused AdamW kernel updates in place)", measured=True)
    plan.add("distill step peak", max(plan.row("distill: teacher trunk peak").predicted_bytes, fb, opt),
             "the largest of the three phases above", measured=True)
