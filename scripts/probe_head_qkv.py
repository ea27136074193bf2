"""Probe: the 7B teacher's LM head and q/k/v products, the old way and through kernels/decode_ahead.py.

Pure GPU times (each form 10 times inside one CUDA graph, median of 5 replays / 10, as
probe_teacher_ops.py), with cuBLAS on the pre-decoded fp16 weight and the copy bandwidth in the same run:

  LM head (152064 x 3584 Q6_K, random blocks) at M tokens: HEAD_ROWS slabs through kernels.matmul
  (dequant_linked_cublas) and a float16 copy into the span (the ninth stop's lm_head), matmul_ahead
  into float16 and float32, cuBLAS fp16 on the decoded head (the ceiling), the decode alone (direct
  and staged Q6_K kernels);
  q, k, v of block 0 at B x T tokens (fp16 x): three products + bias adds + two ropes + three casts,
  against matmul_stacked + qkv_rope_split; cuBLAS on the stacked decoded weights.

    python3 scripts/probe_head_qkv.py [--m 512 1024 4096] [--batch 8] [--seq 512]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout first
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[512, 1024, 4096], help="LM head token counts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    args = p.parse_args(argv)
    from q4kdistill import backend

    if not backend.on_gpu():
        print("probe_head_qkv: needs a CUDA GPU", file=sys.stderr)
        return 2
    import cupy

    import kernels
    from kernels import decode_ahead
    from kernels.blas import gemm
    from kernels.fused_rope import qkv_rope_split, rope_apply
    from kernels.linked import decode_f16_linked, to_f16
    from probe_teacher_ops import gpu_us, row
    from q4kdistill.formats import quants
    from q4kdistill.student.ops.rope import rope_tables

    rng = np.random.default_rng(0)
    print(f"device {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    src = cupy.empty(1 << 28, np.uint8)
    dst = cupy.empty_like(src)
    row("copy 256 MiB (read + write)", gpu_us(lambda: cupy.copyto(dst, src)), nbytes=2 * src.nbytes)
    del src, dst

    V, K, R = 152064, 3584, 16384
    w = cupy.asarray(quants.random_blocks("Q6_K", V, K, rng))
    w16 = cupy.empty((V, K), np.float16)
    decode_f16_linked(w, "Q6_K", K, w16)
    slab = cupy.empty((R, K), np.float16)

    def decode_all(staged):
        for r0 in range(0, V, R):
            r1 = min(V, r0 + R)
            decode_f16_linked(w[r0:r1], "Q6_K", K, slab[:r1 - r0], staged=staged)

    moved = w.nbytes + 2 * V * K
    row("head decode, direct Q6_K (16384-row slabs)", gpu_us(lambda: decode_all(False)), nbytes=moved)
    row("head decode, staged Q6_K", gpu_us(lambda: decode_all(True)), nbytes=moved)
    for M in args.m:
        x = cupy.asarray(rng.standard_normal((M, K)).astype(np.float32))
        x16 = to_f16(x)
        o16 = cupy.empty((M, V), np.float16)
        o32 = cupy.empty((M, V), np.float32)
        flops = 2.0 * M * V * K

        def old():
            for r0 in range(0, V, R):
                r1 = min(V, r0 + R)
                o16[:, r0:r1] = kernels.matmul(x, w[r0:r1], "Q6_K", r1 - r0, variant="dequant_linked_cublas")

        row(f"M={M} head: slabs + fp16 copy (ninth stop)", gpu_us(old), flops=flops)
        row(f"M={M} head: matmul_ahead -> fp16", gpu_us(lambda: decode_ahead.matmul_ahead(x, w, "Q6_K", V, o16)), flops=flops)
        row(f"M={M} head: matmul_ahead -> fp32", gpu_us(lambda: decode_ahead.matmul_ahead(x, w, "Q6_K", V, o32)), flops=flops)
        row(f"M={M} head: cuBLAS fp16 on the decoded head", gpu_us(lambda: gemm(o16, x16, w16, trans_b=True)), flops=flops)
        del o16, o32
    del w, w16, slab

    H, KV, D, T = 28, 4, 128, args.seq
    M = args.batch * T
    parts = [(cupy.asarray(quants.random_blocks(q, n, K, rng)), q, n) for q, n in (("Q4_K", H * D), ("Q4_K", KV * D), ("Q6_K", KV * D))]
    biases = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for _, _, n in parts]
    h16 = cupy.asarray(rng.standard_normal((M, K)).astype(np.float16))
    cos, sin = rope_tables(cupy.arange(T), D, 1e6, cupy)
    flops = 2.0 * M * K * (H + 2 * KV) * D

    def separate():
        q = kernels.matmul(h16, *parts[0])
        k = kernels.matmul(h16, *parts[1])
        v = kernels.matmul(h16, *parts[2])
        q += biases[0]
        k += biases[1]
        v += biases[2]
        q = q.reshape(args.batch, T, H, D)
        k = k.reshape(args.batch, T, KV, D)
        rope_apply(q, "neox", cos=cos, sin=sin)
        rope_apply(k, "neox", cos=cos, sin=sin)
        return to_f16(q), to_f16(k), to_f16(v)

    def fused():
        y = decode_ahead.matmul_stacked(h16, parts)
        return qkv_rope_split(y, T, H, KV, D, "neox", cos, sin, biases=biases, dtype=np.float16)

    row(f"q,k,v {args.batch}x{T}: 3 products, biases, ropes, casts", gpu_us(separate), flops=flops)
    row(f"q,k,v {args.batch}x{T}: stacked product + qkv_rope_split", gpu_us(fused), flops=flops)
    y = cupy.empty((M, (H + 2 * KV) * D), np.float32)
    wst = cupy.empty(((H + 2 * KV) * D, K), np.float16)
    row(f"q,k,v {args.batch}x{T}: cuBLAS on the stacked decoded weights", gpu_us(lambda: gemm(y, h16, wst, trans_b=True)), flops=flops)
    row(f"q,k,v {args.batch}x{T}: qkv_rope_split alone", gpu_us(
        lambda: qkv_rope_split(y, T, H, KV, D, "neox", cos, sin, biases=biases, dtype=np.float16)), nbytes=y.nbytes * 1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
