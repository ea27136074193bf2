"""The registry of matmul variants: what exists, for which types and shapes, and how to call it.

A variant computes ``out[:] = x @ W.T`` for x float32 [M, K] (C-contiguous), W the raw quant
rows, out float32 [M, N]:

    fn(x, w_raw, qtype, n_out, out, **params) -> out

Register your own from a notebook (no package file to edit):

    kernels.register(kernels.Variant(name="my_gemv", qtypes=("Q4_K",), fn=my_fn,
                                     description="...", m_max=16, params={"rows": 4}))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from q4kdistill.errors import Q4KError

ALL_QTYPES = ("Q4_K", "Q6_K", "Q8_0", "Q5_0")


@dataclass(frozen=True)
class Variant:
    name: str
    qtypes: tuple                 # quant types it decodes
    fn: Callable                  # fn(x, w_raw, qtype, n_out, out, **params) -> out
    description: str              # one line
    m_min: int = 1                # activation rows it accepts
    m_max: int | None = None
    device: str = "any"           # "any" (GPU, or the simulator on CPU), "gpu" or "cpu"
    params: dict = field(default_factory=dict)   # launch / tuning parameters passed to fn
    rel_err: float = 1e-5         # bound on ||out - ref|| / ||ref|| that the tests hold it to
    simulated: bool = True        # False for variants that link CUDA C: the Numba simulator cannot run them

    def supports(self, qtype: str, M: int, on_gpu: bool) -> bool:
        if qtype not in self.qtypes or M < self.m_min or (self.m_max is not None and M > self.m_max):
            return False
        return self.device == "any" or (self.device == "gpu") == on_gpu

    def __call__(self, x, w_raw, qtype, n_out, out):
        return self.fn(x, w_raw, qtype, n_out, out, **self.params)


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant, replace: bool = False) -> Variant:
    """Add a variant (``replace=True`` to redefine one of the same name)."""
    if variant.name in _REGISTRY and not replace:
        raise Q4KError(f"a kernel variant named {variant.name!r} is already registered (pass replace=True)")
    _REGISTRY[variant.name] = variant
    return variant


def get(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise Q4KError(f"no kernel variant named {name!r}; known: {', '.join(_REGISTRY)}") from None


def variants(qtype=None) -> list[str]:
    """Names of the registered variants (those that decode `qtype`, if given)."""
    if qtype is None:
        return list(_REGISTRY)
    from .weights import qtype_name

    q = qtype_name(qtype)
    return [n for n, v in _REGISTRY.items() if q in v.qtypes]
