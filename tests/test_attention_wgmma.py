"""Flash attention on Hopper's wgmma (kernels/csrc/flash_attention_wgmma.cu), forward and backward, against
the float64 reference (ops/attention.py) and against the mma.sync kernels.

    CPU     the CUDA C itself through tests/flash_attention_wgmma_emulate.cpp (g++; cp.async and wgmma
            deferred to the waits that wait for them, descriptors decoded by the PTX manual's rules, the
            A fragments of P exchanged across the warpgroup, a wgmma reading shared memory another
            thread wrote with no barrier in between aborts): odd T, GQA, windows, padding, a fully
            padded sequence, every shipped tile and small ones; bf16 2e-2, fp16 2e-3 (as the mma kernels)
    nvcc    the shipped instantiations for sm_90a: no spills, at most 255 registers, and no ptxas note
            that it serialised the wgmma pipeline (C7513 / C7514) or injected a warpgroup.arrive (C7519)
    GPU     (gpu mark, sm_90 only) against the float64 reference and the mma forward at real sizes
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kernels import flash_attention_mma as fm
from kernels import linked
from q4kdistill.errors import Q4KError
from test_attention_flash import EMU_BOUNDS, _bits16, _round16, check_lse, make_inputs, reference, rel_err

SMALL_TILES = [(64, 64, 1, 3), (64, 64, 2, 4), (128, 64, 1, 3)]   # (D, keys, warpgroups, slots) the harness has too


@pytest.fixture(scope="module", params=(13, 16, 17, 18, 20))
def emulated(tmp_path_factory, request):
    """The emulated kernels in instruction schedules 13, 16, 17, 18 and 20 (fm.SCHEDS; 15 is 13 with faw_forward_ws, emulated in every build; 16 is 13 with FawXch in the
    D = 64 backward, 17 with 128 queries a step there, 18 with P before the wait for dP, 20 with dQ by the bulk-copy
    engine; 19 is 15 and 18): every emulated test runs on each (16 to 20: the backward's tests only)."""
    from _helpers_emulate import build_emulator

    return build_emulator(tmp_path_factory, "flash_attention_wgmma_emulate.cpp",
                          {"FAW_SOURCE": linked.CSRC / "flash_attention_wgmma.cu"}, include_dirs=[linked.CSRC],
                          defines={"FAW_SCHED": request.param})


def emulated_forward(lib, q, k, v, mask, window, scale, dtype, tiles, out=0, ws=False):
    """(o, lse) of the emulated faw_forward<tiles>, outputs poisoned with NaN; out: 0 float32 o, else 16-bit bits.
    ws: faw_forward_ws (schedule 15), tiles = (D, keys, slots)."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    q16, k16, v16 = (_bits16(x, dtype) for x in (q, k, v))
    m = np.ones(1, np.uint8) if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
    o = np.full((B, T, H, D), np.nan, np.float32) if out == 0 else np.full((B, T, H, D), 0xFFFF, np.uint16)
    lse = np.full((B, H, T), np.nan, np.float32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)             # noqa: E731
    I, F = ctypes.c_int, ctypes.c_float
    entry = lib.emu_wgmma_forward_ws if ws else lib.emu_wgmma_forward
    rc = entry(I(D), *(I(t) for t in tiles[1:]), I(dtype == "bf16"), I(out), p(q16), p(k16), p(v16), p(m),
               I(mask is not None), I(B), I(T), I(H), I(KV), I(T + 1 if window is None else window), F(scale), p(o), p(lse))
    assert rc == 0, f"no emulated wgmma forward for {tiles}, out {out}, ws {ws} (rc {rc})"
    return o, lse


def _forward_differs(lib):
    """Skip a forward test in a build whose forward is another's (16's, 17's and 18's are 13's)."""
    if lib.emu_faw_sched() in (fm.XCH_SCHED, fm.QSPLIT_SCHED, fm.PSPLIT_SCHED, fm.BULK_SCHED):
        pytest.skip(f"(schedule {lib.emu_faw_sched()}'s forward is 13's)")


CASES = [   # B, T, H, KV, D, window, pad, dtype, tiles
    (1, 70, 2, 1, 64, None, None, "bf16", (64, 64, 1, 3)),
    (2, 37, 2, 2, 64, 9, [0, 37], "fp16", (64, 64, 1, 3)),          # a fully padded sequence
    (1, 200, 4, 2, 128, None, [6], "bf16", (128, 64, 1, 3)),         # GQA, 4 key tiles: every slot refilled
    (2, 203, 4, 2, 64, 45, [0, 7], "fp16", (64, 64, 2, 4)),          # a window inside a tile, two warpgroups
    (1, 300, 2, 1, 64, 150, None, "fp16", (64,) + fm.WGMMA_TILES[64]),
    (1, 300, 2, 1, 128, None, [3], "bf16", (128,) + fm.WGMMA_TILES[128]),
    (1, 129, 2, 2, 128, None, None, "fp16", (128,) + fm.WGMMA_TILES[128]),   # one row past a 128-row tile
]


@pytest.mark.parametrize("B,T,H,KV,D,window,pad,dtype,tiles", CASES)
def test_emulated_wgmma_forward_matches_float64_reference(emulated, B, T, H, KV, D, window, pad, dtype, tiles):
    _forward_differs(emulated)
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T * D + len(tiles), pad=pad)
    q, k, v = (_round16(x, dtype) for x in (q, k, v))
    scale = D ** -0.5
    want = reference(q, k, v, do, mask, window, scale)[0]
    o, lse = emulated_forward(emulated, q, k, v, mask, window, scale, dtype, tiles)
    err = rel_err(o, want)
    assert err < EMU_BOUNDS[dtype], f"wgmma {tiles} {dtype}: o relative error {err:.3g}"
    check_lse(lse, q, k, v, mask, window, scale, 1e-2)
    if pad is not None and max(pad) >= T:                  # a sequence whose queries see no key: o = 0, lse = +inf
        b = pad.index(max(pad))
        assert (o[b] == 0).all() and np.isinf(lse[b]).all()


@pytest.mark.parametrize("D,dtype", [(64, "bf16"), (64, "fp16"), (128, "fp16"), (128, "bf16")])
def test_emulated_wgmma_forward_writes_o_in_16_bits_as_a_cast_would(emulated, D, dtype):
    _forward_differs(emulated)
    B, T, H, KV = 1, 150, 2, 1
    q, k, v, _, mask = make_inputs(B, T, H, KV, D, seed=D + len(dtype), pad=[6])
    tiles = (D,) + fm.WGMMA_TILES[D]
    o32, lse32 = emulated_forward(emulated, q, k, v, mask, None, D ** -0.5, dtype, tiles)
    o16, lse = emulated_forward(emulated, q, k, v, mask, None, D ** -0.5, dtype, tiles, out=2 if dtype == "bf16" else 1)
    assert (o16 == _bits16(o32, dtype)).all()
    assert np.array_equal(lse, lse32)


WS_CASES = [   # B, T, H, KV, D, window, pad, dtype, (keys, slots): the warp-specialised forward (schedule 15)
    (1, 70, 2, 1, 64, None, None, "bf16", (64, 2)),
    (2, 37, 2, 2, 64, 9, [0, 37], "fp16", (64, 2)),                 # a fully padded sequence
    (1, 333, 4, 2, 128, None, [6], "bf16", (64, 2)),                # GQA, 6 key tiles through 2 slots
    (2, 203, 4, 2, 64, 45, [0, 7], "fp16", (64, 2)),                # a window inside a tile
    (1, 300, 2, 1, 64, 150, None, "fp16", (128, 4)),                # the shipped D = 64 tiles
    (1, 520, 2, 1, 128, None, [3], "bf16", (128, 3)),               # the shipped D = 128 tiles, slots refilled
    (1, 129, 2, 2, 128, None, None, "fp16", (128, 3)),              # one row past a 128-row tile
]


@pytest.mark.parametrize("B,T,H,KV,D,window,pad,dtype,tiles", WS_CASES)
def test_emulated_warp_specialised_forward_matches_float64_reference(emulated, B, T, H, KV, D, window, pad, dtype,
                                                                     tiles):
    """faw_forward_ws: a producer warpgroup filling slots through mbarriers, two consumers in ping-pong (named
    barriers); the emulation lands a slot's copies only when its phase completes, so a consumer that read a slot
    early, or a producer that refilled it under a product in flight, fails here."""
    if emulated.emu_faw_sched() != 13:
        pytest.skip("(independent of the build's schedule: run once)")
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T * D + 15, pad=pad)
    q, k, v = (_round16(x, dtype) for x in (q, k, v))
    scale = D ** -0.5
    o, lse = emulated_forward(emulated, q, k, v, mask, window, scale, dtype, (D,) + tiles, ws=True)
    want = reference(q, k, v, do, mask, window, scale)
    err = rel_err(o, want[0])
    assert err < EMU_BOUNDS[dtype], f"ws {dtype}: {err:.3g}"
    check_lse(lse, q, k, v, mask, window, scale, 2e-2)
    plain = {(64, 64): (64, 64, 2, 4), (64, 128): (64, 128, 2, 4), (128, 128): (128, 128, 2, 3)}.get((D, tiles[0]))
    if plain:                                  # the same tiles without warp specialisation: the very same sums
        o2, lse2 = emulated_forward(emulated, q, k, v, mask, window, scale, dtype, plain)
        assert np.array_equal(o, o2, equal_nan=True) and np.array_equal(lse, lse2, equal_nan=True)


def test_wrapper_shared_memory_is_the_kernels(emulated):
    for tiles in SMALL_TILES + [(D,) + t for D, t in fm.WGMMA_TILES.items()]:
        assert emulated.emu_wgmma_smem(*tiles) == fm.wgmma_smem(*tiles), tiles
        assert fm.wgmma_smem(*tiles) <= fm.WGMMA_SMEM_LIMIT
    for D, bn, st in ((64, 64, 2), (128, 64, 2), (64, 128, 4), (128, 128, 3)):
        assert emulated.emu_wgmma_ws_smem(D, bn, st) == fm.wgmma_smem(D, bn, 2, st, ws=True) <= fm.WGMMA_SMEM_LIMIT
    for D in fm.WGMMA_TILES:
        assert emulated.emu_wgmma_bwd_smem(D) == fm.wgmma_bwd_smem(D, emulated.emu_faw_sched()) <= fm.WGMMA_SMEM_LIMIT


def emulated_attention(lib, q, k, v, do, mask, window, scale, dtype):
    """(o, dq, dk, dv, lse): the emulated wgmma forward (shipped tiles) and backward, prepared as
    mma_attention_backward prepares them (dO and drow scaled by a power of two; dq zeroed; dk, dv
    zeroed under GQA, else poisoned with NaN)."""
    from test_attention_flash import _dkv_buffers

    B, T, H, D = q.shape
    KV = k.shape[2]
    o, lse = emulated_forward(lib, q, k, v, mask, window, scale, dtype, (D,) + fm.WGMMA_TILES[D])
    s = np.array([2.0 ** -np.floor(np.log2(np.abs(do).max()))], np.float32)
    q16, k16, v16, do16 = (_bits16(x, dtype) for x in (q, k, v, do * s[0]))
    drow = np.ascontiguousarray((do.astype(np.float32) * o).sum(axis=-1).transpose(0, 2, 1)) * s[0]   # [B, H, T]
    m = np.ones(1, np.uint8) if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
    dq = np.zeros((B, T, H, D), np.float32)
    dk, dv = _dkv_buffers(B, T, H, KV, D)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)             # noqa: E731
    I, F = ctypes.c_int, ctypes.c_float
    rc = lib.emu_wgmma_backward(I(D), I(dtype == "bf16"), p(q16), p(k16), p(v16), p(do16), p(lse), p(drow), p(m),
                                I(mask is not None), I(B), I(T), I(H), I(KV), I(T + 1 if window is None else window),
                                F(scale), p(s), p(dq), p(dk), p(dv))
    assert rc == 0, f"no emulated wgmma backward for D = {D}"
    return o, dq, dk, dv, lse


BWD_CASES = [   # B, T, H, KV, D, window, pad, dtype
    (1, 70, 2, 1, 64, None, None, "bf16"),
    (2, 37, 2, 2, 64, 9, [0, 37], "fp16"),          # a fully padded sequence
    (1, 200, 4, 2, 128, None, [6], "bf16"),         # GQA: the query heads of a kv head add into dk, dv
    (2, 203, 4, 2, 64, 45, [0, 7], "fp16"),         # a window inside a query tile; key tiles past T
    (1, 300, 2, 1, 128, 150, [3], "fp16"),
    (1, 257, 2, 1, 64, None, None, "fp16"),         # 3 key tiles, the last one key long
    (1, 650, 2, 1, 64, 400, [9], "bf16"),           # >= 4 query steps of 128 (17): the 3-stage ring wraps
]


@pytest.mark.parametrize("B,T,H,KV,D,window,pad,dtype", BWD_CASES)
def test_emulated_wgmma_backward_matches_float64_reference(emulated, B, T, H, KV, D, window, pad, dtype):
    from test_attention_flash import check_all
    if fm.kernel_sched("wgmma bwd", D, emulated.emu_faw_sched()) != emulated.emu_faw_sched():
        pytest.skip(f"(schedule {emulated.emu_faw_sched()}'s backward at D = {D} is another build's)")

    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T * D + 1, pad=pad)
    do = do * 1e-7                         # gradients this small are fp16 subnormals unless scaled
    q, k, v = (_round16(x, dtype) for x in (q, k, v))
    scale = D ** -0.5
    want = reference(q, k, v, do, mask, window, scale)
    o, dq, dk, dv, lse = emulated_attention(emulated, q, k, v, do, mask, window, scale, dtype)
    check_all((o, dq, dk, dv), want, EMU_BOUNDS[dtype], f"emulated wgmma {dtype}")


def test_backward_kind_by_environment(monkeypatch):
    monkeypatch.delenv(fm.BWD_ENV, raising=False)
    here = "wgmma" if linked.wgmma_available() else "mma"
    assert fm.backward_kind(64) == "mma" and fm.backward_kind(128) == here         # the measured default
    monkeypatch.setenv(fm.BWD_ENV, "mma")
    assert fm.backward_kind(128) == "mma"
    monkeypatch.setenv(fm.BWD_ENV, "wgmma")
    want = "wgmma" if linked.wgmma_available() else "mma"
    assert fm.backward_kind(64) == fm.backward_kind(128) == want and fm.backward_kind(256) == "mma"
    monkeypatch.setenv(fm.BWD_ENV, "x")
    with pytest.raises(Q4KError, match="expected mma or wgmma"):
        fm.backward_kind(64)


def test_forward_kind_by_environment(monkeypatch):
    monkeypatch.delenv(fm.FWD_ENV, raising=False)
    here = "wgmma" if linked.wgmma_available() else "mma"
    assert fm.forward_kind(64) == "mma" and fm.forward_kind(128) == here          # D = 128 by default (measured)
    monkeypatch.setenv(fm.FWD_ENV, "mma")
    assert fm.forward_kind(128) == "mma"
    monkeypatch.setenv(fm.FWD_ENV, "wgmma")
    want = "wgmma" if linked.wgmma_available() else "mma"
    assert fm.forward_kind(64) == fm.forward_kind(128) == want
    assert fm.forward_kind(256) == fm.forward_kind(32) == "mma"            # no wgmma tile for these
    monkeypatch.setenv(fm.FWD_ENV, "fast")
    with pytest.raises(Q4KError, match="expected mma or wgmma"):
        fm.forward_kind(64)


def test_schedule_setting(monkeypatch):
    monkeypatch.delenv(fm.SCHED_ENV, raising=False)
    assert fm.sched() == 19
    for s in ("13", "15", "17", " 18 "):
        monkeypatch.setenv(fm.SCHED_ENV, s)
        assert fm.sched() == int(s)
    monkeypatch.setenv(fm.SCHED_ENV, "21")
    with pytest.raises(Q4KError, match="FA_SCHED"):
        fm.sched()


def test_tiles_setting(monkeypatch):
    monkeypatch.delenv(fm.TILES_ENV, raising=False)
    assert fm.wgmma_tiles(128) == fm.WGMMA_TILES[128]
    monkeypatch.setenv(fm.TILES_ENV, "64,1,3")
    assert fm.wgmma_tiles(128) == (64, 1, 3)
    assert fm.wgmma_smem(128, 64, 1, 3) <= 114 * 1024      # two CTAs fit an SM's 228 KB with their 1 KB each
    for bad in ("64,1", "96,1,3", "64,3,3", "64,1,2", "128,2,4", "x,y,z"):   # 128,2,4 at D = 128: 289 KB
        monkeypatch.setenv(fm.TILES_ENV, bad)
        with pytest.raises(Q4KError, match="FA_TILES"):
            fm.wgmma_tiles(128)


def test_source_compiles_without_spills_or_serialised_wgmma(tmp_path):
    from _helpers_nvcc import ptxas_sm90a
    text = linked.source_text("flash_attention_wgmma.cu")
    names = []
    for D, sched in sorted({(D, fm.kernel_sched("wgmma fwd", D, s)) for D in fm.WGMMA_TILES for s in fm.SCHEDS}):
        for bf16 in (True, False):
            for out in (0, 2 if bf16 else 1):
                name, extra = fm.wgmma_forward_source(D, bf16, out, schedule=sched)
                params = "q, k, v, mask, has_mask, T, H, KV, window, scale, o, lse"
                text += extra + (f'extern "C" __global__ void k_{name}(const u16* q, const u16* k, const u16* v, '
                                 f'const u8* mask, int has_mask, int T, int H, int KV, int window, float scale, '
                                 f'void* o, float* lse) {{ {name}({params}); }}\n')
                names.append(f"k_{name}")
    bwd_params = "q, k, v, dout, lse, drow, mask, has_mask, T, H, KV, window, scale, dout_scale, dq, dk, dv"
    for D, sched in sorted({(D, fm.kernel_sched("wgmma bwd", D, s)) for D in fm.WGMMA_TILES for s in fm.SCHEDS}):
        for bf16 in (True, False):
            name, extra = fm.wgmma_backward_source(D, bf16, sched)
            text += extra + (f'extern "C" __global__ void k_{name}(const u16* q, const u16* k, const u16* v, '
                             f'const u16* dout, const float* lse, const float* drow, const u8* mask, int has_mask, '
                             f'int T, int H, int KV, int window, float scale, const float* dout_scale, float* dq, '
                             f'float* dk, float* dv) {{ {name}({bwd_params}); }}\n')
            names.append(f"k_{name}")
    ptxas_sm90a(tmp_path, text, names)


# -- on a GPU (sm_90) ---------------------------------------------------------------------------------
def _need_wgmma(schedule=None):
    if not linked.wgmma_available():
        pytest.skip("needs an sm_90 GPU (H100 / H200)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,KV,D,window,pad", [(2, 1000, 8, 2, 64, None, [0, 37]), (1, 1537, 8, 1, 128, None, [5]),
                                                   (1, 2100, 4, 4, 128, 512, None), (1, 777, 14, 2, 64, 100, [3])])
@pytest.mark.parametrize("schedule", fm.SCHEDS, ids=lambda s: f"sched{s}")
def test_gpu_wgmma_forward_matches_reference_and_mma(monkeypatch, B, T, H, KV, D, window, pad, dtype, schedule):
    import cupy

    from test_attention_flash import _reference_gpu
    _need_wgmma(schedule)
    monkeypatch.setenv(fm.SCHED_ENV, str(schedule))
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T + D, pad=pad)
    q, k, v = (_round16(x, dtype) for x in (q, k, v))
    scale = D ** -0.5
    want = _reference_gpu(q, k, v, do, mask, window, scale)[0]
    args = [cupy.asarray(x, dtype=np.float32) for x in (q, k, v)]
    m = None if mask is None else cupy.asarray(mask)
    got = {}
    for kind in ("wgmma", "mma"):
        monkeypatch.setenv(fm.FWD_ENV, kind)
        assert fm.forward_kind(D) == kind
        o, lse, _ = fm.mma_attention_forward(*args, m, window, scale, dtype)
        got[kind] = (o.get(), lse.get())
    err = rel_err(got["wgmma"][0], want)
    assert err < 3e-2 if dtype == "bf16" else err < 3e-3, f"wgmma {dtype}: {err:.3g}"
    assert rel_err(got["wgmma"][0], got["mma"][0].astype(np.float64)) < (2e-2 if dtype == "bf16" else 2e-3)
    seen = np.isfinite(got["mma"][1])
    assert (np.isfinite(got["wgmma"][1]) == seen).all()
    assert np.abs(got["wgmma"][1][seen] - got["mma"][1][seen]).max() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", ["64,1,3", "128,2,3"])
@pytest.mark.parametrize("schedule", fm.SCHEDS, ids=lambda s: f"sched{s}")
def test_gpu_wgmma_forward_tiles_setting(monkeypatch, tiles, schedule):
    """$Q4KDISTILL_FA_TILES: the 64-key, one-warpgroup forward (two CTAs an SM) gives what the default tiles
    give (fp16: P is rounded to 16 bits against a running max that differs with the tile, so to fp16's
    precision), causal with a window and a padding mask, a partial last tile."""
    import cupy

    _need_wgmma(schedule)
    monkeypatch.setenv(fm.SCHED_ENV, str(schedule))
    monkeypatch.setenv(fm.FWD_ENV, "wgmma")
    q, k, v, _, mask = make_inputs(1, 1111, 8, 2, 128, seed=5, pad=[7])
    args = [cupy.asarray(_round16(x, "fp16"), dtype=np.float32) for x in (q, k, v)]
    if fm.kernel_sched("wgmma fwd", 128, schedule) == fm.WS_SCHED and tiles.split(",")[1] == "1":   # two consumer warpgroups or none
        monkeypatch.setenv(fm.TILES_ENV, tiles)
        with pytest.raises(Q4KError, match="warp-specialised"):
            fm.mma_attention_forward(*args, cupy.asarray(mask), 300, 128 ** -0.5, "fp16")
        return
    got = []
    for t in ("", tiles):
        monkeypatch.setenv(fm.TILES_ENV, t)
        o, lse, _ = fm.mma_attention_forward(*args, cupy.asarray(mask), 300, 128 ** -0.5, "fp16")
        got.append((o.get(), lse.get()))
    assert rel_err(got[1][0], got[0][0].astype(np.float64)) < 2e-3
    seen = np.isfinite(got[0][1])
    assert (np.isfinite(got[1][1]) == seen).all() and np.abs(got[1][1][seen] - got[0][1][seen]).max() < 1e-3


@pytest.mark.gpu
def test_gpu_wgmma_forward_16_bit_o_and_a_long_sequence(monkeypatch):
    """The teacher's use: D = 128, 28 heads over 4 kv heads, 8192 tokens, o in fp16: the kernel's o is its
    float32 o cast, and both agree with the mma forward."""
    import cupy

    _need_wgmma()
    monkeypatch.setenv(fm.FWD_ENV, "wgmma")
    rng = cupy.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 8192, h, 128), dtype=np.float32) for h in (28, 4, 4))
    o32, lse32, _ = fm.mma_attention_forward(q, k, v, None, None, 128 ** -0.5, "fp16")
    o16, lse, _ = fm.mma_attention_forward(q, k, v, None, None, 128 ** -0.5, "fp16", out_dtype=np.float16)
    assert (o16.view(np.uint16) == fm.to16(o32, "fp16")).all() and (lse == lse32).all()
    monkeypatch.setenv(fm.FWD_ENV, "mma")
    ref, lse_ref, _ = fm.mma_attention_forward(q, k, v, None, None, 128 ** -0.5, "fp16")
    assert float(cupy.abs(o32 - ref).max() / cupy.abs(ref).max()) < 2e-3
    assert float(cupy.abs(lse - lse_ref).max()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,KV,D,window,pad", [(2, 1000, 8, 2, 64, None, [0, 37]), (1, 1537, 8, 1, 128, None, [5]),
                                                   (1, 2100, 4, 4, 128, 512, None), (1, 777, 14, 2, 64, 100, [3])])
@pytest.mark.parametrize("schedule", fm.SCHEDS, ids=lambda s: f"sched{s}")
def test_gpu_wgmma_backward_matches_reference_and_mma(monkeypatch, B, T, H, KV, D, window, pad, dtype, schedule):
    """Both wgmma kernels (forward and backward) against the float64 reference, and their gradients
    against the mma.sync kernels' on the same inputs."""
    import cupy

    from q4kdistill.student.ops.flash_attention import flash_attention_backward, flash_attention_forward
    from test_attention_flash import BOUNDS, _reference_gpu, check_all
    _need_wgmma(schedule)
    monkeypatch.setenv(fm.SCHED_ENV, str(schedule))
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T + D + 1, pad=pad)
    q, k, v, do = (_round16(x, dtype) for x in (q, k, v, do))
    scale = D ** -0.5
    want = _reference_gpu(q, k, v, do, mask, window, scale)
    args = [cupy.asarray(x, dtype=np.float32) for x in (q, k, v)]
    m = None if mask is None else cupy.asarray(mask)
    got = {}
    for kind in ("wgmma", "mma"):
        monkeypatch.setenv(fm.FWD_ENV, kind)
        monkeypatch.setenv(fm.BWD_ENV, kind)
        assert fm.backward_kind(D) == kind
        o, cache = flash_attention_forward(*args, m, window, scale, path="mma", mma_dtype=dtype)
        got[kind] = [x.get() for x in (o,) + flash_attention_backward(cupy.asarray(do, dtype=np.float32), cache)]
    check_all(got["wgmma"], want, BOUNDS[dtype], f"wgmma {dtype}")
    check_all(got["wgmma"], [x.astype(np.float64) for x in got["mma"]], BOUNDS[dtype], f"wgmma vs mma {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "gemma3-swa"])
def test_gpu_teacher_with_wgmma_attention_matches_numpy(name, tmp_path, monkeypatch):
    """The teacher with $Q4KDISTILL_FA_FWD=wgmma (its attention on the wgmma forward, 16-bit o) against its
    NumPy path, as tests/test_teacher_gpu.py holds the default kernels (the tiny families: 64-wide heads;
    gemma3-swa: sliding windows)."""
    from q4kdistill.teacher.model import Teacher
    from test_teacher_forward import write_family
    from test_teacher_gpu import padded
    from test_teacher_real import cosine_rows

    _need_wgmma()
    monkeypatch.setenv(fm.FWD_ENV, "wgmma")
    path = write_family(name, tmp_path, seed=9)
    cpu, gpu = Teacher.load(path, device="cpu", log=None), Teacher.load(path, device="cuda", log=None)
    if gpu.config.head_dim not in fm.WGMMA_TILES:
        pytest.skip(f"head size {gpu.config.head_dim} has no wgmma tile")
    ids, mask = padded(cpu.vocab_size, 4, 200, seed=4)                 # 2 query tiles of 128, padding
    want = cpu.logits_for_batch(ids, mask)[mask]
    from q4kdistill import backend
    got = backend.to_host(gpu.logits_for_batch(ids, mask))[mask]
    assert np.isfinite(got).all() and cosine_rows(got, want).min() >= 0.9999



@pytest.mark.gpu
def test_gpu_wgmma_kernels_are_built_with_link_time_optimisation():
    """On the GPU the linked C must be inlined into the Numba kernel (nvJitLink): linked as a separate ABI
    function, the forward spills to local memory and ptxas serialises its wgmma pipeline (kernels/link_check.py,
    tests/test_link_check.py)."""
    import cupy

    if not linked.wgmma_available():
        pytest.skip("needs an sm_90 GPU")
    assert linked.lto_available(), "nvJitLink not found: pip install nvidia-nvjitlink (the gpu extra has it)"
    rng = cupy.random.default_rng(0)
    q = rng.standard_normal((1, 256, 2, 128), dtype=np.float32)
    kv = rng.standard_normal((1, 256, 1, 128), dtype=np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fm.FWD_ENV, "wgmma")
        mp.setenv(fm.BWD_ENV, "wgmma")
        o, lse, extra = fm.mma_attention_forward(q, kv, kv, None, None, 128 ** -0.5, "bf16")
        cache = type("Cache", (), dict(extra=extra, o=o, lse=lse, key_mask=None, window=None, scale=128 ** -0.5))
        fm.mma_attention_backward(cupy.ones_like(q), cache)
    cupy.cuda.Device().synchronize()
    fwd = fm._wgmma_forward_kernel(128, True, 0, fm.kernel_sched("wgmma fwd", 128), fm.wgmma_tiles(128))[0]
    bwd = fm._wgmma_backward_kernel(128, True, fm.kernel_sched("wgmma bwd", 128))[0]
    for kernel in (fwd, bwd):                      # (the kernels of the schedule in effect, which the calls built)
        local = kernel.get_local_mem_per_thread()
        regs = kernel.get_regs_per_thread()
        assert local and all(v == 0 for v in local.values()), (local, regs)


def test_equal_kernels_are_built_once():
    """kernel_sched: a schedule whose kernel's code is another's builds that one (16's to 18's forward is 13's, 15's
    backward is 13's, 19 is 15's forward and 18's backward, 20 19's but at D = 64 its own backward, the mma.sync kernels
    are one code, 13's); each distinct kernel keeps its own."""
    ks = fm.kernel_sched
    assert fm.SCHEDS == (13, 15, 16, 17, 18, 19, 20)
    assert [ks("wgmma fwd", D, s) for s in fm.SCHEDS for D in (64, 128)] == [13, 13, 15, 15, 13, 13,
                                                                              13, 13, 13, 13, 15, 15, 15, 15]
    assert [ks("wgmma bwd", 64, s) for s in fm.SCHEDS] == [13, 13, 16, 17, 18, 18, 20]
    assert [ks("wgmma bwd", 128, s) for s in fm.SCHEDS] == [13, 13, 13, 13, 18, 18, 18]
    assert {ks(k, D, s) for k in ("fwd", "bwd") for D in (64, 128, 256) for s in fm.SCHEDS} == {13}
    assert fm.wgmma_bwd_smem(64, 16) == fm.wgmma_bwd_smem(64, 13) + 4 * 8192
    assert fm.wgmma_bwd_smem(128, 16) == fm.wgmma_bwd_smem(128, 17) == fm.wgmma_bwd_smem(128, 13)
    assert fm.wgmma_bwd_smem(64, 18) == fm.wgmma_bwd_smem(64, 17) and fm.wgmma_bwd_smem(128, 18) == fm.wgmma_bwd_smem(128, 13)
    assert fm.wgmma_bwd_smem(64, 20) == fm.wgmma_bwd_smem(64, 18)
    assert fm.wgmma_bwd_smem(64, 17) == fm.wgmma_bwd_smem(64, 13) + 2 * 3 * 64 * 64 * 2 + 2 * 128 * 64 * 2 + 2 * 3 * 64 * 4
