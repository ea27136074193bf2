"""A deliberately coarser copy of a GGUF, written with our own quantizer (formats/quants.py): what
``q4kdistill audit`` should then report as a worse teacher.

Each tensor of the chosen types (default Q4_K) is decoded, every group of ``group`` consecutive
weights of a row is snapped to ``levels`` evenly spaced values between its min and max (levels=4,
group=16: the grid of a 2-bit Q2_K-like block), and the result is encoded back as the tensor's
own type, so the copy runs on the same kernels. Every other tensor and all metadata are copied.
"""
from __future__ import annotations

import numpy as np

from . import quants
from ..errors import Q4KError


def coarsen(x, levels: int = 4, group: int = 16) -> np.ndarray:
    """float32 [rows, cols] -> each ``group`` of a row on ``levels`` values from its min to its max."""
    rows, cols = x.shape
    if cols % group or levels < 2:
        raise Q4KError(f"cannot coarsen rows of {cols} values in groups of {group} to {levels} levels")
    g = x.reshape(rows, cols // group, group).astype(np.float64)
    lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / (levels - 1), 1.0)
    return (lo + np.rint((g - lo) / step) * step).reshape(rows, cols).astype(np.float32)


def write_degraded_copy(src, dst, qtypes=("Q4_K",), levels: int = 4, group: int = 16) -> dict:
    """Write ``dst``: ``src`` with its ``qtypes`` tensors coarsened (see the module docstring).
    -> {"tensors": names changed, "rms_change": mean over them of rms(new - old) / rms(old)}."""
    from .gguf_file import read_header
    from .model_file import ModelFile
    from .synthetic import write_file

    model = ModelFile.open(src)
    meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in read_header(src).metadata.items()}
    wanted = {quants.qtype(q) for q in qtypes}
    changed, rms = [], []

    def tensors():
        for name, info in model.tensors.items():
            data = model.tensor_data(name)
            if info.qtype not in wanted:
                yield (name, np.asarray(data), info.qtype) if quants.is_quantized(info.qtype) else (name, np.asarray(data))
                continue
            x = quants.dequantize(data, info.qtype, info.shape).reshape(-1, info.shape[-1])
            y = coarsen(x, levels, group)
            new = quants.quantize(y, info.qtype)
            back = quants.dequantize(new, info.qtype, info.shape).reshape(x.shape)
            changed.append(name)
            rms.append(float(np.sqrt(np.mean((back - x) ** 2)) / max(np.sqrt(np.mean(x ** 2)), 1e-30)))
            yield name, new.reshape(*info.shape[:-1], -1), info.qtype

    write_file(dst, meta, tensors())
    if not changed:
        raise Q4KError(f"{src} has no tensor of type {', '.join(qtypes)} to coarsen")
    return {"tensors": changed, "rms_change": float(np.mean(rms))}
