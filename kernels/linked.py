"""Variants whose inner body is linked CUDA C (csrc/), called from Numba kernels.

numba-cuda has no first-class 16-byte loads, dp4a or 32-bit index arithmetic; the issue allows a
variant to link a CUDA C device function (``cuda.declare_device(..., link=...)``). Each Numba
kernel here is a thin wrapper: it turns its array arguments into data pointers and calls one
device function of a csrc/ file, which NVRTC compiles when the kernel is first launched:

    csrc/quantize_x.cu   q8 quantizers of x (per 32, fragment order, per 256)
    csrc/gemv_dp4a.cu    Q4_K / Q6_K GEMV on int8 x with dp4a
    csrc/gemv_f32.cu     Q4_K GEMV on float32 x, exact
    csrc/gemv_mma.cu     Q4_K / Q6_K GEMV on int8 x with the int8 tensor cores
    csrc/decode_cast.cu  decode to fp16, fp32 -> fp16 cast
    csrc/gemm_mma.cu     Q4_K / Q6_K GEMM on fp16 x with the fp16 tensor cores, decode in the product
    csrc/gemm_wgmma.cu   Q4_K / Q6_K GEMM on fp16 x with Hopper's wgmma, W decoded once per CTA tile
    csrc/gemm_wgmma_rs.cu  Q4_K / Q6_K GEMM on wgmma, W decoded into the register A operand, warp-specialised
    csrc/*.cuh           shared: common.cuh, block_decode.cuh, block_layouts.cuh (generated), tile_order.cuh, wgmma_ops.cuh (generated)

NVRTC gets no include path, so source_with() inlines a file's ``#include "x.cuh"`` lines (each
header once) and appends what the caller adds. Templates are instantiated on demand: for
(qtype, M, R, NW) that text with one ``extern "C"`` wrapper appended is written to a cache
directory and linked.

GPU only (the Numba simulator cannot run C). Their logic is checked on the GPU against the same
float64 reference as every variant (tests/test_kernels_gpu.py); the CPU suite checks that the
source, the registry entries and the error for a CPU call are in order.

    gemv_q8_linked(x, w_raw, qtype, n_out, out, rows, warps)   Q4_K / Q6_K, M = 1..16, int8 x, dp4a
    gemv_mma_linked(x, w_raw, qtype, n_out, out, warps)        Q4_K / Q6_K, M = 1..16, int8 x, tensor cores
    gemv_mma_rows_linked(x, w_raw, qtype, n_out, out, warps)   Q4_K, the same, warps split rows (x shared)
    gemv_f32_linked(x, w_raw, qtype, n_out, out, rows, warps)  Q4_K, M = 1..4, float32 x, exact, one kernel
    decode_f16_linked(w_raw, qtype, K, out16)                  Q4_K / Q6_K -> fp16 [n, K]
    dequant_linked_cublas(x, w_raw, qtype, n_out, out)         decode_f16_linked + cuBLAS
    gemm_mma_linked(x, w_raw, qtype, n_out, out, bm, bn, wm, wn)  Q4_K / Q6_K, any M, fp16 x, mma, no scratch
                                                               (its Numba twin: gemm_mma_twin.py)
    gemm_wgmma_linked(x, w_raw, qtype, n_out, out, bn, nwg, stages, swz)  the same on sm_90 with wgmma,
                                                               fp32 or fp16 out (its twin: gemm_wgmma_twin.py)
    gemm_wgmma_rs_linked(x, w_raw, qtype, n_out, out, bx, xs, ws, tma, mt)  Q4_K / Q6_K on sm_90, W decoded into
                                                               wgmma's register A operand, warp-specialised (its
                                                               twin: gemm_wgmma_rs_twin.py)
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import cuda, types
from numba.cuda.extending import intrinsic

from q4kdistill.formats.block_layouts import LAYOUTS
from q4kdistill.errors import Q4KError

from ._device import SIMULATOR, launch
from .registry import DECODE_SCRATCH
from .weights import address, columns, qtype_name

CSRC = Path(__file__).with_name("csrc")
JOBS = ("quantize_x.cu", "gemv_dp4a.cu", "gemv_f32.cu", "gemv_mma.cu", "decode_cast.cu", "gemm_mma.cu", "gemm_wgmma.cu",
        "gemm_wgmma_s8.cu", "gemm_wgmma_rs.cu")
QTYPES = ("Q4_K", "Q6_K")                                # the types csrc/ decodes
TEMPLATES = {q: LAYOUTS[q].c_name for q in QTYPES}       # prefix of their C functions: "q4k", "q6k"
QUANT_THREADS = 256
DECODE_THREADS = 128


@intrinsic
def data_ptr(typingctx, a):
    """The data pointer of an array, as void* for a C function."""
    sig = types.voidptr(a)

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, value=args[0])
        return builder.bitcast(arr.data, ir.IntType(8).as_pointer())

    return sig, codegen


def lto_available() -> bool:
    """Whether numba-cuda links with nvJitLink here (the ``nvidia-nvjitlink`` wheel, which the ``gpu`` extra
    installs through ``numba-cuda[cu13]``, or a CUDA toolkit's libnvJitLink)."""
    from numba.cuda.decorators import _have_nvjitlink

    return bool(_have_nvjitlink())


_warned_no_lto = []


def linked_jit(max_registers=None):
    """cuda.jit for a Numba kernel that calls linked CUDA C, with link-time optimisation: NVRTC compiles the C
    to LTO-IR and nvJitLink inlines it into the kernel, so ptxas sees one kernel. Without it the C is a
    separately compiled ABI function: ptxas spills around the call and serialises every wgmma pipeline
    (its note C7509, "the presence of Extern calls"; kernels/link_check.py shows both on the CPU). numba-cuda
    already links with LTO where it finds nvJitLink; this says so explicitly and, without nvJitLink, warns
    once instead of slowing down silently."""
    lto = lto_available()
    if not lto and not SIMULATOR and not _warned_no_lto:
        _warned_no_lto.append(True)
        import warnings

        warnings.warn("q4kdistill: nvJitLink not found (pip install nvidia-nvjitlink): the linked CUDA C kernels "
                      "are linked without LTO, and the wgmma ones run serialised", RuntimeWarning, stacklevel=2)
    opts = {"lto": True} if lto else {}
    if max_registers is not None:
        opts["max_registers"] = max_registers
    return cuda.jit(**opts)


def _require_gpu(what: str):
    if SIMULATOR:
        raise Q4KError(f"{what} links CUDA C and runs on a GPU only (the Numba simulator cannot run it)")


def _inline(name: str, seen: set) -> list:
    """Lines of csrc/`name` with each `#include "x"` replaced by x's lines (every file once)."""
    if name in seen:
        return []
    seen.add(name)
    out = []
    for line in (CSRC / name).read_text().splitlines():
        inc = line.strip()
        if inc.startswith("#include"):
            parts = inc.split('"')
            if len(parts) != 3:
                raise Q4KError(f"csrc/{name}: only #include \"file\" of csrc/ is supported, got {inc!r}")
            out += _inline(parts[1], seen)
        else:
            out.append(line)
    return out


def source_text(*files: str) -> str:
    """The csrc/ files (default: every job of JOBS), their headers inlined once: one text NVRTC
    compiles without an include path."""
    seen: set = set()
    return "\n".join(line for f in (files or JOBS) for line in _inline(f, seen)) + "\n"


def source_with(extra: str = "", *files: str) -> str:
    """Path of source_text(*files) with `extra` appended, written once to a cache directory."""
    return cached_source(source_text(*files) + "\n" + extra, "_".join(Path(f).stem for f in files) or "csrc")


def cached_source(text: str, stem: str) -> str:
    """Path of a .cu file holding `text` in $Q4KDISTILL_CSRC_CACHE (or the temp folder), named by
    `stem` and a hash of the text, written once and atomically (NVRTC links files by path)."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    folder = Path(os.environ.get("Q4KDISTILL_CSRC_CACHE", Path(tempfile.gettempdir()) / "q4kdistill_csrc"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}_{digest}.cu"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


_PTR, _I32 = types.voidptr, types.int32


@functools.lru_cache(maxsize=None)
def _quantize_kernel():
    fn = cuda.declare_device("q8_quantize", types.int32(_PTR, _PTR, _PTR, _I32, _PTR, _I32),
                             link=[source_with("", "quantize_x.cu")], abi="c")

    @linked_jit()
    def kernel(x, xq, xds, nblocks, zero, n_zero):
        fn(data_ptr(x), data_ptr(xq), data_ptr(xds), np.int32(nblocks), data_ptr(zero), np.int32(n_zero))

    return kernel


@functools.lru_cache(maxsize=None)
def _quantize_frag_kernel(per256: bool = False):
    """q8_quantize_frag (x per 32) or q8k_quantize_frag (per 256): same arguments, same threads."""
    fn = cuda.declare_device("q8k_quantize_frag" if per256 else "q8_quantize_frag",
                             types.int32(_PTR, _I32, _I32, _I32, _PTR, _PTR, _PTR, _I32),
                             link=[source_with("", "quantize_x.cu")], abi="c")

    @linked_jit()
    def kernel(x, M, K, n_tiles, xf, dsf, zero, n_zero):
        fn(data_ptr(x), np.int32(M), np.int32(K), np.int32(n_tiles), data_ptr(xf), data_ptr(dsf), data_ptr(zero),
           np.int32(n_zero))

    return kernel


def gemv_source(qtype: str, M: int, rows: int, warps: int) -> tuple:
    """(file, name, extern "C" wrapper) of q{4,6}k_gemv<M, rows, warps>."""
    tmpl = TEMPLATES[qtype]
    name = f"{tmpl}_gemv_m{M}_r{rows}_w{warps}"
    return "gemv_dp4a.cu", name, (
        f'extern "C" __device__ int {name}(const u8* w, int rb, int n, int K, const u32* xq, '
        f'const float2* xds, float* out) {{ {tmpl}_gemv<{M}, {rows}, {warps}>(w, rb, n, K, xq, xds, out); return 0; }}\n')


def f32_source(M: int, rows: int, warps: int) -> tuple:
    """(file, name, extern "C" wrapper) of q4k_f32<M, rows, warps>."""
    name = f"q4k_f32_m{M}_r{rows}_w{warps}"
    return "gemv_f32.cu", name, (
        f'extern "C" __device__ int {name}(const u8* w, int rb, int n, int K, const float* x, float* out) '
        f'{{ q4k_f32<{M}, {rows}, {warps}>(w, rb, n, K, x, out); return 0; }}\n')


def mma_source(qtype: str, n_tiles: int, warps: int, stages: int = 4, rows: bool = False, x256: bool = False) -> tuple:
    """(file, name, extern "C" wrapper) of q4k_mma / q4k_mma_rows / q6k_mma (see mma_kernel)."""
    if qtype == "Q4_K":
        tmpl = "q4k_mma_rows" if rows else "q4k_mma"
        name = f"{tmpl}_t{n_tiles}_w{warps}_s{stages}" + ("_xk" if x256 else "")
        call, xt = f"{tmpl}<{n_tiles}, {warps}, {stages}, {'true' if x256 else 'false'}>", "uint2"
    else:
        name, call, xt = f"q6k_mma_t{n_tiles}_w{warps}", f"q6k_mma<{n_tiles}, {warps}>", "u32"
    return "gemv_mma.cu", name, (
        f'extern "C" __device__ int {name}(const u8* w, int rb, int n, int K, int M, const {xt}* xq, '
        f'const float2* xds, float* out) {{ {call}(w, rb, n, K, M, xq, xds, out); return 0; }}\n')


@functools.lru_cache(maxsize=None)
def gemv_kernel(qtype: str, M: int, rows: int, warps: int):
    """The Numba kernel for q{4,6}k_gemv<M, rows, warps>: grid = ceil(n_out / rows) blocks of 32*warps."""
    file, name, extra = gemv_source(qtype, M, rows, warps)
    fn = cuda.declare_device(name, types.int32(_PTR, _I32, _I32, _I32, _PTR, _PTR, _PTR),
                             link=[source_with(extra, file)], abi="c")

    @linked_jit()
    def kernel(w, row_bytes, n_out, K, xq, xds, out):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_out), np.int32(K), data_ptr(xq), data_ptr(xds), data_ptr(out))

    return kernel


@functools.lru_cache(maxsize=None)
def f32_kernel(M: int, rows: int, warps: int):
    """The Numba kernel for q4k_f32<M, rows, warps>: grid = ceil(n_out / rows) blocks of 32*warps."""
    file, name, extra = f32_source(M, rows, warps)
    fn = cuda.declare_device(name, types.int32(_PTR, _I32, _I32, _I32, _PTR, _PTR), link=[source_with(extra, file)], abi="c")

    @linked_jit()
    def kernel(w, row_bytes, n_out, K, x, out):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_out), np.int32(K), data_ptr(x), data_ptr(out))

    return kernel


@functools.lru_cache(maxsize=None)
def mma_kernel(qtype: str, n_tiles: int, warps: int, stages: int = 4, rows: bool = False, x256: bool = False):
    """The Numba kernel for q4k_mma<n_tiles, warps, stages, x256> (x in fragment order; rows=True:
    q4k_mma_rows, warps split rows; x256: x scaled per 256, see quantize_q8_fragments) or
    q6k_mma<n_tiles, warps> (plain q8 x): grid = (ceil(n_out / 16), split) blocks of 32*warps
    (rows=True: ceil(n_out / (16*warps)))."""
    file, name, extra = mma_source(qtype, n_tiles, warps, stages, rows, x256)
    fn = cuda.declare_device(name, types.int32(_PTR, _I32, _I32, _I32, _I32, _PTR, _PTR, _PTR),
                             link=[source_with(extra, file)], abi="c")

    @linked_jit()
    def kernel(w, row_bytes, n_out, K, M, xq, xds, out):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_out), np.int32(K), np.int32(M), data_ptr(xq), data_ptr(xds),
           data_ptr(out))

    return kernel


@functools.lru_cache(maxsize=None)
def _cast_kernel():
    fn = cuda.declare_device("f32_to_f16", types.int32(_PTR, _PTR, _I32), link=[source_with("", "decode_cast.cu")], abi="c")

    @linked_jit()
    def kernel(x, out, n8):
        fn(data_ptr(x), data_ptr(out), np.int32(n8))

    return kernel


def to_f16(x):
    """x float32 -> a new float16 array (16-byte loads and stores; CuPy's astype reached ~40 % of
    the copy bandwidth on an H100). float16 input is returned as is."""
    import cupy

    if x.dtype == np.float16:
        return x
    x = cupy.ascontiguousarray(x, dtype=np.float32)
    out = cupy.empty(x.shape, dtype=np.float16)
    if x.size % 8 or address(x) % 16:
        out[...] = x
        return out
    n8 = x.size // 8
    launch(_cast_kernel(), (n8 + 255) // 256, 256, x.reshape(-1), out.reshape(-1).view(np.uint32), n8)
    return out


@functools.lru_cache(maxsize=None)
def _decode_kernel(qtype: str, staged: bool = False):
    name = f"{TEMPLATES[qtype]}_decode_f16" + ("_staged" if staged else "")
    fn = cuda.declare_device(name, types.int32(_PTR, _I32, _I32, _I32, _PTR),
                             link=[source_with("", "decode_cast.cu")], abi="c")

    @linked_jit()
    def kernel(w, row_bytes, n_rows, K, out):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_rows), np.int32(K), data_ptr(out))

    return kernel


def _f32_aligned(x):
    """x as a C-contiguous float32 CuPy array starting 16-byte aligned (copied only if it is not)."""
    import cupy

    x = cupy.ascontiguousarray(x, dtype=np.float32)
    return x.copy() if address(x) % 16 else x


def _check(w_raw, qtype, n_out):
    q = qtype_name(qtype)
    if q not in TEMPLATES:
        raise Q4KError(f"linked kernels decode {', '.join(TEMPLATES)}, not {q}")
    K = columns(w_raw, q, n_out)
    if not w_raw.flags.c_contiguous:
        raise Q4KError("linked kernels need C-contiguous raw weights")
    if q == "Q4_K" and (address(w_raw) % 16 or w_raw.shape[1] % 16):
        raise Q4KError("Q4_K rows must start 16-byte aligned for the linked kernels")
    if address(w_raw) % 4:
        raise Q4KError("raw weights must start 4-byte aligned for the linked kernels")
    return q, K


def _gemv_args(name, x, w_raw, qtype, n_out, m_max, qtypes=("Q4_K", "Q6_K")):
    """(qtype name, K, M) after the checks every linked GEMV makes: a GPU, valid rows, a type it
    decodes, 1..m_max activation rows."""
    _require_gpu(name)
    q, K = _check(w_raw, qtype, n_out)
    if q not in qtypes:
        raise Q4KError(f"{name} decodes {', '.join(qtypes)}, not {q}")
    M = x.shape[0]
    if not 1 <= M <= m_max:
        raise Q4KError(f"{name} takes 1..{m_max} activation rows, got {M}")
    return q, K, M


def quantize_q8(x, zero=None):
    """(xq uint32 [M*K/4], xds float32 [M*K/32, 2]) for x float32 [M, K]: int8 per 32 values, (d, d*sum q).
    `zero`, a float32 array, is set to 0 by the same kernel (for the split-K GEMVs)."""
    import cupy

    x = _f32_aligned(x)
    nblocks = x.size // 32
    xq = cupy.empty(x.size // 4, dtype=np.uint32)
    xds = cupy.empty((nblocks, 2), dtype=np.float32)
    threads = 8 * nblocks
    z = zero.reshape(-1) if zero is not None else xds.reshape(-1)
    launch(_quantize_kernel(), (threads + QUANT_THREADS - 1) // QUANT_THREADS, QUANT_THREADS, x.reshape(-1), xq, xds,
           nblocks, z, z.size if zero is not None else 0)
    return xq, xds


def quantize_q8_fragments(x, n_tiles, zero=None, per256=False):
    """x float32 [M, K] -> (xf uint32 [n_tiles*K/32*64], dsf float32 [n_tiles*K/32*8*2]): q8 per 32 values
    in the mma B-fragment order of csrc/gemv_mma.cu (rows beyond M are zeros). `zero`, a float32
    array, is set to 0 by the same kernel (the split-K GEMV accumulates into it).
    per256: one scale per 256 values (llama.cpp's Q8_K) and integer sums per 32 in dsf
    (csrc q8k_quantize_frag), for the kernels built with x256=True."""
    import cupy

    x = _f32_aligned(x)
    M, K = x.shape
    entries = n_tiles * (K // 32) * 32
    xf = cupy.empty(2 * entries, dtype=np.uint32)
    dsf = cupy.empty(2 * n_tiles * (K // 32) * 8, dtype=np.float32)
    z = zero.reshape(-1) if zero is not None else dsf
    # per256: the same threads, a warp = one (tile, super-block, column); dsf then holds int sums and d
    launch(_quantize_frag_kernel(per256), (entries + QUANT_THREADS - 1) // QUANT_THREADS, QUANT_THREADS,
           x.reshape(-1), M, K, n_tiles, xf, dsf, z, z.size if zero is not None else 0)
    return xf, dsf


def _k_split(blocks: int, want_blocks: int, nsb: int, sb_per_split: int) -> int:
    """How many ways to split K: about `want_blocks` blocks in all when there are few row blocks
    (a short, wide matrix), each split keeping at least `sb_per_split` of the nsb super-blocks."""
    return max(1, min(-(-want_blocks // blocks), nsb // sb_per_split))


def mma_split(n_out: int, K: int, warps: int) -> int:
    """Blocks along K for the tensor-core GEMV: enough warps to fill the GPU (about 132 SMs x 16)
    when there are few 16-row tiles, at least 2 super-blocks per warp (the warps split K too)."""
    return _k_split(-(-n_out // 16), -(-2112 // warps), K // 256, 2 * warps)


def mma_rows_split(n_out: int, K: int, warps: int, resident: int = 4) -> int:
    """Blocks along K for q4k_mma_rows: about `resident` blocks per SM (132 SMs) when there are few
    row blocks, each block keeping at least 2 super-blocks."""
    return _k_split(-(-n_out // (16 * warps)), 132 * resident, K // 256, 2)


def _n_tiles(M: int) -> int:
    """8-row activation tiles of the tensor-core GEMVs."""
    return 1 if M <= 8 else 2


def q8_workspace(M: int, K: int) -> dict:
    """quantize_q8's buffers for x [M, K]: int8 x and (d, d * sum q) per 32 values."""
    return {"x int8": M * K, "x scales": M * K // 32 * 8}


def q8_fragments_workspace(M: int, K: int) -> dict:
    """quantize_q8_fragments' buffers for x [M, K] (per 32 or per 256 alike): int8 x in fragment
    order and 64 bytes of scales per 8-row tile and 32 values."""
    n_tiles = _n_tiles(M)
    return {"x int8 fragments": 8 * n_tiles * K, "x fragment scales": 2 * n_tiles * K}


def gemv_q8_linked(x, w_raw, qtype, n_out, out, rows=2, warps=4):
    """out[:] ~= x @ W.T for Q4_K / Q6_K rows, M <= 16, x rounded to int8 per 32 values."""
    q, K, M = _gemv_args("gemv_q8_linked", x, w_raw, qtype, n_out, 16)
    xq, xds = quantize_q8(x)
    kernel = gemv_kernel(q, M, rows, warps)
    launch(kernel, (n_out + rows - 1) // rows, 32 * warps, w_raw.reshape(-1), w_raw.shape[1], n_out, K, xq, xds, out)
    return out


def gemv_q8_workspace(qtype, M, N, K, x_dtype, rows=2, warps=4):
    return q8_workspace(M, K)


def gemv_f32_linked(x, w_raw, qtype, n_out, out, rows=2, warps=4):
    """out[:] = x @ W.T for Q4_K rows, M <= 4, float32 x used as is (FP32-exact), one kernel."""
    q, K, M = _gemv_args("gemv_f32_linked", x, w_raw, qtype, n_out, 4, ("Q4_K",))
    x = _f32_aligned(x)
    launch(f32_kernel(M, rows, warps), (n_out + rows - 1) // rows, 32 * warps, w_raw.reshape(-1), w_raw.shape[1],
           n_out, K, x.reshape(-1), out)
    return out


def gemv_f32_workspace(qtype, M, N, K, x_dtype, rows=2, warps=4):
    """Nothing: x is read as it is (a 16-byte aligned float32 array, as CuPy allocates them)."""
    return {}


def gemv_mma_linked(x, w_raw, qtype, n_out, out, warps=4, stages=4, x256=False):
    """out[:] ~= x @ W.T for Q4_K or Q6_K rows, M <= 16, x rounded to int8 per 32 values; int8 mma.sync
    (m16n8k32 per Q4_K sub-block of 32, m16n8k16 per Q6_K sub-block of 16).
    Short, wide matrices are split along K over blocks that add into out atomically (so the
    last bits of such results vary from run to run). x256 (Q4_K): x scaled per 256 values instead of
    32 (llama.cpp's Q8_K), so the sub-block scales apply in integers (fewer instructions, coarser x)."""
    q, K, M = _gemv_args("gemv_mma_linked", x, w_raw, qtype, n_out, 16)
    n_tiles = _n_tiles(M)
    if q == "Q6_K":                            # plain q8 x, W read straight from global memory (no ring)
        if x256:
            raise Q4KError("gemv_mma_linked: x256 is for Q4_K")
        split = mma_split(n_out, K, warps)
        xq, xds = quantize_q8(x, zero=out if split > 1 else None)
        launch(mma_kernel(q, n_tiles, warps), ((n_out + 15) // 16, split), 32 * warps, w_raw.reshape(-1),
               w_raw.shape[1], n_out, K, M, xq, xds, out)
        return out
    if n_tiles == 2:
        warps = min(warps, 2)                  # 40 KB of ring: 2 slots of 2 warps for 16 activation rows
    split = mma_split(n_out, K, warps)
    xf, dsf = quantize_q8_fragments(x, n_tiles, zero=out if split > 1 else None, per256=x256)
    launch(mma_kernel(q, n_tiles, warps, stages, x256=x256), ((n_out + 15) // 16, split), 32 * warps,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, xf, dsf, out)
    return out


def gemv_mma_workspace(qtype, M, N, K, x_dtype, warps=4, stages=4, x256=False):
    """Q6_K: quantize_q8's buffers; Q4_K: quantize_q8_fragments'. The split-K output is out itself."""
    return q8_workspace(M, K) if qtype == "Q6_K" else q8_fragments_workspace(M, K)


def gemv_mma_rows_linked(x, w_raw, qtype, n_out, out, warps=4, stages=4, split=None, x256=False):
    """As gemv_mma_linked for Q4_K, with the block's warps splitting rows instead of K: 16*warps rows
    per block, one x slot per block in the cp.async ring (a quarter of the x traffic at 4 warps).
    `split` (blocks along K, atomic adds) defaults to mma_rows_split."""
    q, K, M = _gemv_args("gemv_mma_rows_linked", x, w_raw, qtype, n_out, 16, ("Q4_K",))
    n_tiles = _n_tiles(M)
    if n_tiles * warps > 8:
        raise Q4KError(f"gemv_mma_rows_linked: {warps} warps fit the 48 KB ring for M <= 8 only, got M = {M}")
    split = split or mma_rows_split(n_out, K, warps)
    xf, dsf = quantize_q8_fragments(x, n_tiles, zero=out if split > 1 else None, per256=x256)
    launch(mma_kernel(q, n_tiles, warps, stages, rows=True, x256=x256), (-(-n_out // (16 * warps)), split), 32 * warps,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, xf, dsf, out)
    return out


def gemv_mma_rows_workspace(qtype, M, N, K, x_dtype, warps=4, stages=4, split=None, x256=False):
    return q8_fragments_workspace(M, K)


Q6K_DECODE_ENV = "Q4KDISTILL_Q6K_DECODE"      # "staged" | "direct" (default): q6k_decode_f16's two forms
Q6K_STAGE_WARPS = 4                            # decode_cast.cu's: super-blocks (warps) per staged block


def q6k_staged(staged=None) -> bool:
    """Whether Q6_K rows decode through q6k_decode_f16_staged (given, else $Q4KDISTILL_Q6K_DECODE).
    The same bits either way (tests/decode_emulate.cpp). Measured on an H200 (docs/perf.md, tenth stop,
    scripts/probe_head_qkv.py: the 7B's whole Q6_K head): direct 497 us (3.09 TB/s), staged 704 us
    (2.18 TB/s), so direct stays the default; the staged form is kept as an opt-in variant to study."""
    if staged is not None:
        return bool(staged)
    env = os.environ.get(Q6K_DECODE_ENV, "direct").strip() or "direct"
    if env not in ("staged", "direct"):
        raise Q4KError(f"{Q6K_DECODE_ENV}={env!r}: expected staged or direct")
    return env == "staged"


def decode_f16_linked(w_raw, qtype, K, out16, staged=None):
    """out16 [n, K] float16 = the rows of w_raw decoded (FP32 math, rounded once to fp16). staged (Q6_K):
    through shared memory (q6k_staged)."""
    _require_gpu("decode_f16_linked")
    n = w_raw.shape[0]
    q, K2 = _check(w_raw, qtype, n)
    if K2 != K or out16.shape != (n, K) or out16.dtype != np.float16 or not out16.flags.c_contiguous:
        raise Q4KError(f"decode_f16_linked: out must be float16 [{n}, {K}], C-contiguous")
    args = (w_raw.reshape(-1), w_raw.shape[1], n, K, out16.reshape(-1).view(np.uint32))
    if q == "Q6_K" and q6k_staged(staged):           # a block of 4 warps per 4 super-blocks of a row
        launch(_decode_kernel(q, True), (n, -(-(K // 256) // Q6K_STAGE_WARPS)), 32 * Q6K_STAGE_WARPS, *args)
        return out16
    octs = K // 8                                   # a thread writes 8 weights
    launch(_decode_kernel(q), (n, (octs + DECODE_THREADS - 1) // DECODE_THREADS), DECODE_THREADS, *args)
    return out16


_DECODE_STREAM: dict = {}   # device id -> the stream that decodes chunks ahead of the GEMMs


def dequant_linked_cublas(x, w_raw, qtype, n_out, out, out16=False, chunks=1):
    """out[:] = x @ W.T: W decoded by the linked kernel into the shared fp16 scratch, then cuBLAS.

    x may be float16 (used as is) or float32 (cast by to_f16). out16=False: cublasGemmEx with
    fp16 operands and FP32 output. out16=True: CuPy's fp16 matmul (fp16 output, as the cuBLAS
    baseline itself) cast to float32 -- one more fp16 rounding of the result (relative 2^-11),
    inside the same 2e-3 bound.

    chunks > 1 (GemmEx only): W's rows are decoded in `chunks` blocks on a second stream while
    cuBLAS multiplies the blocks already decoded, so the decode hides under a compute-bound GEMM.
    The scratch is still one matrix; the caller's stream waits for everything before it goes on."""
    _require_gpu("dequant_linked_cublas")
    import cupy

    from .blas import matmul
    from .scratch import gemm_f16_f32, scratch

    K = x.shape[1]
    w16 = scratch(cupy, n_out * K, np.float16).reshape(n_out, K)
    x16 = to_f16(x)
    if out16:
        decode_f16_linked(w_raw, qtype, K, w16)
        out[:] = matmul(x16, w16, trans_b=True)
        return out
    if chunks <= 1:
        decode_f16_linked(w_raw, qtype, K, w16)
        return gemm_f16_f32(x16, w16, out)
    main = cupy.cuda.get_current_stream()
    dev = cupy.cuda.Device().id
    side = _DECODE_STREAM.get(dev)
    if side is None:
        side = _DECODE_STREAM[dev] = cupy.cuda.Stream(non_blocking=True)
    side.wait_event(main.record())                 # the scratch is free once main's earlier GEMMs ran
    bounds = [n_out * i // chunks // 16 * 16 for i in range(chunks)] + [n_out]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        with side:
            decode_f16_linked(w_raw[a:b], qtype, K, w16[a:b])
            ready = side.record()
        main.wait_event(ready)
        gemm_f16_f32(x16, w16[a:b], out[:, a:b])
    return out


def dequant_linked_workspace(qtype, M, N, K, x_dtype, out16=False, chunks=1):
    """dequant_linked_cublas' buffers, all alive during the product: the shared fp16 scratch [N, K]
    (outlives the call), x in fp16 unless it came as fp16, and (out16) CuPy's fp16 product [M, N]."""
    return {DECODE_SCRATCH["float16"]: 2 * N * K, "x float16": 0 if x_dtype == "float16" else 2 * M * K,
            "product float16": 2 * M * N if out16 else 0}


# -- csrc/gemm_mma.cu: the fused GEMM on the fp16 tensor cores ----------------------------------
SMEM_LIMIT = 48 * 1024                 # static shared memory per block (Numba cannot raise it)
GEMM_W_CHUNKS = {"Q4_K": 3, "Q6_K": 10}   # 16-byte chunks of a W row one K step stages (GmW<Q>)
GEMM_XS = 64 + 8                       # x row stride in shared memory, halfs (64 per K step + 8 of padding)


def gemm_mma_stages(qtype: str, bm: int, bn: int, most: int = 3) -> int:
    """Slots of gemm_mma's cp.async ring: the most (<= `most`) whose shared memory fits 48 KB. A slot
    holds x [bm, 64 + 8] fp16 and `GEMM_W_CHUNKS` 16-byte chunks of each of the bn W rows."""
    slot = bm * GEMM_XS * 2 + bn * 16 * GEMM_W_CHUNKS[qtype]
    if slot > SMEM_LIMIT:
        raise Q4KError(f"gemm_mma: a {bm}x{bn} tile does not fit 48 KB of shared memory for {qtype}")
    return min(most, SMEM_LIMIT // slot)


def gemm_mma_source(qtype: str, bm: int, bn: int, wm: int, wn: int, stages: int) -> tuple:
    """(file, name, extern "C" wrapper) of gemm_mma<Q, bm, bn, wm, wn, stages>."""
    name = f"{TEMPLATES[qtype]}_gemm_mma_{bm}x{bn}_w{wm}x{wn}_s{stages}"
    return "gemm_mma.cu", name, (
        f'extern "C" __device__ int {name}(const u8* w, int rb, int n, int K, int M, const u16* x, float* out) '
        f'{{ gemm_mma<{qtype[1]}, {bm}, {bn}, {wm}, {wn}, {stages}>(w, rb, n, K, M, x, out); return 0; }}\n')


@functools.lru_cache(maxsize=None)
def gemm_mma_kernel(qtype: str, bm: int, bn: int, wm: int, wn: int, stages: int):
    """The Numba kernel for gemm_mma<...>: grid = ceil(M / bm) * ceil(n_out / bn) blocks (1-D, the C
    orders the tiles) of 32 * (bm / wm) * (bn / wn) threads."""
    file, name, extra = gemm_mma_source(qtype, bm, bn, wm, wn, stages)
    fn = cuda.declare_device(name, types.int32(_PTR, _I32, _I32, _I32, _I32, _PTR, _PTR),
                             link=[source_with(extra, file)], abi="c")

    @linked_jit()
    def kernel(w, row_bytes, n_out, K, M, x, out):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_out), np.int32(K), np.int32(M), data_ptr(x), data_ptr(out))

    return kernel


def gemm_tile_check(bm: int, bn: int, wm: int, wn: int):
    """Q4KError unless (bm, bn) splits into whole warp tiles of whole m16n8 tiles, 1..8 warps."""
    warps = (bm // wm) * (bn // wn) if wm and wn else 0
    if wm <= 0 or wn <= 0 or bm % wm or bn % wn or wm % 16 or wn % 8 or not 1 <= warps <= 8:
        raise Q4KError(f"gemm_mma: tile {bm}x{bn} with warp tiles {wm}x{wn} is not 1..8 warps of m16n8 tiles")
    return warps


def gemm_mma_linked(x, w_raw, qtype, n_out, out, bm=64, bn=64, wm=32, wn=32):
    """out[:] = x @ W.T for Q4_K or Q6_K rows, any M: W decoded inside the product (fp16, FP32 math,
    one rounding), fp16 x (float32 x is cast by to_f16), fp16 mma.sync with FP32 accumulation. No
    decode scratch. W must start 16-byte aligned (as CuPy allocates), out be C-contiguous [M, n_out]."""
    _require_gpu("gemm_mma_linked")
    import cupy

    q, K = _check(w_raw, qtype, n_out)
    warps = gemm_tile_check(bm, bn, wm, wn)
    if address(w_raw) % 16:
        raise Q4KError("gemm_mma_linked needs raw weights that start 16-byte aligned")
    if out.shape != (x.shape[0], n_out) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise Q4KError(f"gemm_mma_linked: out must be float32 [{x.shape[0]}, {n_out}], C-contiguous")
    M = x.shape[0]
    x16 = cupy.ascontiguousarray(to_f16(x))
    if address(x16) % 16:
        x16 = x16.copy()
    stages = gemm_mma_stages(q, bm, bn)
    launch(gemm_mma_kernel(q, bm, bn, wm, wn, stages), -(-n_out // bn) * -(-M // bm), 32 * warps,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, x16.reshape(-1).view(np.uint16), out)
    return out


def gemm_mma_workspace(qtype, M, N, K, x_dtype, **params):
    """No decode scratch: only x's fp16 copy when x comes as float32 (both fused GEMMs, any tile)."""
    return {"x float16": 0 if x_dtype == "float16" else 2 * M * K}


# -- csrc/gemm_wgmma.cu: the fused GEMM on Hopper's warpgroup tensor cores ------------------------
WGMMA_SMEM_LIMIT = 227 * 1024          # dynamic shared memory a block may have on sm_90
WGMMA_W_ROW = {"Q4_K": 144, "Q6_K": 240}   # staged bytes of one W row's super-block (GwW<Q>::ROW)


def gemm_wgmma_smem(qtype: str, bn: int, nwg: int, stages: int, mt: int = 1) -> int:
    """Dynamic shared memory of gemm_wgmma<...> (GwSmem::BYTES): the x ring (stages x 64 nwg mt rows x
    64 fp16), two decoded W tiles (bn x 64 fp16), two staged super-blocks of the bn W rows, and
    1024 bytes to align the base."""
    return stages * 64 * nwg * mt * 128 + 2 * bn * 128 + 2 * bn * WGMMA_W_ROW[qtype] + 1024


def gemm_wgmma_check(qtype: str, bn: int, nwg: int, stages: int, swz: int, mt: int = 1):
    """Q4KError unless gemm_wgmma<qtype, bn, nwg, stages, swz, mt> is a shape the C instantiates."""
    if (bn not in (32, 64, 128, 256) or nwg not in (1, 2) or not 3 <= stages <= 6 or swz not in (0, 1)
            or mt not in (1, 2) or mt * bn > 256):
        raise Q4KError(f"gemm_wgmma: bn {bn} (32, 64, 128, 256), nwg {nwg} (1, 2), stages {stages} (3..6), "
                       f"swz {swz} (0, 1), mt {mt} (1, 2; mt bn <= 256) is not a shape the kernel has")
    return _smem_fits(f"gemm_wgmma: {qtype} with bn {bn}, {stages} stages", gemm_wgmma_smem(qtype, bn, nwg, stages, mt))


def _smem_fits(what: str, need: int) -> int:
    """need, or Q4KError if a block cannot have that much dynamic shared memory (WGMMA_SMEM_LIMIT)."""
    if need > WGMMA_SMEM_LIMIT:
        raise Q4KError(f"{what} needs {need} bytes of shared memory (at most {WGMMA_SMEM_LIMIT})")
    return need


def gemm_wgmma_source(qtype: str, bn: int, nwg: int, stages: int, swz: int, out16: bool, mt: int = 1) -> tuple:
    """(file, name, extern "C" wrapper) of gemm_wgmma<Q, bn, nwg, stages, swz, out16, mt>."""
    name = (f"{TEMPLATES[qtype]}_gemm_wgmma_n{bn}_g{nwg}_s{stages}_z{swz}_o{16 if out16 else 32}"
            + (f"_m{mt}" if mt > 1 else ""))
    return "gemm_wgmma.cu", name, (
        f'extern "C" __device__ int {name}(const u8* w, int rb, int n, int K, int M, const u16* x, void* out, int ldo) '
        f'{{ gemm_wgmma<{qtype[1]}, {bn}, {nwg}, {stages}, {swz}, {int(out16)}, {mt}>(w, rb, n, K, M, x, out, ldo); '
        f'return 0; }}\n')


@functools.lru_cache(maxsize=None)
def gemm_wgmma_kernel(qtype: str, bn: int, nwg: int, stages: int, swz: int, out16: bool, mt: int = 1):
    """The Numba kernel for gemm_wgmma<...>: grid = ceil(M / (64 nwg mt)) * ceil(n_out / bn) blocks (1-D,
    the C orders the tiles) of 128 nwg threads, gemm_wgmma_smem(...) bytes of dynamic shared memory."""
    file, name, extra = gemm_wgmma_source(qtype, bn, nwg, stages, swz, out16, mt)
    fn = cuda.declare_device(name, types.int32(_PTR, _I32, _I32, _I32, _I32, _PTR, _PTR, _I32),
                             link=[source_with(extra, file)], abi="c")

    @linked_jit()
    def kernel(w, row_bytes, n_out, K, M, x, out, ldo):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_out), np.int32(K), np.int32(M), data_ptr(x), data_ptr(out),
           np.int32(ldo))

    return kernel


def wgmma_available() -> bool:
    """Whether this GPU runs wgmma (compute capability 9.0: H100, H200, GH200)."""
    if SIMULATOR:
        return False
    try:
        return tuple(cuda.get_current_device().compute_capability) == (9, 0)
    except Exception:
        return False


WGMMA_BN = {"Q4_K": 256, "Q6_K": 128}   # the widest tile each type fits (bn = 0 picks it)


def _wgmma_call(what, w_raw, x, out, n_out):
    """The checks both wgmma GEMMs make before a launch (an sm_90 GPU, W 16-byte aligned, out float32 or float16
    [M, n_out] with unit-stride rows) -> (flat view of out for the C, its row length ldo, out16)."""
    import cupy

    if not wgmma_available():
        raise Q4KError(f"{what} needs a compute capability 9.0 GPU (wgmma): H100 / H200")
    if address(w_raw) % 16:
        raise Q4KError(f"{what} needs raw weights that start 16-byte aligned")
    M = x.shape[0]
    item = out.itemsize if out.dtype in (np.float32, np.float16) else 0
    if (out.shape != (M, n_out) or not item or out.ndim != 2 or out.strides[1] != item
            or out.strides[0] % item or out.strides[0] < n_out * item):
        raise Q4KError(f"{what}: out must be float32 or float16 [{M}, {n_out}] with unit-stride rows")
    out16 = out.dtype == np.float16
    ldo = out.strides[0] // item
    if M == 0 or n_out == 0:
        return None, ldo, out16
    return cupy.ndarray(((M - 1) * ldo + n_out,), dtype=np.uint16 if out16 else np.float32, memptr=out.data), ldo, out16


def _x16_for_wgmma(x):
    """x as the wgmma GEMMs read it: fp16 (float32 cast by to_f16), C-contiguous, 16-byte aligned."""
    import cupy

    x16 = cupy.ascontiguousarray(to_f16(x))
    return x16.copy() if address(x16) % 16 else x16


def gemm_wgmma_linked(x, w_raw, qtype, n_out, out, bn=0, nwg=2, stages=4, swz=1, mt=1):
    """out[:] = x @ W.T for Q4_K or Q6_K rows on an sm_90 GPU: each CTA decodes its W tile once a K step
    into shared memory (fp16; the scales rounded to fp16 too) for wgmma (fp16 in, FP32 accumulate),
    x (fp16; float32 x is cast by to_f16) through a cp.async ring. No decode scratch. out: float32 or
    float16 [M, n_out] with unit-stride rows (C-contiguous, or a column block of a wider matrix). W must
    start 16-byte aligned (as CuPy allocates)."""
    _require_gpu("gemm_wgmma_linked")
    q, K = _check(w_raw, qtype, n_out)
    bn = bn or WGMMA_BN[q]
    smem = gemm_wgmma_check(q, bn, nwg, stages, swz, mt)
    flat, ldo, out16 = _wgmma_call("gemm_wgmma_linked", w_raw, x, out, n_out)
    if flat is None:
        return out
    M = x.shape[0]
    x16 = _x16_for_wgmma(x)
    launch(gemm_wgmma_kernel(q, bn, nwg, stages, swz, out16, mt), -(-n_out // bn) * -(-M // (64 * nwg * mt)), 128 * nwg,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, x16.reshape(-1).view(np.uint16), flat, ldo, shared=smem)
    return out


# -- csrc/gemm_wgmma_rs.cu: the fused GEMM with W decoded into wgmma's register A operand ----------------------
GR_THREADS, GR_REGISTERS = 384, 168     # a producer and two consumer warpgroups; 65536 / 384 (setmaxnreg moves them)
GR_SHAPES = ((256, 4, 2, 1), (128, 6, 2, 1), (64, 2, 2, 1), (64, 3, 3, 1), (128, 5, 2, 2), (64, 3, 2, 2))
# (x rows a CTA, x slots, W slots, 64-row W tiles a consumer warpgroup) the C instantiates


def gemm_wgmma_rs_smem(bx: int, xs: int, ws: int, mt: int = 1, qtype: str = "Q4_K") -> int:
    """Dynamic shared memory of gemm_wgmma_rs<bx, xs, ws, .., mt, Q> (GrSmem::BYTES): xs x slots (bx rows x 64 fp16),
    ws raw super-blocks of the CTA's 128 mt W rows (WGMMA_W_ROW bytes a row), 16 bytes of mbarriers a slot pair, 1024 to
    align."""
    return xs * bx * 128 + ws * 128 * mt * WGMMA_W_ROW[qtype] + 16 * (xs + ws) + 1024


def gemm_wgmma_rs_check(bx: int, xs: int, ws: int, mt: int = 1, qtype: str = "Q4_K") -> int:
    """Q4KError unless gemm_wgmma_rs<bx, xs, ws, .., mt, Q> is an instantiated shape that fits; its shared memory."""
    if (bx, xs, ws, mt) not in GR_SHAPES or qtype not in WGMMA_W_ROW:
        raise Q4KError(f"gemm_wgmma_rs: {qtype} with (bx, xs, ws, mt) = {(bx, xs, ws, mt)} is not a shape the kernel "
                       f"has (Q4_K, Q6_K; {', '.join(map(str, GR_SHAPES))})")
    return _smem_fits(f"gemm_wgmma_rs: {qtype} with (bx, xs, ws, mt) = {(bx, xs, ws, mt)}",
                      gemm_wgmma_rs_smem(bx, xs, ws, mt, qtype))


def gemm_wgmma_rs_source(bx: int, xs: int, ws: int, out16: bool, tma: bool = False, mt: int = 1,
                         qtype: str = "Q4_K") -> tuple:
    """(file, name, extern "C" wrapper) of gemm_wgmma_rs<bx, xs, ws, out16, tma, mt, Q>."""
    name = (f"{TEMPLATES[qtype]}_gemm_wgmma_rs_x{bx}_s{xs}_w{ws}_o{16 if out16 else 32}" + ("_tma" if tma else "")
            + (f"_m{mt}" if mt > 1 else ""))
    return "gemm_wgmma_rs.cu", name, (
        f'extern "C" __device__ int {name}(const u8* w, int rb, int n, int K, int M, const u16* x, void* out, int ldo, '
        f'const void* xmap) {{ gemm_wgmma_rs<{bx}, {xs}, {ws}, {int(out16)}, {"true" if tma else "false"}, {mt}, '
        f'{qtype[1]}>(w, rb, n, K, M, x, out, ldo, xmap); return 0; }}\n')


GR_SIG = types.int32(_PTR, _I32, _I32, _I32, _I32, _PTR, _PTR, _I32, _PTR)


@functools.lru_cache(maxsize=None)
def gemm_wgmma_rs_kernel(bx: int, xs: int, ws: int, out16: bool, tma: bool = False, mt: int = 1, qtype: str = "Q4_K"):
    """The Numba kernel for gemm_wgmma_rs<...>: ceil(M / bx) * ceil(n_out / (128 mt)) blocks of GR_THREADS threads,
    built with GR_REGISTERS a thread, gemm_wgmma_rs_smem(...) bytes of dynamic shared memory; xmap: x's tensor
    map (x_tensor_map; with tma) or any array (without)."""
    file, name, extra = gemm_wgmma_rs_source(bx, xs, ws, out16, tma, mt, qtype)
    fn = cuda.declare_device(name, GR_SIG, link=[source_with(extra, file)], abi="c")

    @linked_jit(GR_REGISTERS)
    def kernel(w, row_bytes, n_out, K, M, x, out, ldo, xmap):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_out), np.int32(K), np.int32(M), data_ptr(x), data_ptr(out),
           np.int32(ldo), data_ptr(xmap))

    return kernel


_TMAPS: dict = {}
_ENCODE: list = []          # the driver's cuTensorMapEncodeTiled, once loaded


def x_tensor_map(x16, rows: int):
    """The CUtensorMap (cuTensorMapEncodeTiled, through the driver's C API) of fp16 x [M, K] for gemm_wgmma_rs's TMA:
    boxes of 64 columns x `rows` rows, 128-byte swizzle, rows past M zero-filled; 128 bytes in device memory (64-byte
    aligned, as the copy requires). Cached by (address, M, K, rows): the map holds nothing else, so a hit is exact."""
    import ctypes

    import cupy

    M, K = x16.shape
    key = (x16.data.ptr, M, K, rows)
    hit = _TMAPS.get(key)
    if hit is not None:
        return hit
    if not _ENCODE:
        fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _ENCODE.append(fn)
    raw = (ctypes.c_uint8 * 192)()
    at = (ctypes.addressof(raw) + 63) // 64 * 64
    dims, strides = (ctypes.c_uint64 * 2)(K, M), (ctypes.c_uint64 * 1)(2 * K)
    box, one = (ctypes.c_uint32 * 2)(64, rows), (ctypes.c_uint32 * 2)(1, 1)
    # FLOAT16 = 6, rank 2, interleave none = 0, swizzle 128B = 3, L2 promotion 256B = 3, OOB fill none (zeros) = 0
    rc = _ENCODE[0](at, 6, 2, x16.data.ptr, dims, strides, box, one, 0, 3, 3, 0)
    if rc != 0:
        raise Q4KError(f"cuTensorMapEncodeTiled failed (CUresult {rc}) for x [{M}, {K}] at {x16.data.ptr:#x}")
    dev = cupy.asarray(np.frombuffer(ctypes.string_at(at, 128), dtype=np.uint8))
    if len(_TMAPS) > 64:
        _TMAPS.clear()
    _TMAPS[key] = dev
    return dev


def gemm_wgmma_rs_linked(x, w_raw, qtype, n_out, out, bx=256, xs=4, ws=2, tma=False, mt=1):
    """out[:] = x @ W.T for Q4_K or Q6_K rows on an sm_90 GPU, W decoded by each consumer thread straight into the A
    fragments of wgmma (the product computed as W x^T), a producer warpgroup filling the x and raw-W rings
    (csrc/gemm_wgmma_rs.cu). x fp16 (float32 x is cast by to_f16); out float32 or float16 [M, n_out] with
    unit-stride rows. No decode scratch. W 16-byte aligned. tma: x's tiles by the tensor-memory accelerator
    (x_tensor_map) instead of the producer's cp.async."""
    _require_gpu("gemm_wgmma_rs_linked")
    q, K = _check(w_raw, qtype, n_out)
    smem = gemm_wgmma_rs_check(bx, xs, ws, mt, q)
    flat, ldo, out16 = _wgmma_call("gemm_wgmma_rs_linked", w_raw, x, out, n_out)
    if flat is None:
        return out
    M = x.shape[0]
    x16 = _x16_for_wgmma(x)
    xmap = x_tensor_map(x16, bx) if tma else flat
    launch(gemm_wgmma_rs_kernel(bx, xs, ws, out16, tma, mt, q), -(-n_out // (128 * mt)) * -(-M // bx), GR_THREADS,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, x16.reshape(-1).view(np.uint16), flat, ldo, xmap,
           shared=smem)
    return out


# -- csrc/gemm_wgmma_s8.cu: the int8 GEMM with W re-quantized per super-block in the kernel -----------------
def gemm_wgmma_s8_smem(qtype: str) -> int:
    """Dynamic shared memory of gemm_wgmma_s8<Q> (GsSmem::BYTES): the x8 ring (4 x 128 rows x 128 bytes), two
    w8 tiles (128 x 128 bytes), two staged super-blocks of the 128 W rows, two slots of 128 dx and of 128 dw,
    and 1024 bytes to align the base."""
    return 4 * 128 * 128 + 2 * 128 * 128 + 2 * 128 * WGMMA_W_ROW[qtype] + 2 * 128 * 4 + 2 * 128 * 4 + 1024


def gemm_wgmma_s8_source(qtype: str, out16: bool) -> tuple:
    """(file, name, extern "C" wrapper) of gemm_wgmma_s8<Q, out16>."""
    name = f"{TEMPLATES[qtype]}_gemm_wgmma_s8_o{16 if out16 else 32}"
    return "gemm_wgmma_s8.cu", name, (
        f'extern "C" __device__ int {name}(const u8* w, int rb, int n, int K, int M, const signed char* x8, '
        f'const float* dx, int Mp, void* out, int ldo) {{ gemm_wgmma_s8<{qtype[1]}, {int(out16)}>(w, rb, n, K, M, x8, '
        f'dx, Mp, out, ldo); return 0; }}\n')


@functools.lru_cache(maxsize=None)
def gemm_wgmma_s8_kernel(qtype: str, out16: bool):
    """The Numba kernel for gemm_wgmma_s8<...>: grid = ceil(M / 128) * ceil(n_out / 128) blocks (1-D) of 256
    threads, gemm_wgmma_s8_smem(qtype) bytes of dynamic shared memory."""
    file, name, extra = gemm_wgmma_s8_source(qtype, out16)
    fn = cuda.declare_device(name, types.int32(_PTR, _I32, _I32, _I32, _I32, _PTR, _PTR, _I32, _PTR, _I32),
                             link=[source_with(extra, file)], abi="c")

    @linked_jit()
    def kernel(w, row_bytes, n_out, K, M, x8, dx, Mp, out, ldo):
        fn(data_ptr(w), np.int32(row_bytes), np.int32(n_out), np.int32(K), np.int32(M), data_ptr(x8), data_ptr(dx),
           np.int32(Mp), data_ptr(out), np.int32(ldo))

    return kernel


def gemm_wgmma_s8_linked(x, w_raw, qtype, n_out, out):
    """out[:] ~ x @ W.T for Q4_K or Q6_K rows on an sm_90 GPU through int8: x quantized per 256 values
    (gemm_s8_twin.quantize_s8), each W super-block re-quantized to int8 in the kernel (kernels/requant8.py is
    the same arithmetic in NumPy), s32 products on wgmma, one float32 rescale per super-block. Relative error
    ~1e-2 against the exact product (the int8 roundings); out float32 or float16 [M, n_out] with unit-stride
    rows. No decode scratch: the int8 copy of x and its scales are the workspace."""
    _require_gpu("gemm_wgmma_s8_linked")
    from .gemm_s8_twin import quantize_s8

    q, K = _check(w_raw, qtype, n_out)
    flat, ldo, out16 = _wgmma_call("gemm_wgmma_s8_linked", w_raw, x, out, n_out)
    if flat is None:
        return out
    M = x.shape[0]
    x8, dx, Mp = quantize_s8(x)
    launch(gemm_wgmma_s8_kernel(q, out16), -(-n_out // 128) * -(-M // 128), 256, w_raw.reshape(-1), w_raw.shape[1],
           n_out, K, M, x8.reshape(-1), dx.reshape(-1), Mp, flat, ldo, shared=gemm_wgmma_s8_smem(q))
    return out


def gemm_wgmma_s8_workspace(qtype, M, N, K, x_dtype, **params):
    """No decode scratch: x's int8 copy and its scales (one float per 256 values, rows padded to 4)."""
    return {"x int8": M * K, "x scales": 4 * (K // 256) * (-(-M // 4) * 4)}
