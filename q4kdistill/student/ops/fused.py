"""The ops of ops/* on the fused kernels (kernels/fused_*.py), with the same signatures and caches.

    y, cache = rmsnorm_forward(x, w, eps, dtype=None)            dx, dw = rmsnorm_backward(dy, cache)
    y, h, cache = add_rmsnorm_forward(x, res, w, eps, dtype=None) dx, dw = add_rmsnorm_backward(dy, cache, dh=None)
        h = x + res (the residual stream, kept); dx is the gradient of x and of res alike; dh is the
        gradient that reaches h from the rest of the residual stream (added to dx).
    y = rmsnorm_output(cache, dtype=None)            the forward's y again from its cache, bit for bit
    y = rope_forward(x, cos, sin, style, out=None)   dx = rope_backward(dy, cos, sin, style, out=None)
        ``out=x`` rotates in place.
    y, cache = glu_forward(gate, up, act)            dgate, dup = glu_backward(dy, cache)
        glu_forward(gu, None, act) reads gate and up as the halves of one [..., 2F] product; its
        backward returns (dgu [..., 2F], None).
    kd, ce, ds = chunk_loss(s, t, targets, kd_weight, ce_weight, cfg, out=None)   (losses.chunk_loss)

A swap is an import: ``from q4kdistill.student.ops.fused import rmsnorm_forward, ...``. Arrays the kernels
do not take (float64, in the gradient checks) go to the reference ops unchanged. Differences from
the reference: parameter gradients (dw) are float32 whatever the activations' type; statistics and
math are float32 (the reference works in the input's type); bfloat16 may be a CuPy bfloat16 array or
uint16 bits.
"""
from __future__ import annotations

from typing import NamedTuple

from ...backend import array_module
from . import glu as _glu
from . import rmsnorm as _rmsnorm
from . import rope as _rope
from .fused_linear_loss import fused_chunk_loss as chunk_loss, fused_linear_loss  # noqa: F401

_KERNEL_DTYPES = ("float32", "float16", "bfloat16", "uint16")
# NumPy arrays go to the reference ops: the kernels would run in Numba's CUDA simulator, thousands of
# times slower. Tests that check the kernels on the CPU set this to True.
ON_HOST = False


def _fusable(*arrays) -> bool:
    return all(a is None or (a.dtype.name in _KERNEL_DTYPES and a.flags.c_contiguous
                             and (ON_HOST or type(a).__module__.startswith("cupy"))) for a in arrays)


class NormCache(NamedTuple):
    h: object        # [..., D] the normalised input (x, or x + res)
    w: object        # [D]
    rstd: object     # float32 [rows]


def _out(x, dtype):
    """An output like x in ``dtype`` (None: the kernel's default, x's type)."""
    return None if dtype is None or dtype == x.dtype else array_module(x).empty(x.shape, dtype=dtype)


def rmsnorm_forward(x, w, eps, dtype=None):
    """x [..., D], w [D] -> (y [..., D], cache). ``dtype``: y's storage (bfloat16 for the next
    product: the kernel writes it, no separate cast); the reference op keeps x's."""
    if not _fusable(x, w):
        return _rmsnorm.rmsnorm_forward(x, w, eps)
    from kernels.fused_rmsnorm import rmsnorm_fwd

    y, h, rstd = rmsnorm_fwd(x, w, eps, y=_out(x, dtype))
    return y, NormCache(h, w, rstd)


def rmsnorm_output(cache: NormCache, dtype=None):
    """The forward's y again from its cache (h, w, rstd), bit for bit; ``dtype``: y's storage, as
    given to the forward."""
    from kernels.fused_rmsnorm import rmsnorm_apply

    return rmsnorm_apply(cache.h, cache.w, cache.rstd, y=_out(cache.h, dtype))


def rmsnorm_backward(dy, cache):
    """dy [..., D] -> (dx [..., D], dw [D] float32)."""
    if not isinstance(cache, NormCache):
        return _rmsnorm.rmsnorm_backward(dy, cache)
    from kernels.fused_rmsnorm import rmsnorm_bwd

    return rmsnorm_bwd(dy if dy.flags.c_contiguous else dy.copy(), cache.h, cache.w, cache.rstd)


def add_rmsnorm_forward(x, res, w, eps, dtype=None):
    """x, res [..., D], w [D] -> (y [..., D], h = x + res [..., D], cache); ``dtype``: y's storage."""
    if not _fusable(x, res, w):
        h = x + res
        y, cache = _rmsnorm.rmsnorm_forward(h, w, eps)
        return y, h, cache
    from kernels.fused_rmsnorm import rmsnorm_fwd

    y, h, rstd = rmsnorm_fwd(x, w, eps, residual=res, y=_out(x, dtype))
    return y, h, NormCache(h, w, rstd)


def add_rmsnorm_backward(dy, cache, dh=None):
    """dy [..., D] (of y), dh [..., D] (of h, or None) -> (dx [..., D] = d res, dw [D])."""
    if not isinstance(cache, NormCache):
        dx, dw = _rmsnorm.rmsnorm_backward(dy, cache)
        return (dx if dh is None else dx + dh), dw
    from kernels.fused_rmsnorm import rmsnorm_bwd

    return rmsnorm_bwd(dy if dy.flags.c_contiguous else dy.copy(), cache.h, cache.w, cache.rstd, dres=dh)


def rope_forward(x, cos, sin, style, out=None):
    """x [B, T, H, D], cos/sin [T, D/2] -> y [B, T, H, D] (x itself with out=x)."""
    if not _fusable(x, out):
        y = _rope.rope_forward(x, cos, sin, style)
        if out is not None:
            out[...] = y
            return out
        return y
    from kernels.fused_rope import rope_apply

    return rope_apply(x, style, cos=cos, sin=sin, out=array_module(x).empty_like(x) if out is None else out)


def rope_backward(dy, cos, sin, style, out=None):
    """dy [B, T, H, D] -> dx [B, T, H, D] (rotation by the opposite angle)."""
    if not _fusable(dy, out):
        dx = _rope.rope_backward(dy, cos, sin, style)
        if out is not None:
            out[...] = dx
            return out
        return dx
    from kernels.fused_rope import rope_apply

    return rope_apply(dy, style, cos=cos, sin=sin, inverse=True,
                      out=array_module(dy).empty_like(dy) if out is None else out)


def glu_forward(gate, up, act):
    """gate, up [..., F] (or gate = [..., 2F] halves, up None) -> (y [..., F], cache)."""
    if not _fusable(gate, up):
        if up is None:
            half = gate.shape[-1] // 2
            y, cache = _glu.glu_forward(gate[..., :half], gate[..., half:], act)
            return y, (cache, "halves")
        return _glu.glu_forward(gate, up, act)
    from kernels.fused_glu import glu_fwd

    return glu_fwd(gate, up, act), (gate, up, act)


def glu_backward(dy, cache):
    """dy [..., F] -> (dgate, dup) [..., F] each, or (dgu [..., 2F], None) for a fused input."""
    if len(cache) == 2:                                   # reference op on the halves of one product
        dgate, dup = _glu.glu_backward(dy, cache[0])
        return array_module(dgate).concatenate([dgate, dup], axis=-1), None
    gate, up, act = cache
    if not _fusable(gate, up, dy):
        return _glu.glu_backward(dy, cache)
    from kernels.fused_glu import glu_bwd

    return glu_bwd(dy, gate, up, act)
