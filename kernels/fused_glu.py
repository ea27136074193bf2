"""Gated linear units y = act(gate) * up, forward and backward, elementwise over [R, F].

    act "silu":      silu(g) = g * sigmoid(g),   silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)
    act "gelu_tanh": 0.5 g (1 + tanh(u)),  u = c (g + 0.044715 g^3),  c = sqrt(2/pi)
                     gelu'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2),  t = tanh(u)
    sigmoid(g) = 0.5 (1 + tanh(g / 2)): no exp overflow for large |g|.
    backward:  dgate = dy * up * act'(gate),   dup = dy * act(gate)

gate and up are read as (array, row stride, column offset), so they can be two [R, F] arrays or the
two halves of one fused [R, 2F] product (gate = gu[:, :F], up = gu[:, F:]); the backward writes
dgate/dup the same way (two arrays, or the halves of one [R, 2F] gradient, possibly gu itself).
Blocks of a 2-D grid stride over rows (y) and over column tiles of THREADS * UNROLL (x), UNROLL elements
per thread per tile (j0 + k * threads, so each k is coalesced), all loaded before any is stored: row and
column come from the loops, never from a division per element (the 1-D form's e // F, e % F ran the
teacher's GLU at ~2 TB/s); float32 math on fp32 / bf16 / fp16 storage.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from q4kdistill.backend import array_module
from q4kdistill.errors import Q4KError

from ._device import SIMULATOR
from ._ptx import f16hi, f16lo, half2, ld4, st4
from .fused_io import F, aligned16, code_of, empty_as, launch_shared, loader, row_grid, storage, storer

ACTS = ("silu", "gelu_tanh")
THREADS = 256
UNROLL = 4            # elements per thread per step (step = the grid's size): loads issued together
VECTOR = True         # glu_fwd takes the 16-byte-access kernel where it applies (tests switch it off)
_C = F(math.sqrt(2.0 / math.pi))
_A = F(0.044715)


@functools.lru_cache(maxsize=None)
def act_functions(act: str):
    """(act(g), act'(g)) device functions, float32."""
    if act == "silu":
        @cuda.jit(device=True, inline=True)
        def f(g):
            return g * (F(0.5) + F(0.5) * math.tanh(F(0.5) * g))

        @cuda.jit(device=True, inline=True)
        def df(g):
            s = F(0.5) + F(0.5) * math.tanh(F(0.5) * g)
            return s * (F(1) + g * (F(1) - s))
        return f, df
    if act == "gelu_tanh":
        @cuda.jit(device=True, inline=True)
        def f(g):
            return F(0.5) * g * (F(1) + math.tanh(_C * (g + _A * g * g * g)))

        @cuda.jit(device=True, inline=True)
        def df(g):
            t = math.tanh(_C * (g + _A * g * g * g))
            return F(0.5) * (F(1) + t) + F(0.5) * g * (F(1) - t * t) * _C * (F(1) + F(3) * _A * g * g)
        return f, df
    raise Q4KError(f"unknown activation {act!r} (expected one of {', '.join(ACTS)})")


@functools.lru_cache(maxsize=None)
def glu_forward_kernel(act, g_code, u_code, y_code):
    f, _ = act_functions(act)
    ld_g, ld_u, st_y = loader(g_code), loader(u_code), storer(y_code)

    @cuda.jit
    def kernel(gate, g_ld, g_off, up, u_ld, u_off, R, Fd, y):   # y [R*Fd]
        tid, width = cuda.threadIdx.x, cuda.blockDim.x
        gv = cuda.local.array(UNROLL, F)
        uv = cuda.local.array(UNROLL, F)
        for r in range(cuda.blockIdx.y, R, cuda.gridDim.y):
            gb, ub, yb = r * g_ld + g_off, r * u_ld + u_off, r * Fd
            for j0 in range(cuda.blockIdx.x * width * UNROLL + tid, Fd, cuda.gridDim.x * width * UNROLL):
                for k in range(UNROLL):                  # loads only: all in flight together
                    j = j0 + k * width
                    gv[k], uv[k] = F(0), F(0)
                    if j < Fd:
                        gv[k] = ld_g(gate, gb + j)
                        uv[k] = ld_u(up, ub + j)
                for k in range(UNROLL):
                    j = j0 + k * width
                    if j < Fd:
                        st_y(y, yb + j, f(gv[k]) * uv[k])

    return kernel


@functools.lru_cache(maxsize=None)
def glu_backward_kernel(act, g_code, u_code, dy_code, dg_code, du_code):
    f, df = act_functions(act)
    ld_g, ld_u, ld_dy = loader(g_code), loader(u_code), loader(dy_code)
    st_dg, st_du = storer(dg_code), storer(du_code)

    @cuda.jit
    def kernel(gate, g_ld, g_off, up, u_ld, u_off, dy, R, Fd, dg, dg_ld, dg_off, du, du_ld, du_off):
        tid, width = cuda.threadIdx.x, cuda.blockDim.x
        gv = cuda.local.array(UNROLL, F)
        uv = cuda.local.array(UNROLL, F)
        dv = cuda.local.array(UNROLL, F)
        for r in range(cuda.blockIdx.y, R, cuda.gridDim.y):
            gb, ub, yb = r * g_ld + g_off, r * u_ld + u_off, r * Fd
            db, eb = r * dg_ld + dg_off, r * du_ld + du_off
            for j0 in range(cuda.blockIdx.x * width * UNROLL + tid, Fd, cuda.gridDim.x * width * UNROLL):
                for k in range(UNROLL):                  # loads only: all in flight together
                    j = j0 + k * width
                    gv[k], uv[k], dv[k] = F(0), F(0), F(0)
                    if j < Fd:
                        gv[k] = ld_g(gate, gb + j)
                        uv[k] = ld_u(up, ub + j)
                        dv[k] = ld_dy(dy, yb + j)
                for k in range(UNROLL):                  # every read of these elements is done
                    j = j0 + k * width
                    if j < Fd:
                        st_dg(dg, db + j, dv[k] * uv[k] * df(gv[k]))
                        st_du(du, eb + j, dv[k] * f(gv[k]))

    return kernel


@functools.lru_cache(maxsize=None)
def glu_forward_f32_f16_kernel(act):
    """The teacher's case, vectorised: float32 gate and up (two C-contiguous arrays), float16 y; each
    thread takes 8 consecutive elements: four 16-byte loads, one 16-byte store (the scalar kernel's
    4-byte loads and 2-byte stores ran the 7B's GLU at ~2.3 TB/s on an H200). Same float32 math,
    the same rounding (round to nearest even), so the same y bit for bit."""
    f, _ = act_functions(act)

    @cuda.jit
    def kernel(gate, up, y32, n8):                 # gate, up float32 [8 n8]; y32 uint32 [4 n8] (fp16 pairs)
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < n8:
            e = i * 8
            g0, g1, g2, g3 = ld4(gate, e)
            g4, g5, g6, g7 = ld4(gate, e + 4)
            u0, u1, u2, u3 = ld4(up, e)
            u4, u5, u6, u7 = ld4(up, e + 4)
            st4(y32, i * 4, half2(f(g0) * u0, f(g1) * u1), half2(f(g2) * u2, f(g3) * u3),
                half2(f(g4) * u4, f(g5) * u5), half2(f(g6) * u6, f(g7) * u7))
            i += cuda.gridDim.x * cuda.blockDim.x

    return kernel


@functools.lru_cache(maxsize=None)
def glu_forward_f16_f16_kernel(act):
    """As glu_forward_f32_f16_kernel for float16 gate and up (the GEMMs' outputs written in 16 bits):
    two 16-byte loads and one 16-byte store a thread, 8 elements; float32 math on the widened values."""
    f, _ = act_functions(act)

    @cuda.jit
    def kernel(gate32, up32, y32, n8):             # gate32, up32, y32 uint32 [4 n8]: fp16 pairs
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < n8:
            a0, a1, a2, a3 = ld4(gate32, i * 4)
            b0, b1, b2, b3 = ld4(up32, i * 4)
            st4(y32, i * 4, half2(f(f16lo(a0)) * f16lo(b0), f(f16hi(a0)) * f16hi(b0)),
                half2(f(f16lo(a1)) * f16lo(b1), f(f16hi(a1)) * f16hi(b1)),
                half2(f(f16lo(a2)) * f16lo(b2), f(f16hi(a2)) * f16hi(b2)),
                half2(f(f16lo(a3)) * f16lo(b3), f(f16hi(a3)) * f16hi(b3)))
            i += cuda.gridDim.x * cuda.blockDim.x

    return kernel


def _vector_forward(gate, up, y) -> bool:
    """Whether glu_fwd takes a 16-byte-access kernel: float32 (glu_forward_f32_f16_kernel) or float16
    (glu_forward_f16_f16_kernel) gate and up, float16 y, all C-contiguous, 16-byte aligned, a multiple
    of 8 elements."""
    return (up is not None and gate.dtype == up.dtype and gate.dtype in (np.float32, np.float16)
            and y.dtype == np.float16 and gate.size % 8 == 0
            and all(a.flags.c_contiguous and aligned16(a) for a in (gate, up, y)))


# -- launchers ---------------------------------------------------------------------------------
def _halves(gate, up, what):
    """(gate array, row stride, offset, up array, row stride, offset, lead shape, F) from either two
    [..., F] arrays or (up None) one fused [..., 2F] array."""
    if up is None:
        if gate.shape[-1] % 2:
            raise Q4KError(f"glu: a fused {what} needs an even last axis [..., 2F], got {tuple(gate.shape)}")
        Fd = gate.shape[-1] // 2
        s = storage(gate)
        return s, 2 * Fd, 0, s, 2 * Fd, Fd, tuple(gate.shape[:-1]), Fd
    if tuple(gate.shape) != tuple(up.shape):
        raise Q4KError(f"glu: {what} gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    Fd = gate.shape[-1]
    return storage(gate), Fd, 0, storage(up), Fd, 0, tuple(gate.shape[:-1]), Fd


def _grid(R, Fd):
    """(grid (column blocks, row blocks), threads): a block covers THREADS * UNROLL columns of a row and
    strides over rows, ~8k blocks in all (no division per element)."""
    return row_grid(R, Fd, UNROLL, THREADS)


def glu_fwd(gate, up, act, y=None):
    """act(gate) * up: gate, up [..., F] (or gate a fused [..., 2F] and up None) -> y [..., F]
    (gate's type unless ``y`` is given)."""
    xp = array_module(gate)
    g, g_ld, g_off, u, u_ld, u_off, lead, Fd = _halves(gate, up, "input")
    y = empty_as(xp, lead + (Fd,), gate) if y is None else y
    if tuple(y.shape) != lead + (Fd,):
        raise Q4KError(f"glu: y has shape {tuple(y.shape)}, expected {lead + (Fd,)}")
    R = int(np.prod(lead, dtype=np.int64))
    if R * Fd and VECTOR and _vector_forward(gate, up, y):
        n8 = R * Fd // 8
        blocks = max(1, min(-(-n8 // THREADS), 2 if SIMULATOR else 8 * 1024))
        if gate.dtype == np.float32:
            kernel, g, u = glu_forward_f32_f16_kernel(act), storage(gate), storage(up)
        else:
            kernel, g, u = glu_forward_f16_f16_kernel(act), storage(gate).view(np.uint32), storage(up).view(np.uint32)
        launch_shared(kernel, blocks, 32 if SIMULATOR else THREADS, g, u, storage(y).view(np.uint32), n8)
    elif R * Fd:
        kernel = glu_forward_kernel(act, code_of(gate), code_of(gate if up is None else up), code_of(y))
        launch_shared(kernel, *_grid(R, Fd), g, g_ld, g_off, u, u_ld, u_off, R, Fd, storage(y))
    return y


def glu_bwd(dy, gate, up, act, dgate=None, dup=None):
    """dy [..., F] -> (dgate, dup), each [..., F]; or, with up None (gate fused [..., 2F]), one
    fused gradient [..., 2F] returned twice as (dgu, None). ``dgate`` may be given (with ``dup``, or
    alone as the fused [..., 2F] output; it may be the input itself: in place)."""
    xp = array_module(dy)
    g, g_ld, g_off, u, u_ld, u_off, lead, Fd = _halves(gate, up, "input")
    if tuple(dy.shape) != lead + (Fd,):
        raise Q4KError(f"glu: dy has shape {tuple(dy.shape)}, expected {lead + (Fd,)}")
    fused_out = up is None and dup is None
    if fused_out:
        dgate = empty_as(xp, lead + (2 * Fd,), dy) if dgate is None else dgate
        dg, dg_ld, dg_off, du, du_ld, du_off, _, _ = _halves(dgate, None, "gradient")
        du_code = dg_code = code_of(dgate)
    else:
        dgate = empty_as(xp, lead + (Fd,), dy) if dgate is None else dgate
        dup = empty_as(xp, lead + (Fd,), dy) if dup is None else dup
        dg, dg_ld, dg_off, du, du_ld, du_off, _, _ = _halves(dgate, dup, "gradient")
        dg_code, du_code = code_of(dgate), code_of(dup)
    if tuple(dgate.shape[:-1]) != lead:
        raise Q4KError(f"glu: gradient shape {tuple(dgate.shape)} does not match {lead + (Fd,)}")
    R = int(np.prod(lead, dtype=np.int64))
    if R * Fd:
        kernel = glu_backward_kernel(act, code_of(gate), code_of(gate if up is None else up), code_of(dy),
                                     dg_code, du_code)
        launch_shared(kernel, *_grid(R, Fd), g, g_ld, g_off, u, u_ld, u_off, storage(dy), R, Fd,
                      dg, dg_ld, dg_off, du, du_ld, du_off)
    return (dgate, None) if fused_out else (dgate, dup)
