"""Time one student training step (forward + backward + AdamW) and say where the time goes.

Reports tokens/s; the achieved model FLOP rate (3x the forward's matmul FLOPs, attention as the
full T x T square it computes) as a share of a matmul ceiling measured in the same run for the
same dtype (cuBLAS on the GPU); and a per-op breakdown from clock marks around every op call (one
extra, instrumented step), so the top costs outside matmuls are visible.

``q4kdistill bench student [--preset qwen2-0.5b] [--batch 8 --seq 512] [--json]`` runs it;
``--tiny`` shrinks the preset to a few thousand parameters (same layout: biases, GQA, norms,
sliding windows) so the CPU suite runs the same code on NumPy.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import backend
from ..config import ModelConfig
from ..errors import Q4KError
from ..student import model as student_mod
from ..student.losses import LossConfig
from ..student.ops import attention as attention_mod
from ..student.optim import AdamW, OptimConfig
from .clock import Clock

PRESETS = {  # ~0.5B students in the two layouts
    "qwen2-0.5b": ModelConfig("qwen2", n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864,
                              vocab_size=151936, rope_base=1e6, qkv_bias=True, tied_output=True),
    "gemma3-0.5b": ModelConfig("gemma3", n_layers=18, d_model=1152, n_heads=4, n_kv_heads=1, head_dim=256, d_ff=6912,
                               vocab_size=262144, act="gelu_tanh", qk_norm=True, post_norms=True,
                               embed_scale=1152 ** 0.5, sliding_window=512, swa_layers=[i for i in range(18) if (i + 1) % 6],
                               rope_base=1e6, rope_base_swa=1e4, tied_output=True),
}
TINY_SIZE = dict(batch=2, seq=16, warmup=1, steps=2)

# (module, function, label, is a matmul): the functions the step calls through module globals,
# so wrapping the module attribute times every call. A label starting with two spaces is a part
# of the row above it.
OPS = [
    (student_mod, "linear_forward", "linear fwd (matmul + bias)", True),
    (student_mod, "linear_backward", "linear bwd (matmul + bias)", True),
    (student_mod, "flash_attention_forward", "attention fwd (flash: ops/flash_attention.py)", False),
    (student_mod, "flash_attention_backward", "attention bwd (flash: ops/flash_attention.py)", False),
    (student_mod, "chunk_loss", "loss over [chunk, V] (log-softmax, KL, CE)", False),
    (student_mod, "rmsnorm_forward", "rmsnorm fwd", False),
    (student_mod, "rmsnorm_backward", "rmsnorm bwd", False),
    (student_mod, "rope_forward", "rope fwd", False),
    (student_mod, "rope_backward", "rope bwd", False),
    (student_mod, "glu_forward", "glu fwd", False),
    (student_mod, "glu_backward", "glu bwd", False),
    (student_mod, "embedding_forward", "embedding gather", False),
    (student_mod, "embedding_backward", "embedding scatter-add", False),
]
OTHER = "other (residual adds, param-grad +=, reshapes, python)"


def tiny_version(cfg: ModelConfig) -> ModelConfig:
    """``cfg``'s layout (family, biases, GQA or MQA, norms, sliding windows, tied head) at a size
    a CPU steps in milliseconds: 2 layers, d_model 64, 4 heads of 16, d_ff 160, vocabulary 1000."""
    return cfg.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=1 if cfg.n_kv_heads == 1 else 2, head_dim=16, d_ff=160,
        vocab_size=1000, embed_scale=64 ** 0.5 if cfg.embed_scale != 1.0 else 1.0,
        sliding_window=8 if cfg.sliding_window else None, swa_layers=[0] if cfg.swa_layers else [])


def preset_config(name: str, tiny: bool = False) -> ModelConfig:
    if name not in PRESETS:
        raise Q4KError(f"unknown student preset {name!r} (choose from {', '.join(sorted(PRESETS))})")
    return tiny_version(PRESETS[name]) if tiny else PRESETS[name]


# -- timing every op ---------------------------------------------------------------------------
class OpTimer:
    """Wraps module-level functions so every call is bracketed by clock marks."""

    def __init__(self, clock):
        self.clock, self.records, self.undo = clock, [], []

    def wrap(self, module, name, label):
        fn = getattr(module, name, None)
        if fn is None:
            raise Q4KError(f"bench student: {module.__name__}.{name} no longer exists; update OPS in {__name__}")

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = self.clock.mark()
            out = fn(*args, **kwargs)
            self.records.append((label, start, self.clock.mark()))
            return out

        setattr(module, name, timed)
        self.undo.append((module, name, fn))

    def restore(self):
        for module, name, fn in reversed(self.undo):
            setattr(module, name, fn)
        self.undo = []

    def totals(self) -> dict:
        """label -> ms summed over its calls."""
        out = {}
        for label, a, b in self.records:
            out[label] = out.get(label, 0.0) + self.clock.ms(a, b)
        return out


# -- FLOPs and the ceiling ---------------------------------------------------------------------
def forward_flops(cfg: ModelConfig, B: int, T: int) -> float:
    """Matmul FLOPs of one forward over B x T tokens (attention as the full T x T square)."""
    N = B * T
    D, Q, KV, F = cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.d_ff
    per_layer = 2 * N * (D * Q + 2 * D * KV + Q * D + 3 * D * F) + 2 * 2 * B * cfg.n_heads * T * T * cfg.head_dim
    return cfg.n_layers * per_layer + 2 * N * D * cfg.vocab_size


def matmul_ceiling(xp, clock, dtype, shapes, reps=10) -> float:
    """Best FLOP/s of x[M, K] @ w[N, K].T over ``shapes`` [(M, K, N)] (the model's own big GEMMs)."""
    best = 0.0
    for M, K, N in shapes:
        x = xp.ones((M, K), dtype=dtype)
        w = xp.ones((N, K), dtype=dtype)
        x @ w.T                                                   # warm-up (cuBLAS handle, algorithm)
        a = clock.mark()
        for _ in range(reps):
            x @ w.T
        best = max(best, 2.0 * M * K * N * reps / clock.seconds(a, clock.mark()))
    return best


# -- the step ----------------------------------------------------------------------------------
def _build(cfg, xp, batch, seq, checkpoint, chunk_tokens, loss, top_k):
    """The student, its optimizer and a function running one step on fixed random data."""
    from ..student.model import Student

    s = Student.from_config(cfg, seed=0, xp=xp, checkpoint=checkpoint, chunk_tokens=chunk_tokens)
    rng = np.random.default_rng(0)
    ids = xp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)))
    mask = xp.ones((batch, seq), dtype=bool)
    shape = (batch * seq, cfg.vocab_size)                          # teacher logits [B*T, V]
    teacher = (xp.random.standard_normal(shape, dtype=np.float32) if xp is not np        # cupy: on the device
               else rng.standard_normal(shape, dtype=np.float32))
    opt = AdamW.for_student(s, OptimConfig(lr=1e-4, warmup_steps=1, total_steps=1000))
    loss_cfg = LossConfig(loss, temperature=2.0, alpha=0.1, top_k=top_k)

    def step():
        s.loss_and_grads(ids, lambda a, b: teacher[a:b], loss_cfg, attention_mask=mask)
        opt.step()
    return s, opt, step


def run(preset="qwen2-0.5b", tiny=False, batch=8, seq=512, checkpoint=False, chunk_tokens=None, loss="kl",
        top_k=None, warmup=2, steps=5) -> dict:
    """Time ``steps`` steps after ``warmup``, then one instrumented step; the report as a dict."""
    if min(batch, seq, steps) < 1 or warmup < 0:
        raise Q4KError("bench student: --batch, --seq and --steps must be >= 1, --warmup >= 0")
    cfg = preset_config(preset, tiny)
    xp = backend.xp()
    clock = Clock(xp)
    student, opt, step = _build(cfg, xp, batch, seq, checkpoint, chunk_tokens, loss, top_k)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        a = clock.mark()
        step()
        times.append(clock.ms(a, clock.mark()))
    step_ms = float(np.median(times))

    timer = OpTimer(clock)
    try:
        for module, name, label, _ in OPS:
            timer.wrap(module, name, label)
        timer.wrap(opt, "step", "adamw step (incl. grad norm)")
        a = clock.mark()
        step()
        profiled_ms = clock.ms(a, clock.mark())
    finally:
        timer.restore()
    ops = timer.totals()
    top_level = sum(ms for label, ms in ops.items() if not label.startswith("  "))
    ops[OTHER] = max(0.0, profiled_ms - top_level)

    tokens = batch * seq
    chunk = student._chunk(tokens)
    model_flops = 3 * forward_flops(cfg, batch, seq)
    dtype = student.param_buffer.flat.dtype
    ceiling = matmul_ceiling(xp, clock, dtype, [(tokens, cfg.d_model, cfg.d_ff), (tokens, cfg.d_ff, cfg.d_model),
                                                (min(tokens, chunk), cfg.d_model, cfg.vocab_size)])
    achieved = model_flops / (step_ms / 1e3)
    matmul_labels = {label for _, _, label, mm in OPS if mm}
    return dict(
        device=backend.gpu_name(), preset=preset + (" (tiny)" if tiny else ""), params=student.n_params,
        batch=batch, seq=seq, dtype=str(dtype), checkpoint=checkpoint, chunk_tokens=chunk, loss=loss,
        step_ms=step_ms, step_ms_all=times, tokens_per_s=tokens / (step_ms / 1e3),
        model_tflop_per_step=model_flops / 1e12, achieved_tflops=achieved / 1e12,
        matmul_ceiling_tflops=ceiling / 1e12, share_of_ceiling=achieved / ceiling,
        profiled_step_ms=profiled_ms, ops_ms=ops,
        top_non_matmul=sorted(((l, ms) for l, ms in ops.items() if l not in matmul_labels and not l.startswith("  ")),
                              key=lambda x: -x[1])[:5],
        pool_bytes_held=int(xp.get_default_memory_pool().total_bytes()) if clock.gpu else None,
    )


def table(r: dict) -> str:
    lines = [f"student step on {r['device']}: preset {r['preset']} ({r['params'] / 1e6:.1f} M params, {r['dtype']}), "
             f"batch {r['batch']} x {r['seq']}, checkpoint={r['checkpoint']}, chunk {r['chunk_tokens']} tokens, loss {r['loss']}",
             f"  step           {r['step_ms']:9.2f} ms (median of {len(r['step_ms_all'])})",
             f"  tokens/s       {r['tokens_per_s']:9.0f}",
             f"  model FLOP     {r['model_tflop_per_step']:9.3f} TFLOP/step -> {r['achieved_tflops']:.2f} TFLOP/s",
             f"  matmul ceiling {r['matmul_ceiling_tflops']:9.2f} TFLOP/s (same dtype, this run)"
             f" -> {100 * r['share_of_ceiling']:.1f} % of it",
             f"  per op, one instrumented step ({r['profiled_step_ms']:.1f} ms):"]
    total = r["profiled_step_ms"] or 1.0
    top = sorted((x for x in r["ops_ms"].items() if not x[0].startswith("  ")), key=lambda x: -x[1])
    sub = [x for x in r["ops_ms"].items() if x[0].startswith("  ")]
    for label, ms in top:
        lines.append(f"    {label:<58s} {ms:9.2f} ms {100 * ms / total:5.1f} %")
        if label.startswith("attention fwd"):                  # its inner part right below it
            lines += [f"    {l:<58s} {m:9.2f} ms {100 * m / total:5.1f} %" for l, m in sub]
    lines.append("  top costs outside matmuls: " + ", ".join(f"{l} {ms:.1f} ms" for l, ms in r["top_non_matmul"]))
    if r["pool_bytes_held"] is not None:
        lines.append(f"  CuPy pool holds {r['pool_bytes_held'] / 2**30:.2f} GiB after the run")
    return "\n".join(lines)
