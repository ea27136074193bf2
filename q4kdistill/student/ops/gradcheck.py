"""Central finite differences, for checking hand-written backwards (use float64 inputs)."""
from __future__ import annotations

from ...backend import array_module, to_host


def numeric_grad(f, x, eps=1e-6, indices=None):
    """d f() / d x by central differences, perturbing x in place one element at a time.

    ``f`` takes no argument and reads ``x``; it returns a scalar. With ``indices`` (flat
    positions) only those elements are probed and the result is their partials [len(indices)]."""
    if not x.flags.c_contiguous:
        raise ValueError("numeric_grad needs a C-contiguous x (it perturbs x through a flat view)")
    xp = array_module(x)
    g = xp.zeros(x.shape if indices is None else len(indices), dtype=x.dtype)
    flat, gflat = x.reshape(-1), g.reshape(-1)        # views: x must be contiguous
    for n, i in enumerate(range(flat.size) if indices is None else indices):
        old = flat[i].item()
        flat[i] = old + eps
        fp = float(f())
        flat[i] = old - eps
        fm = float(f())
        flat[i] = old
        gflat[n] = (fp - fm) / (2 * eps)
    return g


def rel_error(a, b):
    """||a - b|| / max(||a||, ||b||), 0 when both are 0."""
    import numpy as np

    a, b = np.asarray(to_host(a), dtype=np.float64), np.asarray(to_host(b), dtype=np.float64)
    den = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if den == 0 else float(np.linalg.norm(a - b) / den)
