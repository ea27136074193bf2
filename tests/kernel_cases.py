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


def aligned(a, align=16):
    """A copy of `a` whose data starts `align`-byte aligned and ends exactly where `a` does (a read
    past the end of W is an IndexError in the simulator, an abort in the C emulations)."""
    buf = np.empty(a.nbytes + align, np.uint8)
    off = (-buf.ctypes.data) % align
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def check_twin_rejects(twin, bad_tile: dict, tile_match: str):
    """The input errors both GEMM twins (kernels/gemm_mma_twin.py, gemm_wgmma_twin.py) raise: a type
    they do not decode, the tile `bad_tile` (error matching `tile_match`), unaligned weights, x of
    the wrong width."""
    import pytest

    from q4kdistill.errors import Q4KError

    w = aligned(np.zeros((4, 144), np.uint8))
    x, out = np.zeros((2, 256), np.float32), np.zeros((2, 4), np.float32)
    with pytest.raises(Q4KError, match="decodes"):
        twin(x, aligned(np.zeros((4, 34 * 8), np.uint8)), "Q8_0", 4, out)
    with pytest.raises(Q4KError, match=tile_match):
        twin(x, w, "Q4_K", 4, out, **bad_tile)
    with pytest.raises(Q4KError, match="16-byte aligned"):
        twin(x, aligned(np.zeros(4 * 144 + 1, np.uint8))[1:].reshape(4, 144), "Q4_K", 4, out)
    with pytest.raises(Q4KError, match=r"x must be"):
        twin(np.zeros((2, 512), np.float32), w, "Q4_K", 4, out)
