"""Numba CUDA kernels that decode GGUF quant blocks inside matrix products, and their registry.

No model knowledge lives here: only quant formats, matrix shapes and launch parameters.
"""
from q4kdistill import backend as _backend  # noqa: F401  (switches on the simulator on CPU before numba loads)
