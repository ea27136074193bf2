"""A distillation loss and its gradient in one kernel over a [n, V] slab of logits, one row per block.

Inputs per row: student logits s [V], teacher logits t [V] (absent for a CE-only loss), the target
token (< 0: none), the row's weights kd_w and ce_w, the temperature T. With z = s/T, u = t/T,
lq = log softmax(z), lp = log softmax(u), q = exp(lq), p = exp(lp), every log-probability clamped
to LOG_FLOOR = -1e30 (so masks of -inf give huge, finite numbers, never NaN; 0 log 0 terms dropped):

    kind "kl"      kd = T^2 sum p (lp - lq)               dz = q - p
    kind "rkl"     kd = T^2 sum q (lq - lp)               dz = q (L - sum q L),  L = lq - lp
    kind "jsd"     lm = log(beta p + (1-beta) q)
                   kd = T^2 [beta sum p (lp - lm) + (1-beta) sum q (lq - lm)]
                                                          dz = (1-beta) q (L - sum q L),  L = lq - lm
    kind "student" kd = 0 (the caller finishes it)        dz = q     (top-k against the full softmax)
    kind "none"    no teacher term
    ce = -log softmax(s)[target] at T = 1                 dce = softmax(s) - onehot(target)
    ds = ce_w * dce + kd_w * T * dz                       (written over s when ds is s: in place)

Passes over the row (each thread takes UNROLL columns tid + k * threads per step, loading all of them
before using any, then moves on by threads * UNROLL):
    1. online max and sum of exp for z, u and (when T != 1) s, merged across the block: the three
       log-sum-exps; every thread also reads s[target] here, before anything is written;
    2. the per-element terms: kd's sum (and sum q L); for "kl", "student" and "none" ds is written
       here (two passes over V in all);
    3. "rkl" and "jsd" only: ds, once sum q L is known (three passes).
All math float32 on float32 / bfloat16 / float16 logits (s, t and ds may differ in type). This is
the definition of losses.kd_rows / ce_rows / chunk_loss (q4kdistill/student/losses.py), the float64 reference.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from q4kdistill.backend import array_module
from q4kdistill.errors import Q4KError

from .fused_io import (F, NEG_INF, block_reducers, code_of, launch_shared, loader, reduce_slots, storage, storer,
                       threads_for)

KINDS = {"none": 0, "kl": 1, "rkl": 2, "jsd": 3, "student": 4}
NONE, KL, RKL, JSD, STUDENT = 0, 1, 2, 3, 4
LOG_FLOOR = F(-1e30)
UNROLL = 4            # columns per thread per step: their loads are issued together


@functools.lru_cache(maxsize=None)
def kd_loss_kernel(threads, s_code, t_code, ds_code, kind, same_t, unroll=UNROLL):
    ld_s, ld_t, st_ds = loader(s_code), loader(t_code), storer(ds_code)
    block_sum, block_max = block_reducers(threads)
    SLOTS = reduce_slots(threads)
    HAS_T = kind in (KL, RKL, JSD)
    THIRD = kind in (RKL, JSD)        # ds needs sum q L, known only after pass 2
    U = unroll

    @cuda.jit(device=True, inline=True)
    def lse(m, acc, buf):
        """(max, log sum exp(x - max)) over the block, from each thread's running (max m, sum of
        exp(x - m)). Kept apart: x - max is exact for nearby x, max + log(...) would round at 1e4."""
        top = block_max(m, buf)
        part = acc * math.exp(m - top) if m > NEG_INF else F(0)
        return top, math.log(block_sum(part, buf))

    @cuda.jit(device=True, inline=True)
    def online(m, a, x):
        """(m, a) with x added: a running max m and sum a of exp(. - m); -inf adds nothing."""
        if x > m:
            return x, a * math.exp(m - x) + F(1)
        if x > NEG_INF:
            return m, a + math.exp(x - m)
        return m, a

    @cuda.jit(device=True, inline=True)
    def log_prob(x, m, l):
        """log softmax from the row's (max m, log sum exp(. - m) = l), clamped to LOG_FLOOR."""
        return max((x - m) - l, LOG_FLOOR)

    @cuda.jit(device=True, inline=True)
    def log_mix(lp, lq, log_b, log_1b):
        """log(beta p + (1 - beta) q) from log p, log q."""
        a, b = lp + log_b, lq + log_1b
        return max(a, b) + math.log1p(math.exp(-abs(a - b)))

    @cuda.jit(device=True, inline=True)
    def load(s, t, base, j0, V, sv, tv, pad):
        """sv[k], tv[k] = s, t at column j0 + k * threads (pad past V): all loads before any use,
        so U requests per array are in flight at once."""
        for k in range(U):
            j = j0 + k * threads
            sv[k] = ld_s(s, base + j) if j < V else pad
            if HAS_T:
                tv[k] = ld_t(t, base + j) if j < V else pad

    @cuda.jit
    def kernel(s, t, V, targets, kd_weight, ce_weight, inv_T, T, beta, log_b, log_1b,
               ds, kd_rows, ce_rows, lse_rows):             # s, t, ds [n*V]; the rest [n]
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        base = row * V
        buf = cuda.shared.array(SLOTS, F)
        sv = cuda.local.array(U, F)                         # this thread's U columns of s and t
        tv = cuda.local.array(U, F)
        tgt = targets[row]
        bad = tgt >= V                                      # no such column: the CE row becomes NaN
        if bad:
            tgt = -1
        kd_w = F(kd_weight[row])
        ce_w = F(ce_weight[row])
        ce_on = tgt >= 0 and ce_w != F(0)
        s_tgt = ld_s(s, base + tgt) if tgt >= 0 else F(0)   # read before ds (maybe s) is written

        # pass 1: running (max, sum exp) of z = s/T, u = t/T and s, then merged over the block
        mz, az, mu, au, m1, a1 = F(NEG_INF), F(0), F(NEG_INF), F(0), F(NEG_INF), F(0)
        for j0 in range(tid, V, threads * U):
            load(s, t, base, j0, V, sv, tv, F(NEG_INF))
            for k in range(U):
                mz, az = online(mz, az, sv[k] * inv_T)
                if not same_t:
                    m1, a1 = online(m1, a1, sv[k])
                if HAS_T:
                    mu, au = online(mu, au, tv[k] * inv_T)
        mz, lz = lse(mz, az, buf)                           # log softmax(z) = (z - mz) - lz
        if same_t:
            m1, l1 = mz, lz
        else:
            m1, l1 = lse(m1, a1, buf)
        lu = F(0)
        if HAS_T:
            mu, lu = lse(mu, au, buf)

        # pass 2: kd terms (and ds when it needs nothing more)
        kd_g = kd_w * T * ((F(1) - beta) if kind == JSD else F(1))
        acc, sql = F(0), F(0)
        for j0 in range(tid, V, threads * U):
            load(s, t, base, j0, V, sv, tv, F(0))
            for k in range(U):
                j = j0 + k * threads
                if j < V:
                    g = F(0)
                    if ce_on:
                        g = ce_w * math.exp(log_prob(sv[k], m1, l1))
                        if j == tgt:
                            g -= ce_w
                    if kind != NONE:
                        lq = log_prob(sv[k] * inv_T, mz, lz)
                        q = math.exp(lq)
                        if kind == STUDENT:
                            g += kd_g * q
                        if HAS_T:
                            lp = log_prob(tv[k] * inv_T, mu, lu)
                            p = math.exp(lp)
                            if kind == KL:
                                if p > F(0):
                                    acc += p * (lp - lq)
                                g += kd_g * (q - p)
                            elif kind == RKL:
                                if q > F(0):
                                    acc += q * (lq - lp)
                            else:
                                lm = log_mix(lp, lq, log_b, log_1b)
                                if p > F(0):
                                    acc += beta * p * (lp - lm)
                                if q > F(0):
                                    acc += (F(1) - beta) * q * (lq - lm)
                                    sql += q * (lq - lm)
                    if not THIRD:
                        st_ds(ds, base + j, g)
        kd = block_sum(acc, buf)
        if kind == RKL:
            sql = kd                                        # reverse KL is sum q L itself
        elif kind == JSD:
            sql = block_sum(sql, buf)

        # pass 3 (rkl, jsd): ds = ce part + kd_g * q (L - sum q L)
        if THIRD:
            for j0 in range(tid, V, threads * U):
                load(s, t, base, j0, V, sv, tv, F(0))
                for k in range(U):
                    j = j0 + k * threads
                    if j < V:
                        g = F(0)
                        if ce_on:
                            g = ce_w * math.exp(log_prob(sv[k], m1, l1))
                            if j == tgt:
                                g -= ce_w
                        lq = log_prob(sv[k] * inv_T, mz, lz)
                        q = math.exp(lq)
                        lp = log_prob(tv[k] * inv_T, mu, lu)
                        L = lq - (log_mix(lp, lq, log_b, log_1b) if kind == JSD else lp)
                        if q > F(0):
                            g += kd_g * q * (L - sql)
                        st_ds(ds, base + j, g)

        if tid == 0:
            kd_rows[row] = T * T * kd if HAS_T else F(0)
            ce_rows[row] = F(math.nan) if bad else (-log_prob(s_tgt, m1, l1) if tgt >= 0 else F(0))
            lse_rows[row] = mz + lz

    return kernel


def kd_loss_rows(s, t, targets, kd_weight, ce_weight, kind="kl", temperature=1.0, beta=0.5, ds=None, threads=None):
    """Loss per row and d(sum_rows kd_w * kd + ce_w * ce)/ds for a slab s [n, V] (see the module doc).

    s, t [n, V] float32 / bfloat16 (uint16 bits) / float16 (t None for kinds "none"/"student");
    targets [n] int (< 0: no CE term; >= V: a NaN CE row, no gradient); kd_weight, ce_weight [n]. ds: the output [n, V] (s itself
    for in place; default a new array of s's type). -> (kd [n], ce [n], ds, lse [n]) with kd, ce and
    lse (the student's log-sum-exp of s/T) float32."""
    xp = array_module(s)
    if kind not in KINDS:
        raise Q4KError(f"fused KD loss: kind {kind!r}, expected one of {', '.join(KINDS)}")
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "kl" if beta == 0.0 else "rkl"        # the mixture form's end points (losses.LossConfig)
    code = KINDS[kind]
    if s.ndim != 2:
        raise Q4KError(f"fused KD loss: student logits must be [n, V], got {tuple(s.shape)}")
    n, V = (int(v) for v in s.shape)
    if code in (KL, RKL, JSD) and (t is None or tuple(t.shape) != (n, V)):
        raise Q4KError(f"fused KD loss: kind {kind!r} needs teacher logits of shape {(n, V)}, "
                       f"got {None if t is None else tuple(t.shape)}")
    if not temperature > 0:
        raise Q4KError(f"temperature must be > 0, got {temperature}")
    ds = xp.empty_like(s) if ds is None else ds
    if tuple(ds.shape) != (n, V):
        raise Q4KError(f"fused KD loss: ds has shape {tuple(ds.shape)}, expected {(n, V)}")
    kd, ce, lse = (xp.zeros(n, dtype=np.float32) for _ in range(3))
    if n == 0 or V == 0:
        return kd, ce, ds, lse
    tgt = xp.ascontiguousarray(xp.asarray(targets).reshape(n), dtype=np.int64)
    kw = xp.ascontiguousarray(xp.asarray(kd_weight).reshape(n), dtype=np.float32)
    cw = xp.ascontiguousarray(xp.asarray(ce_weight).reshape(n), dtype=np.float32)
    th = threads or threads_for(V, most=512)
    T = float(temperature)
    has_t = code in (KL, RKL, JSD)
    ss = storage(s)
    kernel = kd_loss_kernel(th, code_of(s), code_of(t) if has_t else code_of(s), code_of(ds), code, T == 1.0)
    lb = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    l1b = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    launch_shared(kernel, n, th, ss, storage(t) if has_t else ss, V, tgt, kw, cw, F(1.0 / T), F(T), F(beta),
                  F(lb), F(l1b), storage(ds), kd, ce, lse)
    return kd, ce, ds, lse
