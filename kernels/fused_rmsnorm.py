"""RMSNorm with an optional residual add, forward and backward, one row of D per block.

Forward (rows r of x [R, D], weight w [D]):
    h[r]    = x[r] + res[r]              (rounded to h's storage; h = x when there is no residual)
    rstd[r] = 1 / sqrt(mean_j h[r, j]^2 + eps)        float32 [R]
    y[r]    = h[r] * rstd[r] * w
Backward (dy [R, D]; dres [R, D] the gradient reaching h from the residual stream, if any):
    xhat = h * rstd,  g = dy * w
    dx   = rstd * (g - xhat * mean_j(g * xhat)) + dres     (d res = d x: both feed h by a sum)
    dw   = sum_r dy * xhat                                 float32 [D]
rmsnorm_apply makes y again from h and rstd (the same values), for a backward that does not keep y.
dw is reduced without atomics: each of G blocks walks rows b, b + G, ... and keeps its column sums
in registers, writes them to a [G, D] float32 partial buffer, and a second kernel sums the G rows
of each column in a fixed order, so the result is the same on every run.

Each thread owns columns tid, tid + threads, ... (NC = ceil(D / threads) of them, a compile-time
count, so a row lives in registers between the two passes). Statistics are float32 whatever the
storage types (fused_io: float32, bfloat16 bits, float16). The weight is used as given (a model
whose norm is x * (1 + w) stores 1 + w, as GGUF files do).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from q4kdistill.backend import array_module
from q4kdistill.errors import Q4KError

from ._device import SIMULATOR, f32_bits
from ._ptx import half2, ld4, st4
from .fused_io import (F, aligned16, block_reducers, code_of, empty_as, launch_shared, loader, reduce_slots, rounder,
                       row_grid, storage, storer, threads_for)

NONE = -1   # storage code of an absent array (residual, dres)
VECTOR = True   # rmsnorm_fwd takes the 16-byte-access kernel where it applies (tests switch it off)


@functools.lru_cache(maxsize=None)
def rmsnorm_forward_kernel(threads, nc, x_code, r_code, w_code, y_code, h_code):
    ld_x, ld_w = loader(x_code), loader(w_code)
    ld_r = loader(max(r_code, 0))
    st_y, st_h, rnd_h = storer(y_code), storer(h_code), rounder(h_code)
    block_sum, _ = block_reducers(threads)
    HAS_R, NC, SLOTS = r_code != NONE, nc, reduce_slots(threads)

    @cuda.jit
    def kernel(x, res, w, D, inv_d, eps, y, h, rstd):   # x, res, h, y [R*D], w [D], rstd [R]
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        base = row * D
        buf = cuda.shared.array(SLOTS, F)
        vals = cuda.local.array(NC, F)                  # this thread's columns of h[row], then of w
        wv = cuda.local.array(NC, F)
        for c in range(NC):                             # loads only: all NC in flight together
            j = tid + c * threads
            vals[c] = F(0)
            wv[c] = F(0)
            if j < D:
                vals[c] = ld_x(x, base + j) + (ld_r(res, base + j) if HAS_R else F(0))
                wv[c] = ld_w(w, j)
        ss = F(0)
        for c in range(NC):
            j = tid + c * threads
            if HAS_R and j < D:
                vals[c] = rnd_h(vals[c])                # h as stored, so y is the norm of what is kept
                st_h(h, base + j, vals[c])
            ss += vals[c] * vals[c]
        rs = F(1) / math.sqrt(block_sum(ss, buf) * inv_d + eps)
        if tid == 0:
            rstd[row] = rs
        for c in range(NC):
            j = tid + c * threads
            if j < D:
                st_y(y, base + j, vals[c] * rs * wv[c])

    return kernel


@functools.lru_cache(maxsize=None)
def rmsnorm_forward_v4_kernel(threads, nc4, has_r):
    """The teacher's case with 16-byte accesses: float32 x (and residual, h = x in place), float32 w,
    float16 y; D a multiple of 4. Thread tid owns column quads tid, tid + threads, ... (NC4 of them);
    the scalar kernel's 4-byte loads and stores ran the 7B's add_norm at ~2.2 TB/s on an H200. The same
    float32 expressions per element; the sum of squares adds the row in another order (float32
    rounding of a sum: ~1e-7 relative in rstd)."""
    block_sum, _ = block_reducers(threads)
    NC4, SLOTS, HAS_R, LOCAL = nc4, reduce_slots(threads), has_r, 4 * nc4

    @cuda.jit
    def kernel(x, res, w, D4, inv_d, eps, h32, y32, rstd):   # x, res, w float32; h32: x's bits; y32: fp16 pairs
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        base = row * D4
        buf = cuda.shared.array(SLOTS, F)
        v = cuda.local.array(LOCAL, F)
        wv = cuda.local.array(LOCAL, F)
        for c in range(NC4):                             # loads only: all in flight together
            q = tid + c * threads
            a0, a1, a2, a3 = F(0), F(0), F(0), F(0)
            w0, w1, w2, w3 = F(0), F(0), F(0), F(0)
            if q < D4:
                a0, a1, a2, a3 = ld4(x, (base + q) * 4)
                if HAS_R:
                    r0, r1, r2, r3 = ld4(res, (base + q) * 4)
                    a0, a1, a2, a3 = a0 + r0, a1 + r1, a2 + r2, a3 + r3
                w0, w1, w2, w3 = ld4(w, q * 4)
            v[4 * c], v[4 * c + 1], v[4 * c + 2], v[4 * c + 3] = a0, a1, a2, a3
            wv[4 * c], wv[4 * c + 1], wv[4 * c + 2], wv[4 * c + 3] = w0, w1, w2, w3
        ss = F(0)
        for c in range(NC4):
            q = tid + c * threads
            if HAS_R and q < D4:
                st4(h32, (base + q) * 4, f32_bits(v[4 * c]), f32_bits(v[4 * c + 1]), f32_bits(v[4 * c + 2]),
                    f32_bits(v[4 * c + 3]))
            for k in range(4):
                ss += v[4 * c + k] * v[4 * c + k]
        rs = F(1) / math.sqrt(block_sum(ss, buf) * inv_d + eps)
        if tid == 0:
            rstd[row] = rs
        for c in range(NC4):
            q = tid + c * threads
            if q < D4:
                y32[(base + q) * 2] = half2(v[4 * c] * rs * wv[4 * c], v[4 * c + 1] * rs * wv[4 * c + 1])
                y32[(base + q) * 2 + 1] = half2(v[4 * c + 2] * rs * wv[4 * c + 2], v[4 * c + 3] * rs * wv[4 * c + 3])

    return kernel


def _vector_forward(x, w, residual, y, h) -> bool:
    f32 = np.dtype(np.float32)
    arrays = [x, w, y] + ([residual] if residual is not None else [])
    return (VECTOR and x.dtype == f32 and w.dtype == f32 and y.dtype == np.float16 and x.shape[-1] % 4 == 0
            and (residual is None or (residual.dtype == f32 and h is x))
            and all(a.flags.c_contiguous and aligned16(a) for a in arrays))


@functools.lru_cache(maxsize=None)
def rmsnorm_apply_kernel(h_code, w_code, y_code):
    """y = h * rstd * w from the forward's h and rstd: the forward's expression on the same float32
    values (h as stored), so the same y, bit for bit. Rows on the grid's y, column tiles on its x."""
    ld_h, ld_w, st_y = loader(h_code), loader(w_code), storer(y_code)

    @cuda.jit
    def kernel(h, w, rstd, R, D, y):                    # h, y [R*D], w [D], rstd [R]
        tid, width = cuda.threadIdx.x, cuda.blockDim.x
        for r in range(cuda.blockIdx.y, R, cuda.gridDim.y):
            rs, base = rstd[r], r * D
            for j in range(cuda.blockIdx.x * width + tid, D, cuda.gridDim.x * width):
                st_y(y, base + j, ld_h(h, base + j) * rs * ld_w(w, j))

    return kernel


@functools.lru_cache(maxsize=None)
def rmsnorm_backward_kernel(threads, nc, h_code, w_code, dy_code, dx_code, dres_code):
    ld_h, ld_w, ld_dy = loader(h_code), loader(w_code), loader(dy_code)
    ld_dres = loader(max(dres_code, 0))
    st_dx = storer(dx_code)
    block_sum, _ = block_reducers(threads)
    HAS_DRES, NC, SLOTS = dres_code != NONE, nc, reduce_slots(threads)

    @cuda.jit
    def kernel(h, w, rstd, dy, dres, R, D, inv_d, dx, partial):   # partial [G*D] float32
        b = cuda.blockIdx.x
        G = cuda.gridDim.x
        tid = cuda.threadIdx.x
        buf = cuda.shared.array(SLOTS, F)
        acc = cuda.local.array(NC, F)                   # this block's dw, this thread's columns
        wv = cuda.local.array(NC, F)                    # w, loaded once for all the block's rows
        xh = cuda.local.array(NC, F)                    # xhat, then dx, of the current row
        gw = cuda.local.array(NC, F)                    # dy * w
        for c in range(NC):
            j = tid + c * threads
            acc[c] = F(0)
            wv[c] = ld_w(w, j) if j < D else F(0)
        for row in range(b, R, G):                      # the same count for every thread of the block
            base = row * D
            rs = rstd[row]
            for c in range(NC):                         # loads only: all in flight together
                j = tid + c * threads
                xh[c], gw[c] = F(0), F(0)
                if j < D:
                    xh[c] = ld_h(h, base + j)
                    gw[c] = ld_dy(dy, base + j)
            dot = F(0)
            for c in range(NC):
                xh[c] *= rs
                acc[c] += gw[c] * xh[c]
                gw[c] *= wv[c]
                dot += gw[c] * xh[c]
            mean = block_sum(dot, buf) * inv_d
            for c in range(NC):
                j = tid + c * threads
                xh[c] = rs * (gw[c] - xh[c] * mean)
                if HAS_DRES and j < D:
                    xh[c] += ld_dres(dres, base + j)    # loads before the row's first store
            for c in range(NC):
                j = tid + c * threads
                if j < D:
                    st_dx(dx, base + j, xh[c])
        for c in range(NC):
            j = tid + c * threads
            if j < D:
                partial[b * D + j] = acc[c]

    return kernel


@cuda.jit
def column_sums(partial, G, D, out):
    """out[j] = sum over b of partial[b * D + j], b in order (one thread per column)."""
    j = cuda.grid(1)
    if j < D:
        s = F(0)
        for b in range(G):
            s += partial[b * D + j]
        out[j] = s


# -- launchers ---------------------------------------------------------------------------------
def _check(name, a, shape):
    if a is not None and tuple(a.shape) != tuple(shape):
        raise Q4KError(f"fused rmsnorm: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def _layout(x, w):
    if x.ndim < 1 or x.shape[-1] != w.shape[-1] or w.ndim != 1:
        raise Q4KError(f"fused rmsnorm: x {tuple(x.shape)} and weight {tuple(w.shape)} disagree on the last axis")
    D = int(x.shape[-1])
    R = int(np.prod(x.shape[:-1], dtype=np.int64))
    threads = threads_for((D + 3) // 4, most=1024)               # about 4 columns per thread (D 896: 256 threads)
    return R, D, threads, (D + threads - 1) // threads


def rmsnorm_fwd(x, w, eps, residual=None, y=None, h=None, threads=None):
    """x [..., D] (+ residual [..., D]), w [D] -> (y [..., D], h [..., D], rstd float32 [R]).

    h = x + residual in x's storage type (h is x itself when there is no residual); y has x's type
    unless ``y`` is given (it may be x: in place)."""
    xp = array_module(x)
    R, D, t, nc = _layout(x, w)
    if threads:
        t, nc = threads, (D + threads - 1) // threads
    _check("residual", residual, x.shape)
    code = code_of(x)
    y = empty_as(xp, x.shape, x) if y is None else y
    _check("y", y, x.shape)
    if residual is None:
        h = x
    elif h is None:
        h = empty_as(xp, x.shape, x)
    _check("h", h, x.shape)
    rstd = xp.empty(R, dtype=np.float32)
    if R == 0:
        return y, h, rstd
    if _vector_forward(x, w, residual, y, h):
        D4 = D // 4
        t4 = 32 if SIMULATOR else max(32, min(128, 1 << (D4 - 1).bit_length()))
        kernel = rmsnorm_forward_v4_kernel(t4, -(-D4 // t4), residual is not None)
        xs = storage(x)
        launch_shared(kernel, R, t4, xs, xs if residual is None else storage(residual), storage(w), D4, F(1.0 / D),
                      F(eps), xs.view(np.uint32), storage(y).view(np.uint32), rstd)
        return y, h, rstd
    r_code = NONE if residual is None else code_of(residual)
    kernel = rmsnorm_forward_kernel(t, nc, code, r_code, code_of(w), code_of(y), code_of(h))
    xs = storage(x)
    launch_shared(kernel, R, t, xs, xs if residual is None else storage(residual), storage(w), D, F(1.0 / D), F(eps),
                  storage(y), storage(h), rstd)
    return y, h, rstd


def rmsnorm_apply(h, w, rstd, y=None):
    """y [..., D] = h * rstd * w again from rmsnorm_fwd's h and rstd (a backward that makes the norm's
    output again instead of keeping it): the same values as the forward's y. h's type unless ``y``
    is given."""
    xp = array_module(h)
    R, D, _, _ = _layout(h, w)
    _check("rstd", rstd, (R,))
    y = empty_as(xp, h.shape, h) if y is None else y
    _check("y", y, h.shape)
    if R:
        kernel = rmsnorm_apply_kernel(code_of(h), code_of(w), code_of(y))
        launch_shared(kernel, *row_grid(R, D), storage(h), storage(w), rstd, R, D, storage(y))
    return y


def rmsnorm_bwd(dy, h, w, rstd, dres=None, dx=None, blocks=None, threads=None):
    """dy [..., D] -> (dx [..., D], dw float32 [D]); h, rstd from rmsnorm_fwd; dres [..., D] is added
    to dx (the residual stream's own gradient). dx has dy's type unless given (it may be dy or dres)."""
    xp = array_module(dy)
    R, D, t, nc = _layout(h, w)
    if threads:
        t, nc = threads, (D + threads - 1) // threads
    _check("dy", dy, h.shape)
    _check("dres", dres, h.shape)
    dx = empty_as(xp, h.shape, dy) if dx is None else dx
    _check("dx", dx, h.shape)
    dw = xp.zeros(D, dtype=np.float32)
    if R == 0:
        return dx, dw
    G = blocks or min(R, 4 if SIMULATOR else 528)
    partial = xp.empty(G * D, dtype=np.float32)
    d_code = NONE if dres is None else code_of(dres)
    kernel = rmsnorm_backward_kernel(t, nc, code_of(h), code_of(w), code_of(dy), code_of(dx), d_code)
    dys = storage(dy)
    launch_shared(kernel, G, t, storage(h), storage(w), rstd, dys, dys if dres is None else storage(dres), R, D,
                  F(1.0 / D), storage(dx), partial)
    launch_shared(column_sums, (D + 127) // 128, 128, partial, G, D, dw)
    return dx, dw
