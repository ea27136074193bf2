"""Measure the ceilings the kernel targets are judged against (GPU only), in one run:

    python3 scripts/probe_ceilings.py [--json OUT.json]

* copy bandwidth (device-to-device, read + write; the benchmark's denominator),
* read-only streaming bandwidth (16-byte loads, no stores): the most any GEMV can read per second,
* cuBLAS fp16 GEMV (M=1) on the LM-head shape: how close cuBLAS itself streams to those two,
* the warp-level tensor-core peak: mma.sync m16n8k16 f16 x f16 -> f32 and m16n8k32 s8 x s8 -> s32
  (the instructions a kernel linked from Numba can use; cuBLAS on Hopper uses wgmma),
* cuBLAS fp16 GEMM at M = 512 on the benchmark's shapes, in TFLOP/s.

The probe kernels are tiny CUDA C functions linked into Numba kernels like kernels/linked.py.
Times: CUDA events around several launches after a warm-up, median of 5.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One mma.sync throughput loop per instruction: 8 independent accumulators per warp, register
# operands only; the result is kept alive by a store that practically never happens.
MMA_PEAK = r'''
extern "C" __device__ int {name}({acc}* __restrict__ out, int iters) {{
    u32 a0 = {one} ^ threadIdx.x, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, b0 = a0 + 4, b1 = a0 + 5;
    {acc} c[8][4];
    #pragma unroll
    for (int j = 0; j < 8; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0;
    for (int i = 0; i < iters; ++i) {{
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            asm volatile("mma.sync.aligned.{shape}.row.col.{types} {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, {{%0,%1,%2,%3}};"
                         : "+{reg}"(c[j][0]), "+{reg}"(c[j][1]), "+{reg}"(c[j][2]), "+{reg}"(c[j][3])
                         : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }}
    {acc} s = 0;
    #pragma unroll
    for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
    if (s == {acc}(12345)) out[0] = s;
    return 0;
}}
'''

SOURCE = r'''
typedef unsigned int u32;
extern "C" __device__ int read_stream(const uint4* __restrict__ p, long long n, u32* __restrict__ out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    u32 acc = 0;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride), d = __ldg(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) { const uint4 a = __ldg(p + i); acc ^= a.x ^ a.y ^ a.z ^ a.w; }
    if (acc == 0x9E3779B9u) out[0] = acc;        // keeps the loads; practically never stores
    return 0;
}
'''


SOURCE += MMA_PEAK.format(name="mma_f16_peak", acc="float", one="0x3C003C00u", reg="f", shape="m16n8k16",
                          types="f32.f16.f16.f32")
SOURCE += MMA_PEAK.format(name="mma_s8_peak", acc="int", one="0x01010101u", reg="r", shape="m16n8k32",
                          types="s32.s8.s8.s32")


def kernels():
    from numba import cuda, types

    from kernels.linked import data_ptr

    path = os.path.join(tempfile.gettempdir(), "q4kdistill_probe_ceilings.cu")
    with open(path, "w") as f:
        f.write(SOURCE)
    P, I32, I64 = types.voidptr, types.int32, types.int64
    rs = cuda.declare_device("read_stream", types.int32(P, I64, P), link=[path], abi="c")
    mf = cuda.declare_device("mma_f16_peak", types.int32(P, I32), link=[path], abi="c")
    mi = cuda.declare_device("mma_s8_peak", types.int32(P, I32), link=[path], abi="c")

    @cuda.jit
    def k_read(p, n, out):
        rs(data_ptr(p), np.int64(n), data_ptr(out))

    @cuda.jit
    def k_f16(out, iters):
        mf(data_ptr(out), np.int32(iters))

    @cuda.jit
    def k_s8(out, iters):
        mi(data_ptr(out), np.int32(iters))

    return k_read, k_f16, k_s8


def timed(cp, fn, reps=5):
    fn()
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT.json", help="also write the numbers as JSON")
    args = ap.parse_args()
    from q4kdistill import backend

    if not backend.on_gpu():
        sys.exit("probe_ceilings.py needs a CUDA GPU (CuPy)")
    import cupy as cp

    from kernels._device import launch

    backend.no_array_interface_sync()
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    k_read, k_f16, k_s8 = kernels()
    res = {"gpu": backend.gpu_name(), "sms": sms}

    nbytes = 2 << 30                                   # 2 GiB: far beyond the L2
    src = cp.empty(nbytes, cp.uint8)
    src[:] = 1
    dst = cp.empty_like(src)
    t = timed(cp, lambda: [dst.__setitem__(Ellipsis, src) for _ in range(3)]) / 3
    res["copy_GBps"] = 2 * nbytes / t / 1e9
    sink = cp.zeros(1, cp.uint32)
    n16 = nbytes // 16
    best = 0.0
    for blocks_per_sm, threads in ((4, 256), (8, 256), (16, 256), (8, 512), (32, 128)):
        t = timed(cp, lambda: [launch(k_read, sms * blocks_per_sm, threads, src.view(cp.uint32).reshape(-1), n16, sink)
                               for _ in range(3)]) / 3
        bw = nbytes / t / 1e9
        res[f"read_GBps_{blocks_per_sm}x{threads}"] = bw
        best = max(best, bw)
    res["read_GBps"] = best
    dst = None

    # cuBLAS fp16 GEMV on the LM head, the denominator of the "x cuBLAS" ratios at M = 1
    K, N = 3584, 152064
    ws = [cp.random.standard_normal((N, K), dtype=cp.float32).astype(cp.float16) for _ in range(3)]
    x = cp.random.standard_normal((1, K), dtype=cp.float32).astype(cp.float16)
    t = timed(cp, lambda: [cp.matmul(x, w.T) for w in ws]) / 3
    res["cublas_gemv_lm_head_us"] = t * 1e6
    res["cublas_gemv_lm_head_GBps"] = N * K * 2 / t / 1e9
    ws = None

    out = cp.zeros(1, cp.float32)
    iters, blocks, threads = 1024, sms * 8, 256
    flops = blocks * (threads // 32) * iters * 8 * 2 * 16 * 8 * 16
    res["mma_sync_f16_f32_TFLOPs"] = flops / timed(cp, lambda: launch(k_f16, blocks, threads, out, iters)) / 1e12
    outi = cp.zeros(1, cp.int32)
    ops = blocks * (threads // 32) * iters * 8 * 2 * 16 * 8 * 32
    res["mma_sync_s8_s32_TOPs"] = ops / timed(cp, lambda: launch(k_s8, blocks, threads, outi, iters)) / 1e12

    for K, N in ((3584, 3584), (3584, 18944), (18944, 3584), (3584, 152064)):
        for M in (512, 4096):
            ws = [cp.random.standard_normal((N, K), dtype=cp.float32).astype(cp.float16) for _ in range(2)]
            x = cp.random.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
            t = timed(cp, lambda: [cp.matmul(x, w.T) for w in ws]) / 2
            res[f"cublas_gemm_{K}x{N}_M{M}_TFLOPs"] = 2 * M * N * K / t / 1e12
            ws = None

    for k, v in res.items():
        print(f"{k:40} {v:.1f}" if isinstance(v, float) else f"{k:40} {v}")
    print(f"read / copy = {res['read_GBps'] / res['copy_GBps']:.3f};  cuBLAS GEMV / copy = "
          f"{res['cublas_gemv_lm_head_GBps'] / res['copy_GBps']:.3f};  4x cuBLAS at M=1 on the LM head needs "
          f"{4 * 0.28125 * res['cublas_gemv_lm_head_GBps']:.0f} GB/s of Q4_K streaming")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
