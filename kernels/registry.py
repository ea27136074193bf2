"""The registry of matmul variants: what exists, for which types and shapes, and how to call it.

A variant computes ``out[:] = x @ W.T`` for x [M, K] (C-contiguous; float32, or another dtype
the variant `accepts`), W the raw quant rows, out float32 [M, N]:

    fn(x, w_raw, qtype, n_out, out, **params) -> out

Register your own from a notebook (no package file to edit):

    kernels.register(kernels.Variant(name="my_gemv", qtypes=("Q4_K",), fn=my_fn,
                                     description="...", m_max=16, params={"rows": 4},
                                     workspace=my_workspace, accepts=("float32",)))

What a variant allocates and accepts are fields, read by dispatch (which activations to pass as
they are) and by the memory planner (q4kdistill/memory/planner.py), never guessed from its function:

    accepts     activation dtypes fn takes as they are ("float32", "float16", "bfloat16"); dispatch
                widens any other x to float32 first
    workspace   workspace(qtype, M, N, K, x_dtype, **params) -> {buffer: bytes}: every device buffer
                one call allocates (besides x, W and out), all alive at once at the call's fullest,
                so their sum is the call's peak above its arguments. The key DECODE_SCRATCH[dtype]
                names the shared kernels.scratch buffer, which outlives the call (reused, grown to
                the largest matrix; kernels.scratch_bytes()). None: allocates nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from q4kdistill.errors import Q4KError

from .decode import FORMATS

ALL_QTYPES = tuple(FORMATS)            # every type the kernels decode (decode.py has one decode8 each)
# x dtypes a variant may take as they are, by dtype name ("bfloat16" for arrays whose dtype is named
# so, as ml_dtypes' is: NumPy and CuPy have none, so no shipped variant lists it yet)
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
DECODE_SCRATCH = {"float16": "decode scratch float16", "float32": "decode scratch float32"}


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
    accepts: tuple = ("float32",)  # activation dtypes fn takes as they are (see the module docstring)
    workspace: Callable | None = None   # (qtype, M, N, K, x_dtype, **params) -> {buffer: bytes}

    def __post_init__(self):
        bad = [d for d in self.accepts if d not in ACTIVATION_DTYPES]
        if bad or "float32" not in self.accepts:
            raise Q4KError(f"variant {self.name}: accepts must include float32 and name only "
                           f"{', '.join(ACTIVATION_DTYPES)}, got {self.accepts}")

    def supports(self, qtype: str, M: int, on_gpu: bool) -> bool:
        if qtype not in self.qtypes or M < self.m_min or (self.m_max is not None and M > self.m_max):
            return False
        return self.device == "any" or (self.device == "gpu") == on_gpu

    def __call__(self, x, w_raw, qtype, n_out, out):
        return self.fn(x, w_raw, qtype, n_out, out, **self.params)

    def workspace_bytes(self, qtype: str, M: int, N: int, K: int, x_dtype: str = "float32") -> dict:
        """{buffer: bytes} one call with x [M, K] of x_dtype and W [N, K] of qtype allocates
        (x_dtype one of `accepts`; dispatch passes any other as float32)."""
        if self.workspace is None:
            return {}
        return {k: int(v) for k, v in self.workspace(qtype, M, N, K, x_dtype, **self.params).items() if v}

    def decode_scratch(self, qtype: str, M: int, N: int, K: int, x_dtype: str = "float32") -> tuple:
        """(dtype, bytes) of the shared decode scratch the call needs, or (None, 0)."""
        ws = self.workspace_bytes(qtype, M, N, K, x_dtype)
        found = [(dtype, ws[key]) for dtype, key in DECODE_SCRATCH.items() if key in ws]
        return found[0] if found else (None, 0)

    def transient_bytes(self, qtype: str, M: int, N: int, K: int, x_dtype: str = "float32") -> int:
        """Bytes of the buffers the call allocates and frees again (all but the decode scratch)."""
        ws = self.workspace_bytes(qtype, M, N, K, x_dtype)
        return sum(v for k, v in ws.items() if k not in DECODE_SCRATCH.values())


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
