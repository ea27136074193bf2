"""q4kdistill: knowledge distillation from a frozen GGUF Q4_K teacher that stays quantized on the GPU.

Import order matters: ``backend`` goes first, because on a machine without a GPU it switches
Numba's CUDA simulator on before anything imports numba.
"""
from . import backend  # noqa: F401  (must be first)
from .errors import Q4KError  # noqa: F401

__version__ = "0.1.0"


def dequantize(data, qtype):
    """Raw GGUF bytes (uint8 [rows, bytes_per_row]) -> float32 [rows, cols]. See quants.py."""
    from .quants import dequantize as _dequantize

    return _dequantize(data, qtype)


def quantize(array, qtype):
    """float [rows, cols] -> raw GGUF bytes uint8 [rows, bytes_per_row]. See quants.py."""
    from .quants import quantize as _quantize

    return _quantize(array, qtype)
