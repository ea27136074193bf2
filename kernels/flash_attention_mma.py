"""Flash attention on the tensor cores (csrc/flash_attention.cu) behind thin Numba kernels.

    mma_attention_forward(q, k, v, key_mask, window, scale, dtype="fp16", out_dtype=None) -> (o, lse, (q16, k16, v16, dtype))
    mma_attention_backward(do, cache) -> (dq, dk, dv)
    supports(D), available()     head sizes it takes; whether NVRTC compiles and runs it here

Inputs: CuPy float32 (cast here to fp16 or bf16 bits), float16 (used as fp16), or uint16 (bf16 bits,
the package's bfloat16 convention). Outputs and gradients are float32 (o also in 16 bits: out_dtype). Shapes as in
ops/flash_attention.py. The tiles per head size keep the static shared memory under 48 KB (the
forward double-buffers its K/V tiles with cp.async) and the registers at most 255 (nvcc 13.0 -Xptxas -v,
sm_90a; registers forward / backward; MT: m16 tiles = 16 query rows per warp, forward_mtiles):

    D <= 64    forward 4 warps x 64 keys, MT 2   backward 64 keys, 4 warps          (255 / 240)
    D <= 128   forward 4 warps x 32 keys, MT 1   backward 32 keys, 2 warps per key  (174 / 168)
    D <= 256   forward 4 warps x 16 keys, MT 1   backward 16 keys, 4 warps per key  (255 + 4 B spilled / 163)

D = 64's forward with MT 1 (Q4KDISTILL_FA_FWD_MT=1): 133 registers. REGISTER_CAP caps that at 128
and the backward at 168; MT 2 needs ~246 (a cap of 240 spills 40 B): uncapped, 2 blocks per SM.

On an sm_90 GPU the forward can run on the warpgroup tensor cores instead (csrc/flash_attention_wgmma.cu,
FlashAttention-3's consumer algorithm: wgmma reads Q and K from shared memory and P from registers,
tiles in dynamic shared memory; D = 64 and 128, WGMMA_TILES), and its backward (FlashAttention-3's products:
S^T, dP^T, dV, dK and dQ on wgmma, a CTA per 128 keys). They are the default for D = 64 and 128 (WGMMA_DEFAULT;
on an H200 in schedule 18 at T = 8192: D = 64 1.6x the mma kernels' forward + backward, D = 128 3x);
$Q4KDISTILL_FA_FWD and $Q4KDISTILL_FA_BWD = mma | wgmma choose either way (forward_kind, backward_kind).

The simulator cannot run C: it runs the FP32 twin (flash_attention.py); the CPU suite runs this C
through tests/flash_attention_emulate.cpp and tests/flash_attention_wgmma_emulate.cpp.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from numba import cuda, types

from q4kdistill.errors import Q4KError

from ._device import SIMULATOR, launch
from .flash_attention_rows import backward_rows

SOURCE = Path(__file__).with_name("csrc") / "flash_attention.cu"
DTYPES = ("bf16", "fp16")
_PTR, _I32, _F32 = types.voidptr, types.int32, types.float32


MT_ENV = "Q4KDISTILL_FA_FWD_MT"
MT2_MAX_T = 2048      # forward_mtiles: sequences longer than this take MT 1 (H200 measurements below)


def forward_mtiles(D: int, T: int | None = None) -> int:
    """m16 tiles per warp of fa_forward (query rows per warp / 16) for head size D and sequence
    length T: 1 above D = 64 (registers: module doc); else $Q4KDISTILL_FA_FWD_MT (1 or 2) where set
    (read at every launch, so one process can run both), else 2 up to T = MT2_MAX_T (None: any T)
    and 1 above. Measured on an H200 (2026-12-04, 14 heads of 64, 2 kv heads, causal; docs/perf.md,
    ninth stop): 8 x 512 forward 0.177 ms (MT 1, 128 registers, 4 blocks an SM) -> 0.123 ms (MT 2,
    255 registers, 2 blocks: each K/V tile loaded for twice the rows); 1 x 8192 1.163 -> 1.468 ms (at
    long T the half occupancy costs more than the shared loads save)."""
    env = os.environ.get(MT_ENV, "").strip()
    if env and env not in ("1", "2"):
        raise Q4KError(f"{MT_ENV}={env!r}: expected 1 or 2")
    if D > 64:
        return 1
    if env:
        return int(env)
    return 2 if T is None or T <= MT2_MAX_T else 1


def forward_tiles(D: int, mt: int | None = None) -> tuple:
    """(warps, keys per tile, m16 tiles per warp) of fa_forward for head size D; mt None:
    forward_mtiles(D) (tests/flash_attention_emulate.cpp instantiates the same)."""
    warps, bc = (4, 64) if D <= 64 else (4, 32) if D <= 128 else (4, 16)
    return warps, bc, forward_mtiles(D) if mt is None else mt


def backward_tiles(D: int) -> tuple:
    """(keys per tile = queries per tile, warps per 16 keys) of fa_backward for head size D."""
    return (64, 1) if D <= 64 else (32, 2) if D <= 128 else (16, 4)


def _source_with(extra: str) -> str:
    """csrc/flash_attention.cu with `extra` appended, written once to a cache directory."""
    from .linked import cached_source

    return cached_source(SOURCE.read_text() + "\n" + extra, "flash_attention")


def _data_ptr():
    from .linked import data_ptr   # (linked.py builds the llvmlite intrinsic once)
    return data_ptr


OUTS = {None: 0, "float16": 1, "bfloat16": 2}   # the forward's o: float32, fp16 or bf16 (fa_forward's OUT)


def forward_source(D: int, bf16: bool, out: int = 0, mt: int | None = None, schedule: int = 13) -> tuple:
    """(name, extern "C" wrapper) of fa_forward for head size D, o as OUTS says, mt m16 tiles per
    warp (None: forward_mtiles(D)), instruction schedule `schedule` (SCHEDS)."""
    warps, bc, mt = forward_tiles(D, mt)
    name = (f"fa_fwd_d{D}_w{warps}_c{bc}_m{mt}_{'bf16' if bf16 else 'fp16'}" + ("", "_o16", "_obf16")[out]
            + _sched_suffix(schedule))
    return name, (f'extern "C" __device__ int {name}(const u16* q, const u16* k, const u16* v, const u8* mask, '
                  f'int has_mask, int T, int H, int KV, int window, float scale, void* o, float* lse) {{ '
                  f'fa_forward<{D}, {warps}, {bc}, {"true" if bf16 else "false"}, {out}, {mt}>(q, k, v, '
                  f'has_mask ? mask : nullptr, T, H, KV, window, scale, o, lse); return 0; }}\n')


def backward_source(D: int, bf16: bool, schedule: int = 13) -> tuple:
    """(name, extern "C" wrapper) of fa_backward for head size D, in instruction schedule `schedule`."""
    bc, dsplit = backward_tiles(D)
    name = f"fa_bwd_d{D}_c{bc}_s{dsplit}_{'bf16' if bf16 else 'fp16'}" + _sched_suffix(schedule)
    return name, (f'extern "C" __device__ int {name}(const u16* q, const u16* k, const u16* v, const u16* dout, '
                  f'const float* lse, const float* drow, const u8* mask, int has_mask, int T, int H, int KV, '
                  f'int window, float scale, const float* dout_scale, float* dq, float* dk, float* dv) {{ '
                  f'fa_backward<{D}, {bc}, {dsplit}, {"true" if bf16 else "false"}>(q, k, v, dout, lse, drow, '
                  f'has_mask ? mask : nullptr, T, H, KV, window, scale, dout_scale, dq, dk, dv); return 0; }}\n')


# Register caps per ("bwd", head size) / ("fwd", head size, m16 tiles per warp) handed to the Numba kernels
# (cuda.jit(max_registers=...)): fewer registers per thread let more blocks share an SM; absent: the
# compiler's choice. Measured on an H200 (2026-12-04, T = 8192, 14 heads of 64, docs/perf.md): backward 236
# registers (2 blocks per SM) 2.71 ms, capped at 168 (3 blocks) 2.34 ms, at 128 2.67 ms; forward (MT = 1) 133
# registers 1.10 ms, at 128 (4 blocks) 1.04 ms; D = 128's forward is fastest uncapped (3.10 ms; 168: 3.18,
# 128: 3.55). MT = 2 needs ~246 registers (nvcc 13.0: a cap of 240 spills 40 bytes): no cap.
REGISTER_CAP: dict = {("bwd", 64): 168, ("fwd", 64, 1): 128}


def _jit(max_registers):
    """linked.linked_jit (link-time optimisation), with the register cap when there is one."""
    from .linked import linked_jit

    return linked_jit(max_registers)


def _forward_jit(fn, max_registers=None):
    """The Numba kernel around a linked forward `fn` (fa_forward's or faw_forward's extern "C" wrapper)."""
    ptr = _data_ptr()

    @_jit(max_registers)
    def kernel(q, k, v, mask, has_mask, T, H, KV, window, scale, o, lse):
        fn(ptr(q), ptr(k), ptr(v), ptr(mask), np.int32(has_mask), np.int32(T), np.int32(H), np.int32(KV),
           np.int32(window), np.float32(scale), ptr(o), ptr(lse))

    return kernel


_FORWARD_SIG = types.int32(_PTR, _PTR, _PTR, _PTR, _I32, _I32, _I32, _I32, _I32, _F32, _PTR, _PTR)


@functools.lru_cache(maxsize=None)
def _forward_kernel(D: int, bf16: bool, max_registers=None, out: int = 0, mt: int = 1, schedule: int = 13):
    """(Numba kernel, threads per block, query rows per block)."""
    name, extra = forward_source(D, bf16, out, mt, schedule)
    fn = cuda.declare_device(name, _FORWARD_SIG, link=[_source_with(extra)], abi="c")
    warps = forward_tiles(D, mt)[0]
    return _forward_jit(fn, max_registers), 32 * warps, 16 * mt * warps


# -- the forward on wgmma (csrc/flash_attention_wgmma.cu, sm_90) ------------------------------------------
FWD_ENV = "Q4KDISTILL_FA_FWD"
WGMMA_TILES = {64: (128, 2, 4), 128: (128, 2, 3)}   # D -> (keys per tile, warpgroups, K/V slots) of faw_forward
WGMMA_SMEM_LIMIT = 227 * 1024


def wgmma_smem(D: int, bn: int, nwg: int, stages: int, ws: bool = False) -> int:
    """Dynamic shared memory of faw_forward<D, bn, nwg, stages> (FawSmem::BYTES): the Q tile (64 nwg rows),
    stages slots of a K and a V tile (bn rows each), 16-bit, and 1024 bytes to align the base; `ws`: of
    faw_forward_ws (FawWsSmem::BYTES, two consumer warpgroups): and 2 stages + 1 mbarriers of 8 bytes."""
    return 64 * nwg * D * 2 + 2 * stages * bn * D * 2 + 1024 + (8 * (2 * stages + 1) if ws else 0)


WS_SCHED = 15            # the schedule whose wgmma forward is faw_forward_ws
WS_THREADS, WS_REGISTERS = 384, 168   # its launch: 3 warpgroups, 65536 / 384 registers (setmaxnreg moves them)


TILES_ENV = "Q4KDISTILL_FA_TILES"


def wgmma_tiles(D: int) -> tuple:
    """(keys per tile, warpgroups, K/V slots) of the wgmma forward for head size D: $Q4KDISTILL_FA_TILES as
    "keys,warpgroups,slots" (keys 64 or 128, 1 or 2 warpgroups, 3+ slots, within WGMMA_SMEM_LIMIT), else
    WGMMA_TILES[D]. Read at each launch. "64,1,3" at D = 128 takes 113 KB and 128 threads of <= 255 registers:
    two CTAs an SM, whose products and softmax interleave unsynchronised (the overlap FlashAttention-3's
    ping-pong schedules by barriers), at twice the K/V reads from L2 of one 128-row CTA."""
    env = os.environ.get(TILES_ENV, "").strip()
    if not env:
        return WGMMA_TILES[D]
    try:
        bn, nwg, st = (int(x) for x in env.split(","))
    except ValueError:
        raise Q4KError(f"{TILES_ENV}={env!r}: expected keys,warpgroups,slots (e.g. 64,1,3)") from None
    if bn not in (64, 128) or nwg not in (1, 2) or not 3 <= st <= 8 or wgmma_smem(D, bn, nwg, st) > WGMMA_SMEM_LIMIT:
        raise Q4KError(f"{TILES_ENV}={env!r}: keys 64 or 128, 1 or 2 warpgroups, 3+ slots, at most "
                       f"{WGMMA_SMEM_LIMIT} bytes of shared memory (D = {D}: {wgmma_smem(D, bn, nwg, st)})")
    return bn, nwg, st


WGMMA_DEFAULT = (64, 128)   # head sizes whose attention runs on wgmma unless $Q4KDISTILL_FA_FWD / _BWD say "mma":
# H200, 2026-12-05, T = 8192 (docs/perf.md twelfth stop): D = 128 forward 2.54 against 4.30 ms (mma), backward 5.80
# against 12.38; D = 64 1.13 / 2.60 against 1.05 / 2.66 (no gain then); sixteenth stop, schedule 18: D = 64 0.505 /
# 1.204 ms against mma.sync's 0.771 / 1.955 (its schedule 13), so D = 64 runs on wgmma too


def _kind(env_name: str, D: int) -> str:
    env = os.environ.get(env_name, "").strip()
    if env not in ("", "mma", "wgmma"):
        raise Q4KError(f"{env_name}={env!r}: expected mma or wgmma")
    if D not in WGMMA_TILES or env == "mma" or (env == "" and D not in WGMMA_DEFAULT):
        return "mma"
    from .linked import wgmma_available

    return "wgmma" if wgmma_available() else "mma"


def forward_kind(D: int) -> str:
    """"wgmma" on an sm_90 GPU (H100, H200) for a head size with a wgmma tile (64, 128) where
    $Q4KDISTILL_FA_FWD=wgmma, or where it is unset and D is in WGMMA_DEFAULT; else "mma". Read at every launch."""
    return _kind(FWD_ENV, D)


SCHED_ENV = "Q4KDISTILL_FA_SCHED"
SCHEDS = (13, 15, 16, 17, 18, 19, 20)   # the attention kernels' instruction schedule (19 the default since the
# seventeenth stop: docs/perf.md): 13 the thirteenth and fourteenth stops': loads unrolled, the mask tested once a
# tile, tree reductions; on wgmma the exponentials kept before the wait for P V by a fence.acq_rel.cta, the
# backwards pipelined; all four kernels (12, the twelfth stop's, and 14, 13 without that fence, were deleted in the
# nineteenth stop: neither was the fastest of any kernel, docs/perf.md). 15: 13, with the wgmma forward
# warp-specialised (faw_forward_ws: a producer warpgroup, two consumers in ping-pong; fourteenth stop; its register
# split fixed after it hung in the sixteenth). 16: 13, with
# the wgmma backward at D = 64 summing its two warpgroups' dQ partials in shared memory before one red.add (XCH_SCHED,
# FawXch: half the dQ reduction traffic; fifteenth stop). 17: 13, with the wgmma backward at D = 64 stepping 128
# queries at a time (QSPLIT_SCHED, FawBwdBM: FlashAttention-3's tile for head size 64; the warpgroups split dQ by
# queries, one red.add an element; sixteenth stop). 18: 17 at D = 64 (13 at D = 128) with the wgmma backward's P^T
# computed while dP^T is on the tensor cores (S and dP in two groups; PSPLIT_SCHED; sixteenth stop). 19: 15's wgmma
# forward with 18's backward, the fastest of each (H200, seventeenth stop); no code of its own. 20: 19 with the D = 64
# backward's dQ reduced by the bulk-copy engine (BULK_SCHED: cp.reduce.async.bulk a row from shared memory instead
# of a red.add a register pair; seventeenth stop; 1.21x slower than 19 on an H100, eighteenth); at D = 128 its
# backward is 18's
DEFAULT_SCHED = 19
XCH_SCHED = 16
QSPLIT_SCHED = 17
PSPLIT_SCHED = 18
BEST_SCHED = 19          # 15's forward, 18's backward (kernel_sched)
BULK_SCHED = 20          # 19 with the bulk-copy dQ at D = 64 (faw_stage_dq, csrc/flash_attention_wgmma.cu)


def sched() -> int:
    """$Q4KDISTILL_FA_SCHED (one of SCHEDS; DEFAULT_SCHED when unset), read at each launch."""
    env = os.environ.get(SCHED_ENV, "").strip() or str(DEFAULT_SCHED)
    if env not in tuple(map(str, SCHEDS)):
        raise Q4KError(f"{SCHED_ENV}={env!r}: expected one of {', '.join(map(str, SCHEDS))}")
    return int(env)


def kernel_sched(kernel: str, D: int, schedule: int | None = None) -> int:
    """The schedule a kernel ("fwd" / "bwd": mma.sync, "wgmma fwd" / "wgmma bwd") is built in for `schedule`
    (None: sched()): the lowest one whose code is the same, so that equal kernels are compiled once. The mma.sync
    kernels are one code (13); the wgmma forward differs in 15 (warp-specialised), 16's is 13's (and 17's, 18's),
    19's and 20's are 15's; the wgmma backward differs in 16 and 17 at D = 64 (FawXch, FawBwdBM) and in 18 and in 20
    at D = 64, 19's is 18's (and 20's at D = 128). What it returns is what the kernel's C name carries and, for
    the wgmma backward, its SCHED template argument (19 never reaches it)."""
    schedule = sched() if schedule is None else schedule
    if schedule == BULK_SCHED and kernel == "wgmma bwd" and D == 64:
        return BULK_SCHED
    if schedule in (BEST_SCHED, BULK_SCHED):
        schedule = WS_SCHED if kernel == "wgmma fwd" else PSPLIT_SCHED
    if kernel in ("fwd", "bwd"):
        return 13
    if kernel == "wgmma fwd":
        return 13 if schedule in (XCH_SCHED, QSPLIT_SCHED, PSPLIT_SCHED) else schedule
    return schedule if schedule == PSPLIT_SCHED or (D == 64 and schedule in (XCH_SCHED, QSPLIT_SCHED)) else 13


def _sched_suffix(schedule: int) -> str:
    """What a kernel's C name carries of its schedule: "_v13" ..."""
    return f"_v{schedule}"


def wgmma_forward_source(D: int, bf16: bool, out: int = 0, tiles=None, schedule: int = 13) -> tuple:
    """(name, extern "C" wrapper) of faw_forward for head size D (tiles: (keys per tile, warpgroups,
    slots); None: WGMMA_TILES[D]), o as OUTS says, in instruction schedule `schedule` (SCHEDS)."""
    bn, nwg, st = tiles or WGMMA_TILES[D]
    name = (f"faw_fwd_d{D}_n{bn}_g{nwg}_s{st}_{'bf16' if bf16 else 'fp16'}" + ("", "_o16", "_obf16")[out]
            + _sched_suffix(schedule))
    b16 = "true" if bf16 else "false"
    if schedule == WS_SCHED:
        if nwg != 2:
            raise Q4KError(f"the warp-specialised forward (schedule {WS_SCHED}) has two consumer warpgroups, not {nwg}")
        call = f"faw_forward_ws<{D}, {bn}, {st}, {b16}, {out}>"
    else:
        call = f"faw_forward<{D}, {bn}, {nwg}, {st}, {b16}, {out}>"
    return name, (f'extern "C" __device__ int {name}(const u16* q, const u16* k, const u16* v, const u8* mask, '
                  f'int has_mask, int T, int H, int KV, int window, float scale, void* o, float* lse) {{ '
                  f'{call}(q, k, v, has_mask ? mask : nullptr, T, H, KV, window, scale, o, lse); return 0; }}\n')


BWD_ENV = "Q4KDISTILL_FA_BWD"
WGMMA_BWD_TILE = (128, 64)       # faw_backward: keys per CTA (2 warpgroups of 64), queries per step


def wgmma_bwd_smem(D: int, schedule: int = 13) -> int:
    """Dynamic shared memory of faw_backward<D> (FawBwdLayout13::BYTES): K and V [128 x D], Q and dO [3][bm x D]
    (16-bit), dS^T [2][128 x bm] (16-bit), lse and drow [3][bm] (float32), and 1024 bytes to align the base; bm = 64
    queries a step, 128 in schedules 17, 18 and 20 at D = 64 (FawBwdBM); 16 at D = 64 adds FawXch's out-boxes (20 stages
    its dQ in the dS^T buffers: no more bytes)."""
    bn, bm = WGMMA_BWD_TILE
    if D == 64 and schedule in (QSPLIT_SCHED, PSPLIT_SCHED, BULK_SCHED):
        bm = 128
    stages, buffers = 3, 2
    xch = 4 * 128 * (D // 8) * 8 if (D, schedule) == (64, XCH_SCHED) else 0   # FawXch's out-boxes
    return 2 * bn * D * 2 + 2 * stages * bm * D * 2 + buffers * bn * bm * 2 + 2 * stages * bm * 4 + xch + 1024


def backward_kind(D: int) -> str:
    """The same rule as forward_kind, for the backward and $Q4KDISTILL_FA_BWD."""
    return _kind(BWD_ENV, D)


def wgmma_backward_source(D: int, bf16: bool, schedule: int = 13) -> tuple:
    """(name, extern "C" wrapper) of faw_backward for head size D, in instruction schedule `schedule`."""
    name = f"faw_bwd_d{D}_{'bf16' if bf16 else 'fp16'}" + _sched_suffix(schedule)
    return name, (f'extern "C" __device__ int {name}(const u16* q, const u16* k, const u16* v, const u16* dout, '
                  f'const float* lse, const float* drow, const u8* mask, int has_mask, int T, int H, int KV, '
                  f'int window, float scale, const float* dout_scale, float* dq, float* dk, float* dv) {{ '
                  f'faw_backward<{D}, {"true" if bf16 else "false"}, {schedule}>(q, k, v, dout, lse, drow, '
                  f'has_mask ? mask : nullptr, T, H, KV, window, scale, dout_scale, dq, dk, dv); return 0; }}\n')


@functools.lru_cache(maxsize=None)
def _wgmma_forward_kernel(D: int, bf16: bool, out: int = 0, schedule: int = 13, tiles=None):
    """(Numba kernel, threads per block, query rows per block, dynamic shared memory bytes); tiles as
    wgmma_forward_source has them."""
    from .linked import source_with

    bn, nwg, st = tiles or WGMMA_TILES[D]
    name, extra = wgmma_forward_source(D, bf16, out, (bn, nwg, st), schedule=schedule)
    fn = cuda.declare_device(name, _FORWARD_SIG, link=[source_with(extra, "flash_attention_wgmma.cu")], abi="c")
    if schedule == WS_SCHED:
        return _forward_jit(fn, WS_REGISTERS), WS_THREADS, 64 * nwg, wgmma_smem(D, bn, nwg, st, ws=True)
    return _forward_jit(fn), 128 * nwg, 64 * nwg, wgmma_smem(D, bn, nwg, st)


def _backward_jit(fn, max_registers=None):
    """The Numba kernel around a linked backward `fn` (fa_backward's or faw_backward's extern "C" wrapper)."""
    ptr = _data_ptr()

    @_jit(max_registers)
    def kernel(q, k, v, dout, lse, drow, mask, has_mask, T, H, KV, window, scale, dout_scale, dq, dk, dv):
        fn(ptr(q), ptr(k), ptr(v), ptr(dout), ptr(lse), ptr(drow), ptr(mask), np.int32(has_mask), np.int32(T),
           np.int32(H), np.int32(KV), np.int32(window), np.float32(scale), ptr(dout_scale), ptr(dq), ptr(dk), ptr(dv))

    return kernel


_BACKWARD_SIG = types.int32(_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I32, _I32, _I32, _I32, _I32, _F32, _PTR, _PTR,
                            _PTR, _PTR)


@functools.lru_cache(maxsize=None)
def _backward_kernel(D: int, bf16: bool, max_registers=None, schedule: int = 13):
    """(Numba kernel, threads per block, keys per block)."""
    name, extra = backward_source(D, bf16, schedule)
    fn = cuda.declare_device(name, _BACKWARD_SIG, link=[_source_with(extra)], abi="c")
    bc, dsplit = backward_tiles(D)
    return _backward_jit(fn, max_registers), 32 * (bc // 16) * dsplit, bc


@functools.lru_cache(maxsize=None)
def _wgmma_backward_kernel(D: int, bf16: bool, schedule: int = 13):
    """(Numba kernel, threads per block, keys per block, dynamic shared memory bytes)."""
    from .linked import source_with

    name, extra = wgmma_backward_source(D, bf16, schedule)
    fn = cuda.declare_device(name, _BACKWARD_SIG, link=[source_with(extra, "flash_attention_wgmma.cu")], abi="c")
    return _backward_jit(fn), 256, WGMMA_BWD_TILE[0], wgmma_bwd_smem(D, schedule)


@functools.lru_cache(maxsize=None)
def _cast_kernels():
    """{dtype: elementwise x float32, s float32[1] -> 16-bit bits of x * s[0]} (round to nearest even)."""
    import cupy

    bf16 = cupy.ElementwiseKernel(
        "float32 x, raw float32 s", "uint16 y",
        "unsigned int n = __float_as_uint(x * s[0]); y = (n + 0x7FFFu + ((n >> 16) & 1u)) >> 16;", "q4k_fa_to_bf16")
    fp16 = cupy.ElementwiseKernel("float32 x, raw float32 s", "float16 y", "y = x * s[0];", "q4k_fa_to_fp16")
    return {"bf16": bf16, "fp16": fp16}


@functools.lru_cache(maxsize=None)
def _grad_scale_kernel():
    """max |x| and, in the same reduction's last step, the power of two that brings it into [1, 2) (1 for 0 or NaN)"""
    import cupy

    return cupy.ReductionKernel("float32 x", "float32 y", "fabsf(x)", "max(a, b)",
                                "y = a > 0.0f ? exp2f(-floorf(log2f(fmaxf(a, 1e-38f)))) : 1.0f", "0", "q4k_fa_grad_scale")


def to16(x, dtype: str, s=None):
    """x (CuPy) -> C-contiguous uint16 bits of bf16 or fp16 (of x * s[0] where s, a float32 [1],
    is given), 16-byte aligned."""
    import cupy

    if s is None and (x.dtype == np.uint16 and dtype == "bf16" or x.dtype == np.float16 and dtype == "fp16"):
        out = cupy.ascontiguousarray(x).view(np.uint16)
        return out.copy() if out.data.ptr % 16 else out
    x = as_f32(x)                                  # (a 16-bit array of the other kind goes through float32)
    one = cupy.ones(1, dtype=np.float32) if s is None else s
    return _cast_kernels()[dtype](x, one).view(np.uint16)


def grad_scale(do):
    """float32 [1] on the device: the power of two that brings max |do| into [1, 2) (1 for do = 0)."""
    return _grad_scale_kernel()(as_f32(do)).reshape(1)     # one kernel (it was seven: max, where, exp2, ...)


def as_f32(x):
    """CuPy float32 / float16 / uint16 bf16 bits -> float32 values."""
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


def _dtype_of(x, dtype):
    if x.dtype == np.float16:
        return "fp16"
    if x.dtype == np.uint16:
        return "bf16"
    if dtype not in DTYPES:
        raise Q4KError(f"attention mma dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return dtype


@functools.lru_cache(maxsize=None)
def _no_mask(device: int):
    """The placeholder mask argument (never read), one per GPU."""
    import cupy

    return cupy.ones((1,), dtype=np.uint8)


def _mask_arg(key_mask, B, T):
    import cupy

    if key_mask is None:
        return _no_mask(cupy.cuda.Device().id), 0
    return cupy.ascontiguousarray(key_mask, dtype=np.uint8).reshape(B * T), 1


def _window(window, T):
    return T + 1 if window is None else max(1, min(int(window), T + 1))


def supports(D: int) -> bool:
    """Head sizes the kernels take: multiples of 16 up to 256 whose backward column share
    (D / warps per key) is a multiple of 16 too (ldmatrix.x4 loads two 8-column tiles)."""
    return D % 16 == 0 and 16 <= D <= 256 and (D // backward_tiles(D)[1]) % 16 == 0


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """A GPU with NVRTC that compiles and runs the forward (checked once, on a tiny problem)."""
    if SIMULATOR:
        return False
    try:
        import cupy

        z = cupy.zeros((1, 16, 1, 64), dtype=np.float32)
        mma_attention_forward(z, z, z, None, None, 1.0)
        cupy.cuda.get_current_stream().synchronize()
        return True
    except Exception as exc:   # NVRTC missing or too old: any failure means "not here"
        import warnings

        warnings.warn(f"tensor-core attention is unavailable ({type(exc).__name__}: {exc}); "
                      "attention uses the Numba FP32 kernels", stacklevel=2)
        return False


def _check(D):
    if SIMULATOR:
        raise Q4KError("tensor-core attention links CUDA C and runs on a GPU only (the simulator cannot run it)")
    if not supports(D):
        raise Q4KError(f"tensor-core attention takes head sizes 16..64, 96, 128, 192, 256 (multiples of 16 "
                       f"whose backward share is too), got {D}")


def mma_attention_forward(q, k, v, key_mask, window, scale, dtype="fp16", out_dtype=None):
    """-> (o [B, T, H, D], lse float32 [B, H, T], (q16, k16, v16, dtype) for the backward). o is
    float32, or with ``out_dtype`` float16 / bfloat16 (a CuPy ml_dtypes dtype) written by the kernel:
    the float32 values rounded to nearest even, as a cast would give them, without the float32 array."""
    import cupy

    B, T, H, D = q.shape
    KV = k.shape[2]
    _check(D)
    dtype = _dtype_of(q, dtype)
    out = None if out_dtype is None or np.dtype(out_dtype) == np.float32 else np.dtype(out_dtype).name
    if out not in OUTS:
        raise Q4KError(f"attention output dtype {out}: expected float32, float16 or bfloat16")
    q16, k16, v16 = (to16(a, dtype) for a in (q, k, v))
    mask, has = _mask_arg(key_mask, B, T)
    o = cupy.empty((B, T, H, D), dtype=np.float32 if out is None else out_dtype)
    lse = cupy.empty((B, H, T), dtype=np.float32)
    if forward_kind(D) == "wgmma":
        kernel, threads, rows, smem = _wgmma_forward_kernel(D, dtype == "bf16", OUTS[out], kernel_sched("wgmma fwd", D), wgmma_tiles(D))
    else:
        mt = forward_mtiles(D, T)
        kernel, threads, rows = _forward_kernel(D, dtype == "bf16", REGISTER_CAP.get(("fwd", D, mt)), OUTS[out], mt,
                                                kernel_sched("fwd", D))
        smem = 0
    launch(kernel, (-(-T // rows), H, B), threads, q16.reshape(-1), k16.reshape(-1), v16.reshape(-1), mask, has, T, H,
           KV, _window(window, T), np.float32(scale), o.reshape(-1) if out is None else o.reshape(-1).view(np.uint16),
           lse.reshape(-1), shared=smem)
    return o, lse, (q16, k16, v16, dtype)


def mma_attention_backward(do, cache):
    """do [B, T, H, D] -> (dq, dk, dv) float32, from a FlashCache whose extra is the forward's 16-bit copies."""
    import cupy

    q16, k16, v16, dtype = cache.extra
    B, T, H, D = q16.shape
    KV = k16.shape[2]
    _check(D)
    s = grad_scale(do)                                             # dO * s in 16 bits: no subnormals
    do16, drow = backward_rows(cupy.ascontiguousarray(do), cupy.ascontiguousarray(cache.o), s, dtype)   # drow [B, H, T]
    mask, has = _mask_arg(cache.key_mask, B, T)
    dq = cupy.zeros((B, T, H, D), dtype=np.float32)                # atomics add into it
    acc = cupy.zeros if KV < H else cupy.empty                    # GQA: the G heads of a kv head add into dk, dv
    dk = acc((B, T, KV, D), dtype=np.float32)
    dv = acc((B, T, KV, D), dtype=np.float32)
    if backward_kind(D) == "wgmma":
        kernel, threads, keys, smem = _wgmma_backward_kernel(D, dtype == "bf16", kernel_sched("wgmma bwd", D))
    else:
        kernel, threads, keys = _backward_kernel(D, dtype == "bf16", REGISTER_CAP.get(("bwd", D)), kernel_sched("bwd", D))
        smem = 0
    launch(kernel, (-(-T // keys), H, B), threads, q16.reshape(-1), k16.reshape(-1), v16.reshape(-1), do16.reshape(-1),
           cupy.ascontiguousarray(cache.lse).reshape(-1), drow.reshape(-1), mask, has, T, H, KV,
           _window(cache.window, T), np.float32(cache.scale), s, dq.reshape(-1), dk.reshape(-1), dv.reshape(-1),
           shared=smem)
    return dq, dk, dv
