"""q4kdistill: knowledge distillation from a frozen GGUF Q4_K teacher that stays quantized on the GPU.

Import order matters: ``interrupts`` goes first (as the command, Ctrl-C while the rest loads
exits 130 with one line), then ``backend``, because on a machine without a GPU it switches
Numba's CUDA simulator on before anything imports numba.
"""
from . import interrupts  # (a tiny module: as the command, Ctrl-C exits 130 from here on)

interrupts.install_early()

from . import backend  # noqa: F401,E402  (first of the real imports)
from .errors import Q4KError  # noqa: F401


def _bind_own_kernels() -> None:
    """Make ``import kernels`` mean this project's ``kernels/`` package (beside this one).

    Hugging Face's hub-kernel downloader is also called ``kernels`` (transformers >= 5.18 depends on
    it); where it is installed, a script run from elsewhere would import it instead of ours."""
    import importlib.util
    import os
    import sys

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(here, "__init__.py")
    mod = sys.modules.get("kernels")
    if not os.path.exists(init) or (mod is not None and os.path.abspath(getattr(mod, "__file__", "") or "") == init):
        return
    spec = importlib.util.find_spec("kernels") if mod is None else None
    if spec is not None and spec.origin and os.path.abspath(spec.origin) == init:
        return
    spec = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[here])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


_bind_own_kernels()

__version__ = "0.1.0"


def dequantize(data, qtype):
    """Raw GGUF bytes (uint8 [rows, bytes_per_row]) -> float32 [rows, cols]. See quants.py."""
    from .formats.quants import dequantize as _dequantize

    return _dequantize(data, qtype)


def quantize(array, qtype):
    """float [rows, cols] -> raw GGUF bytes uint8 [rows, bytes_per_row]. See quants.py."""
    from .formats.quants import quantize as _quantize

    return _quantize(array, qtype)
