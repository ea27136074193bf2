"""Time one student training step (forward + backward + AdamW) and say where the time goes.

    python scripts/bench_student.py [--preset qwen2-0.5b] [--batch 8 --seq 512] [--checkpoint] [--json]

Reports tokens/s; the achieved model FLOP rate (3x the forward's matmul FLOPs, attention as the
full T x T square it computes) as a share of a cuBLAS matmul ceiling measured in the same run
for the same dtype; and a per-op breakdown from CUDA events around every op call (one extra,
instrumented step), so the top costs outside matmuls are visible. The table goes to stdout, or
to stderr with --json (then stdout holds one JSON object). Without a GPU it runs on NumPy
(use --preset tiny there), timing with perf_counter.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np

import q4kdistill  # noqa: F401  (backend first)
from q4kdistill import backend, losses, student as student_mod
from q4kdistill.config import ModelConfig
from q4kdistill.losses import LossConfig
from q4kdistill.optim import AdamW, OptimConfig
from q4kdistill.student import Student

PRESETS = {  # ~0.5B students in the two layouts, and a CPU smoke size
    "qwen2-0.5b": ModelConfig("qwen2", n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864,
                              vocab_size=151936, rope_base=1e6, qkv_bias=True, tied_output=True),
    "gemma3-0.5b": ModelConfig("gemma3", n_layers=18, d_model=1152, n_heads=4, n_kv_heads=1, head_dim=256, d_ff=6912,
                               vocab_size=262144, act="gelu_tanh", qk_norm=True, post_norms=True,
                               embed_scale=1152 ** 0.5, sliding_window=512, swa_layers=[i for i in range(18) if (i + 1) % 6],
                               rope_base=1e6, rope_base_swa=1e4, tied_output=True),
    "tiny": ModelConfig("llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=160,
                        vocab_size=1000, rope_style="norm", tied_output=False),
}


# -- clocks ------------------------------------------------------------------------------------
class Clock:
    """Marks on the GPU stream (CUDA events) or on the host (perf_counter)."""

    def __init__(self, xp):
        self.gpu = xp.__name__ == "cupy"
        self.xp = xp

    def mark(self):
        if not self.gpu:
            return time.perf_counter()
        ev = self.xp.cuda.Event()
        ev.record()
        return ev

    def ms(self, a, b):
        if not self.gpu:
            return (b - a) * 1e3
        b.synchronize()
        return self.xp.cuda.get_elapsed_time(a, b)


class OpTimer:
    """Wraps module-level functions so every call is bracketed by clock marks."""

    def __init__(self, clock):
        self.clock, self.records, self.undo = clock, [], []

    def wrap(self, module, name, label):
        fn = getattr(module, name)

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

    def totals(self):
        out = {}
        for label, a, b in self.records:
            out[label] = out.get(label, 0.0) + self.clock.ms(a, b)
        return out


OPS = [  # (module, function, label, is a matmul)
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
    (student_mod, "_accumulate", "param-grad += ", False),
]


# -- FLOPs and the ceiling ---------------------------------------------------------------------
def forward_flops(cfg: ModelConfig, B: int, T: int) -> float:
    N = B * T
    D, Q, KV, F = cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.d_ff
    per_layer = 2 * N * (D * Q + 2 * D * KV + Q * D + 3 * D * F) + 2 * 2 * B * cfg.n_heads * T * T * cfg.head_dim
    return cfg.n_layers * per_layer + 2 * N * D * cfg.vocab_size


def matmul_ceiling(xp, clock, dtype, shapes, reps=10):
    """Best FLOP/s of x[M,K] @ w[N,K].T over ``shapes`` (the model's own big GEMMs)."""
    best = 0.0
    for M, K, N in shapes:
        x = xp.ones((M, K), dtype=dtype)
        w = xp.ones((N, K), dtype=dtype)
        x @ w.T                                                   # warm-up (cuBLAS handle, algorithm)
        a = clock.mark()
        for _ in range(reps):
            x @ w.T
        best = max(best, 2.0 * M * K * N * reps / (clock.ms(a, clock.mark()) / 1e3))
    return best


# -- the step ----------------------------------------------------------------------------------
def build(args, xp):
    cfg = PRESETS[args.preset]
    s = Student.from_config(cfg, seed=0, xp=xp, checkpoint=args.checkpoint, chunk_tokens=args.chunk_tokens)
    rng = np.random.default_rng(0)
    ids = xp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq)))
    mask = xp.ones((args.batch, args.seq), dtype=bool)
    shape = (args.batch * args.seq, cfg.vocab_size)
    teacher = (xp.random.standard_normal(shape, dtype=np.float32) if xp is not np        # cupy: on the device
               else rng.standard_normal(shape, dtype=np.float32))
    opt = AdamW.for_student(s, OptimConfig(lr=1e-4, warmup_steps=1, total_steps=1000))
    loss_cfg = LossConfig(args.loss, temperature=2.0, alpha=0.1, top_k=args.top_k)
    return cfg, s, opt, lambda: (s.loss_and_grads(ids, lambda a, b: teacher[a:b], loss_cfg, attention_mask=mask),
                                 opt.step())


def run(args):
    xp = backend.xp()
    clock = Clock(xp)
    cfg, student, opt, step = build(args, xp)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        a = clock.mark()
        step()
        times.append(clock.ms(a, clock.mark()))
    step_ms = float(np.median(times))

    timer = OpTimer(clock)
    for module, name, label, _ in OPS:
        timer.wrap(module, name, label)
    timer.wrap(opt, "step", "adamw step (incl. grad norm)")
    a = clock.mark()
    step()
    profiled_ms = clock.ms(a, clock.mark())
    timer.restore()
    ops = timer.totals()
    top_level = sum(ms for label, ms in ops.items() if not label.startswith("  "))
    ops["other (residual adds, reshapes, head-grad +=, python)"] = max(0.0, profiled_ms - top_level)

    tokens = args.batch * args.seq
    model_flops = 3 * forward_flops(cfg, args.batch, args.seq)
    dtype = student.param_buffer.flat.dtype
    M = min(tokens, student._chunk(tokens))
    ceiling = matmul_ceiling(xp, clock, dtype, [(tokens, cfg.d_model, cfg.d_ff), (tokens, cfg.d_ff, cfg.d_model),
                                                (M, cfg.d_model, cfg.vocab_size)])
    achieved = model_flops / (step_ms / 1e3)
    matmul_labels = {label for _, _, label, mm in OPS if mm}
    mem = None
    if clock.gpu:
        mem = int(xp.get_default_memory_pool().total_bytes())
    return dict(
        device=backend.gpu_name(), preset=args.preset, params=student.n_params, batch=args.batch, seq=args.seq,
        dtype=str(dtype), checkpoint=args.checkpoint, chunk_tokens=student._chunk(tokens), loss=args.loss,
        step_ms=step_ms, step_ms_all=times, tokens_per_s=tokens / (step_ms / 1e3),
        model_tflop_per_step=model_flops / 1e12, achieved_tflops=achieved / 1e12,
        matmul_ceiling_tflops=ceiling / 1e12, share_of_ceiling=achieved / ceiling,
        profiled_step_ms=profiled_ms, ops_ms=ops,
        top_non_matmul=sorted(((l, ms) for l, ms in ops.items() if l not in matmul_labels and not l.startswith("  ")),
                              key=lambda x: -x[1])[:5],
        pool_bytes_held=mem,
    )


def table(r) -> str:
    lines = [f"student step on {r['device']}: preset {r['preset']} ({r['params'] / 1e6:.1f} M params, {r['dtype']}), "
             f"batch {r['batch']} x {r['seq']}, checkpoint={r['checkpoint']}, chunk {r['chunk_tokens']} tokens, loss {r['loss']}",
             f"  step           {r['step_ms']:9.2f} ms (median of {len(r['step_ms_all'])})",
             f"  tokens/s       {r['tokens_per_s']:9.0f}",
             f"  model FLOP     {r['model_tflop_per_step']:9.3f} TFLOP/step -> {r['achieved_tflops']:.2f} TFLOP/s",
             f"  matmul ceiling {r['matmul_ceiling_tflops']:9.2f} TFLOP/s (cuBLAS, same dtype, this run)"
             f" -> {100 * r['share_of_ceiling']:.1f} % of it",
             f"  per op, one instrumented step ({r['profiled_step_ms']:.1f} ms):"]
    top = sorted((x for x in r["ops_ms"].items() if not x[0].startswith("  ")), key=lambda x: -x[1])
    sub = [x for x in r["ops_ms"].items() if x[0].startswith("  ")]
    for label, ms in top:
        lines.append(f"    {label:<58s} {ms:9.2f} ms {100 * ms / r['profiled_step_ms']:5.1f} %")
        if label.startswith("attention fwd"):                  # its inner part right below it
            lines += [f"    {l:<58s} {m:9.2f} ms {100 * m / r['profiled_step_ms']:5.1f} %" for l, m in sub]
    lines.append("  top costs outside matmuls: " + ", ".join(f"{l} {ms:.1f} ms" for l, ms in r["top_non_matmul"]))
    if r["pool_bytes_held"] is not None:
        lines.append(f"  CuPy pool holds {r['pool_bytes_held'] / 2**30:.2f} GiB after the run")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2-0.5b" if backend.on_gpu() else "tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--checkpoint", action="store_true", help="recompute block activations in the backward")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per LM-head/loss chunk (default: auto)")
    p.add_argument("--loss", choices=losses.KINDS, default="kl")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = p.parse_args(argv)
    r = run(args)
    print(table(r), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
