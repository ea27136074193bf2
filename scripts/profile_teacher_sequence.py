"""Profile: where one teacher forward's GPU time goes, op by op, in the order the forward runs them.

scripts/probe_teacher_ops.py times each op alone (10 times in a row inside a CUDA graph: its inputs warm
in L2); this one times the real forward: a CUDA event before and after every op, recorded on the stream
without a synchronisation, so the GPU runs the forward back to back (host issue ahead of it) and each
op's time is what it took in sequence. Ops: the embedding, every product (by weight role: attn_q, ...,
ffn_down, and the LM head's slabs), the norms (add_norm: residual add + norm), rope, the attention
forward, the GLU. Prints the per-role totals, their share of the whole forward (timed by its own events
around it), the sum of the ops against that whole (the rest: gaps between ops), and the products' TFLOP/s.

    python3 scripts/profile_teacher_sequence.py [--batch 8] [--seq 512] [--teacher MODEL] [--json]
    python3 scripts/profile_teacher_sequence.py --tiny        # CPU: a tiny synthetic teacher, wall-clock times
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout first


class Clock:
    """Start/stop marks around each op: CUDA events (no sync) on a GPU, perf_counter on the CPU."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.marks = []                      # (label, start, stop)

    def now(self):
        if not self.gpu:
            return time.perf_counter()
        import cupy

        e = cupy.cuda.Event()
        e.record()
        return e

    def ms(self, a, b) -> float:
        if not self.gpu:
            return 1e3 * (b - a)
        import cupy

        return cupy.cuda.get_elapsed_time(a, b)


def instrument(clock: Clock, names: dict):
    """Wrap the teacher forward's ops; -> undo(). names: id(Weight) -> its GGUF name."""
    import kernels.fused_glu as glu_mod

    from q4kdistill.student.ops import fused
    from q4kdistill.teacher import forward as F

    depth = [0]
    saved = []

    def wrap(obj, attr, label_of):
        orig = getattr(obj, attr)

        def timed(*args, **kw):
            if depth[0]:
                return orig(*args, **kw)
            depth[0] += 1
            try:
                a = clock.now()
                out = orig(*args, **kw)
                clock.marks.append((label_of(args), a, clock.now(), args))
                return out
            finally:
                depth[0] -= 1

        setattr(obj, attr, timed)
        saved.append((obj, attr, orig))

    def role(w):
        name = names.get(id(w), "")
        return name.split(".")[-2] if name.startswith("blk.") else (name or "slab of the LM head")

    wrap(F, "embed", lambda a: "embedding")
    wrap(F, "linear", lambda a: f"product {role(a[1])}")
    wrap(F, "lm_head", lambda a: "LM head (all slabs)")
    wrap(F, "qkv_rope", lambda a: "product q,k,v stacked + bias/rope/fp16 epilogue")
    wrap(F, "_product16", lambda a: f"product {role(a[1])}")          # $Q4KDISTILL_GLU_INPUTS=float16
    wrap(F, "norm", lambda a: "norm")
    wrap(F, "add_norm", lambda a: "add_norm (residual add + norm)")
    wrap(fused, "rope_forward", lambda a: "rope (q or k)")
    wrap(F, "flash_attention_forward", lambda a: "attention forward")
    wrap(glu_mod, "glu_fwd", lambda a: "GLU")

    def undo():
        for obj, attr, orig in reversed(saved):
            setattr(obj, attr, orig)

    return undo


def flops(label, args) -> float:
    """2 M N K of a product (x [.., K], W [N, K]); 0 for other ops."""
    if not label.startswith("product") and not label.startswith("LM head"):
        return 0.0
    x, w = args[0], args[1]
    M = int(np.prod(x.shape[:-1]))
    if isinstance(w, dict):                           # qkv_rope(h, block weights, cfg, tables)
        return sum(2.0 * M * w[n].shape[0] * w[n].shape[1] for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight"))
    return 2.0 * M * w.shape[0] * w.shape[1]


def profile(teacher, ids, gpu: bool, repeats: int = 3) -> dict:
    names = {id(w): n for n, w in teacher.weights.items()}
    clock = Clock(gpu)

    def forward():
        for _ in teacher.iter_logits(ids):
            pass

    forward()                                         # compile, tables, scratch
    totals = []
    per = collections.defaultdict(lambda: [0.0, 0, 0.0])    # label -> [ms, calls, flops] summed over repeats
    for _ in range(repeats):
        clock.marks = []
        undo = instrument(clock, names)
        try:
            a = clock.now()
            forward()
            b = clock.now()
        finally:
            undo()
        if gpu:
            b.synchronize()
        totals.append(clock.ms(a, b))
        for label, s, e, args in clock.marks:
            p = per[label]
            p[0] += clock.ms(s, e)
            p[1] += 1
            p[2] += flops(label, args)
    whole = float(np.median(totals))
    rows = [{"op": k, "ms": v[0] / repeats, "calls": v[1] // repeats, "share": v[0] / repeats / whole,
             "tflops": (v[2] / (v[0] * 1e-3) / 1e12) if v[2] and v[0] else None}
            for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])]
    return {"forward_ms": whole, "ops_ms": sum(r["ms"] for r in rows), "rows": rows, "clock": "cuda events" if gpu else "perf_counter"}


def table(r, title) -> str:
    lines = [title, f"{'op':36s} {'ms':>9s} {'calls':>6s} {'share':>7s} {'TFLOP/s':>8s}"]
    for row in r["rows"]:
        tf = f"{row['tflops']:8.0f}" if row["tflops"] else " " * 8
        lines.append(f"{row['op']:36s} {row['ms']:9.2f} {row['calls']:6d} {100 * row['share']:6.1f}% {tf}")
    lines.append(f"{'sum of the ops':36s} {r['ops_ms']:9.2f}        {100 * r['ops_ms'] / r['forward_ms']:6.1f}%")
    lines.append(f"{'whole forward (' + r['clock'] + ')':36s} {r['forward_ms']:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--teacher", help="a GGUF / manifest (default: the 7B Q4_K_M manifest)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--tiny", action="store_true", help="CPU: a tiny synthetic teacher, wall-clock times")
    args = p.parse_args(argv)
    from q4kdistill import backend
    from q4kdistill.teacher.model import Teacher

    gpu = backend.on_gpu() and not args.tiny
    if not gpu and not args.tiny:
        print("needs a CUDA GPU (or --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    if args.tiny:
        from q4kdistill.memory.reproduce import tiny_manifest

        teacher = Teacher.load(tiny_manifest(), device="cpu", log=None)
        B, T = 1, 16
    else:
        from q4kdistill.data import MANIFEST_7B

        teacher = Teacher.load(args.teacher or MANIFEST_7B, log=None)
        B, T = args.batch, args.seq
    xp = teacher.xp
    ids = xp.asarray(np.random.default_rng(0).integers(0, teacher.vocab_size, (B, T)))
    r = profile(teacher, ids, gpu, repeats=1 if args.tiny else args.repeats)
    r.update(batch=B, seq=T, device=backend.gpu_name() if gpu else "cpu")
    print(table(r, f"teacher forward {B}x{T} on {r['device']}, op by op in sequence"),
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
