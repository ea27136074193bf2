"""Probe: the pure GPU time of each op of the 7B teacher's forward at B x T (default 8 x 512).

Each op runs 10 times inside one CUDA graph (CuPy stream capture; no host time, no launch gaps between
them), the graph is replayed 5 times, and the median over the replays / 10 is the op's time, beside
the bytes or FLOPs it moves and the copy bandwidth measured in the same run:

  add_norm, norm, GLU (fp32 and fp16 inputs), rope (q and k, in place), the attention forward (its
  wrapper: 16-bit casts, the tensor-core kernel, float32 output), x -> fp16, and for four weights of
  block 0: the decode to fp16, cuBLAS GemmEx on the decoded weight (fp32 and fp16 out), and
  kernels.matmul as the tuning table runs it (float32 x: its fp16 cast included).

    python3 scripts/probe_teacher_ops.py [--batch 8] [--seq 512]
"""
import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout first


def gpu_us(fn, reps=10):
    import cupy

    fn()
    cupy.cuda.get_current_stream().synchronize()
    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        for _ in range(reps):
            fn()
        graph = stream.end_capture()
    graph.upload(stream)
    graph.launch(stream)
    stream.synchronize()
    times = []
    for _ in range(5):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        graph.launch(stream)
        b.record(stream)
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b) * 1e3 / reps)
    return statistics.median(times)


def row(name, us, nbytes=None, flops=None):
    extra = (f"  {nbytes / us / 1e3:7.0f} GB/s" if nbytes else "") + (f"  {flops / us / 1e6:6.0f} TFLOP/s" if flops else "")
    print(f"{name:44s} {us:9.1f} us{extra}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    args = p.parse_args(argv)
    from q4kdistill import backend

    if not backend.on_gpu():
        sys.exit("probe_teacher_ops.py needs a CUDA GPU (CuPy)")
    import cupy

    import kernels
    from kernels import blas, linked
    from kernels.fused_glu import glu_fwd
    from q4kdistill.data import MANIFEST_7B
    from q4kdistill.formats.model_file import ModelFile
    from q4kdistill.memory import meter
    from q4kdistill.student.ops import fused, rope_tables
    from q4kdistill.student.ops.flash_attention import flash_attention_forward
    from q4kdistill.teacher import forward as F
    from q4kdistill.teacher.model import Teacher

    meter.install()
    teacher = Teacher.load(ModelFile.open(MANIFEST_7B), log=None)
    cfg = teacher.config
    B, T = args.batch, args.seq
    M, D, Fd, H, KV, hd = B * T, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rng = cupy.random.default_rng(0)
    print(f"{backend.gpu_name()}: 7B manifest teacher, {B} x {T} tokens")
    big = cupy.empty(1 << 28, np.uint8)
    big2 = cupy.empty_like(big)
    row("copy 256 MiB (read+write)", gpu_us(lambda: cupy.copyto(big2, big)), 2 * big.nbytes)
    del big, big2
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    a = rng.standard_normal((B, T, D), dtype=np.float32)
    w = teacher.weights["blk.0.ffn_norm.weight"]
    row(f"add_norm x+=a, h fp16 [{M},{D}]", gpu_us(lambda: F.add_norm(x, a, w, 1e-6, np.float16)), 4 * M * D * 3 + 2 * M * D)
    row(f"norm -> fp16 [{M},{D}]", gpu_us(lambda: F.norm(x, w, 1e-6, np.float16)), 4 * M * D + 2 * M * D)
    gate = rng.standard_normal((B, T, Fd), dtype=np.float32)
    up = rng.standard_normal((B, T, Fd), dtype=np.float32)
    y16 = cupy.empty((B, T, Fd), np.float16)
    row(f"glu silu fp32,fp32 -> fp16 [{M},{Fd}]", gpu_us(lambda: glu_fwd(gate, up, "silu", y=y16)), 4 * M * Fd * 2 + 2 * M * Fd)
    g16, u16 = gate.astype(np.float16), up.astype(np.float16)
    row("glu silu fp16,fp16 -> fp16", gpu_us(lambda: glu_fwd(g16, u16, "silu", y=y16)), 2 * M * Fd * 3)
    del gate, up, g16, u16
    q = rng.standard_normal((B, T, H, hd), dtype=np.float32)
    k = rng.standard_normal((B, T, KV, hd), dtype=np.float32)
    v = rng.standard_normal((B, T, KV, hd), dtype=np.float32)
    cos, sin = rope_tables(cupy.arange(T), hd, cfg.rope_base, cupy)
    row(f"rope q in place fp32 [{B},{T},{H},{hd}]", gpu_us(lambda: fused.rope_forward(q, cos, sin, cfg.rope_style, out=q)), 8 * q.size)
    row(f"rope k in place fp32 [{B},{T},{KV},{hd}]", gpu_us(lambda: fused.rope_forward(k, cos, sin, cfg.rope_style, out=k)), 8 * k.size)
    row("attention fwd (wrapper, fp32 in/out)", gpu_us(lambda: flash_attention_forward(q, k, v, None, None, cfg.scale)),
        flops=4 * B * H * T * T * hd / 2)
    x2 = x.reshape(M, D)
    row(f"to_f16 x [{M},{D}]", gpu_us(lambda: linked.to_f16(x2)), 6 * M * D)
    for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight"):
        wt = teacher.weights[name]
        n_out, K = wt.shape
        o16 = cupy.empty((n_out, K), np.float16)
        row(f"decode {wt.qtype.name} {name.split('.')[2]} [{n_out},{K}]",
            gpu_us(lambda: linked.decode_f16_linked(wt.data, wt.qtype, K, o16)), wt.data.nbytes + 2 * n_out * K)
        xh = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
        of, oh = cupy.empty((M, n_out), np.float32), cupy.empty((M, n_out), np.float16)
        row(f"  gemm fp16->fp32 M{M} N{n_out} K{K}", gpu_us(lambda: blas.gemm(of, xh, o16, trans_b=True)), flops=2 * M * n_out * K)
        row("  gemm fp16->fp16", gpu_us(lambda: blas.gemm(oh, xh, o16, trans_b=True)), flops=2 * M * n_out * K)
        xf = xh.astype(np.float32)
        row("  kernels.matmul (table) fp32 x", gpu_us(lambda: kernels.matmul(xf, wt.data, wt.qtype, n_out, out=of)),
            flops=2 * M * n_out * K)
    return 0


if __name__ == "__main__":
    sys.exit(main())
