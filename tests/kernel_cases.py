"""Shared inputs and checks for tests/test_kernels_*.py (CPU simulator and GPU)."""
from __future__ import annotations

import numpy as np

from kernels.decode import FORMATS
from q4kdistill.formats import quants

QTYPES = tuple(FORMATS)          # every type the kernels decode


def real_tensors(path) -> dict:
    """{qtype: raw uint8 [rows, row_bytes]} - the first tensor of each type in the gemma-3 file."""
    from q4kdistill.formats.model_file import ModelFile

    mf = ModelFile.open(path)
    found = {}
    for name, info in mf.tensors.items():
        if info.type_name in QTYPES and info.type_name not in found:
            found[info.type_name] = np.asarray(mf.tensor_data(name))
    return found


def sample_rows(raw, qtype, n_rows, n_blocks, rng):
    """n_rows random rows of a real tensor, a random window of n_blocks blocks: uint8 [n_rows, bytes]."""
    f = FORMATS[qtype]
    rows = rng.choice(raw.shape[0], n_rows, replace=False)
    start = int(rng.integers(0, raw.shape[1] // f.block_bytes - n_blocks + 1))
    return np.ascontiguousarray(raw[rows, start * f.block_bytes:(start + n_blocks) * f.block_bytes])


def reference(x, w_raw, qtype):
    """x @ W.T in float64, W decoded by the reference codec."""
    return np.asarray(x, np.float64) @ quants.dequantize(w_raw, qtype).astype(np.float64).T


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite output: an element was not written"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def bf16_to_f32(bits):
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


def real_block_matrix(raw, qtype, N, K, rng):
    """uint8 [N, row_bytes] of blocks drawn at random from a real tensor: real data, any shape."""
    f = FORMATS[qtype]
    pool = raw.reshape(-1, f.block_bytes)                         # [n_blocks, block_bytes]
    pick = rng.integers(0, pool.shape[0], N * (K // f.block_weights))
    return np.ascontiguousarray(pool[pick].reshape(N, -1))
