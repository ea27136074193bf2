"""How the student stores numbers and multiplies matrices: ``fp32``, ``bf16`` (mixed) or ``fp64``.

    precision   master params, grads, AdamW m/v    matrix products (weights, inputs, outputs)   the rest
    fp32        float32                            float32                                      float32
    bf16        float32                            bfloat16, fp32 accumulation (cuBLAS)         float32
    fp64        float64 (gradient checks)          float64                                      float64

"The rest" is every elementwise op and reduction: norms and their statistics, rope, softmax,
the GLU activation, the losses, gradient accumulation. In bf16 the student keeps a bfloat16
copy of its weight matrices (refreshed from the fp32 master before each forward) and a matrix
product's inputs kept for the backward (the normed hidden states, the attention output, the GLU
output) are stored in bfloat16.

``low(x)`` is where a value becomes a product's bfloat16 input, ``high(y)`` where a product's
bfloat16 output comes back to float32. On
CuPy with ``ml_dtypes`` installed, bfloat16 is a real dtype (CuPy hands it to cuBLAS as
CUDA_R_16BF). Elsewhere (NumPy has no bfloat16) it is *emulated*: float32 arrays whose values
are rounded to bfloat16 (round to nearest even, as a hardware cast does), so the CPU tests run
the same code path and see the same rounding, only at float32's storage size.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import Q4KError

PRECISIONS = ("fp32", "bf16", "fp64")


def resolve(name: str | None, on_gpu: bool) -> str:
    """'auto' or None -> 'bf16' on a GPU, 'fp32' on the CPU; anything else must be a PRECISIONS name."""
    if name in (None, "auto"):
        return "bf16" if on_gpu else "fp32"
    if name not in PRECISIONS:
        raise Q4KError(f"precision {name!r}: expected auto, {', '.join(PRECISIONS)}")
    return name


def round_bf16(x):
    """float32 [...] -> float32 [...] holding the nearest bfloat16 values (ties to even).

    The top 16 bits of a float32 are a bfloat16; adding 0x7FFF plus the lowest kept bit before
    cutting the low 16 bits rounds to nearest even; inf stays inf (finite inputs past bfloat16's
    largest value round to inf, as a hardware cast does)."""
    from ..backend import array_module

    xp = array_module(x)
    n = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    return ((n + (0x7FFF + ((n >> 16) & 1))) & xp.uint32(0xFFFF0000)).view(xp.float32)


def _device_bf16(xp):
    """CuPy's bfloat16 dtype (through ml_dtypes), or None where there is none."""
    if xp is np:
        return None
    try:
        import ml_dtypes

        a = xp.ones((2, 2), dtype=np.float32).astype(ml_dtypes.bfloat16)     # a cast and a cuBLAS product
        if float((a @ a).astype(xp.float32).sum()) != 8.0:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    except Exception:              # no ml_dtypes, or a CuPy without bfloat16 kernels
        return None


class Precision:
    def __init__(self, name: str, xp):
        if name not in PRECISIONS:
            raise Q4KError(f"precision {name!r}: expected one of {', '.join(PRECISIONS)}")
        self.name = name
        self.mixed = name == "bf16"
        self.master = np.dtype(np.float64 if name == "fp64" else np.float32)
        self.device_bf16 = _device_bf16(xp) if self.mixed else None
        if self.mixed and self.device_bf16 is None and xp is not np:
            warnings.warn("bf16 student: CuPy has no bfloat16 here (install ml_dtypes); emulating it in float32 "
                          "(same numbers, no speed or memory gain)", stacklevel=2)
        self.emulated = self.mixed and self.device_bf16 is None
        self.low_dtype = self.device_bf16 or self.master          # dtype of what low() returns

    @property
    def low_bytes(self) -> int:
        """Bytes per element of a low-precision (matrix-product) value as stored."""
        return self.low_dtype.itemsize

    def low(self, x):
        """x -> the matrix-product dtype (bfloat16, or float32 holding bfloat16 values)."""
        if not self.mixed:
            return x
        if self.emulated:
            return round_bf16(x)
        return x if x.dtype == self.low_dtype else x.astype(self.low_dtype)

    def assign_low(self, out, x):
        """out[...] = low(x) without a temporary on the device (CuPy casts while it copies)."""
        out[...] = round_bf16(x) if self.emulated else x

    def high(self, y):
        """A matrix product's output -> float32 for elementwise math. A bf16 product writes bf16
        (cuBLAS rounds its fp32 accumulator once); emulated, that rounding happens here."""
        if not self.mixed:
            return y
        if self.emulated:
            return round_bf16(y)
        return y.astype(np.float32) if y.dtype == self.low_dtype else y

    def __repr__(self):
        return f"Precision({self.name!r}{', emulated' if self.emulated else ''})"
