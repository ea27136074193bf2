"""Decode-to-scratch products arranged around cuBLAS: several weights in one GEMM, and a tall weight
decoded slab by slab ahead of its GEMMs.

    matmul_stacked(x, parts, out=None)        x @ [W_0; W_1; ...].T -> float32 [M, sum n_i]
    matmul_ahead(x, w_raw, qtype, n_out, out, slab_rows=4096, slots=4)
                                              x @ W.T into out (float32 or float16, [M, n_out])

Where the GPU's tuning table picks a fused wgmma GEMM (linked.gemm_wgmma_linked: W decoded inside the
product, no scratch) for a product, both call it instead, writing each weight's column block of out
directly (float32 or float16).

Both use the shared decode scratch of scratch.py (one fp16 buffer, sized by the largest matrix a
product has decoded), so neither keeps more decoded bytes than a plain product of the same rows.

matmul_stacked: the weights that read the same x (a block's q, k and v) are decoded one after the
other into consecutive rows of the scratch and multiplied by one GEMM, where the variant the table
picks for them decodes to a scratch (dequant_linked_cublas and its kin); otherwise each goes through
``matmul`` into its columns. On an H200 at M = 4096 the 3584-wide q product alone ran at ~400
TFLOP/s and k, v (N = 512) at ~320 (docs/perf.md, tenth stop): one N = 4608 GEMM is one launch at the
large-N rate.

matmul_ahead: a quantized W too tall to decode whole (the 7B's 152064 x 3584 Q6_K head: 1.1 GB in
fp16) goes ``slab_rows`` rows at a time through a ring of ``slots`` slabs of the scratch. The slabs
are decoded on a second stream; the GEMM of slab j waits for its decode (an event), and the decode of
slab j waits for the GEMM that last read its slot (slab j - slots), so decoding runs ahead of the
products by up to ``slots`` - 1 slabs instead of between them. The caller's stream has waited for
every decode when the call returns (fork and join by events: a CUDA graph captures it as it runs).
With out float16 each GEMM writes its columns rounded once from the FP32 accumulator, no float32
slab in between.

On NumPy (the CPU and the simulator) both run the same loops in order, the decode through
dispatch.dequantize_to, the product in NumPy on the same fp16-rounded operands.
"""
from __future__ import annotations

import numpy as np

from q4kdistill import backend
from q4kdistill.errors import Q4KError

from .weights import columns, qtype_name

SLAB_ROWS = 4096          # rows a slab of matmul_ahead (a multiple of 16)
SLOTS = 4                 # slabs in the ring: SLAB_ROWS * SLOTS rows of scratch, the LM head's HEAD_ROWS

_STACKABLE = ("dequant_linked_cublas", "dequant_linked_overlap4", "dequant_linked_overlap16",
              "dequant_f16_cublas")
_SIDE: dict = {}          # device id -> the stream that decodes ahead
_EVENTS: dict = {}        # (device id, "name", i) -> a reusable cupy Event (no timing)


def _event(dev: int, name: str, i: int):
    import cupy

    key = (dev, name, i)
    e = _EVENTS.get(key)
    if e is None:
        e = _EVENTS[key] = cupy.cuda.Event(disable_timing=True)
    return e


def _side(dev: int):
    import cupy

    s = _SIDE.get(dev)
    if s is None:
        s = _SIDE[dev] = cupy.cuda.Stream(non_blocking=True)
    return s


def applies(qtype, M: int, N: int, K: int) -> bool:
    """Whether matmul_ahead runs on the GPU's own paths for a ``qtype`` weight multiplied N rows at a
    time by M tokens here: the table picks a decode + cuBLAS variant (the ring of slabs) or a fused
    wgmma GEMM (one call, no scratch) at these sizes."""
    q = qtype_name(qtype)
    return backend.on_gpu() and (_use_linked([q], M, N, K) or _fused(q, M, N, K) is not None)


def _fused(q: str, M: int, N: int, K: int):
    """The fused wgmma variant the table picks for this product here, or None."""
    from .dispatch import choose, linked_available
    from .linked import QTYPES, wgmma_available

    if q not in QTYPES:
        return None
    name = choose(q, M, N, K, on_gpu=True)
    if not name.startswith("gemm_wgmma_linked") or not linked_available() or not wgmma_available():
        return None
    from .registry import get

    return get(name)


def _use_linked(qtypes, M: int, N: int, K: int) -> bool:
    """Whether these products run as linked decode + cuBLAS here (what the table picks, linked compiled)."""
    from .dispatch import choose, linked_available
    from .linked import QTYPES

    return all(q in QTYPES and choose(q, M, N, K, on_gpu=True) in _STACKABLE for q in qtypes) \
        and linked_available()


def _parts(x, parts):
    K = x.shape[1]
    out = []
    for w_raw, qtype, n in parts:
        q = qtype_name(qtype)
        if columns(w_raw, q, n) != K:
            raise Q4KError(f"matmul_stacked: a {q} [{n}, {columns(w_raw, q, n)}] weight does not take x [M, {K}]")
        out.append((w_raw, q, int(n)))
    return out


def matmul_stacked(x, parts, out=None):
    """x [M, K] @ [W_0; W_1; ...].T -> float32 [M, sum n_i] (``out``: a C-contiguous float32 or float16
    one to fill; float16: the FP32 accumulator rounded once as the GEMM writes it).

    parts: (w_raw, qtype, n_out) per weight, in the order their columns come out."""
    from .dispatch import matmul

    xp = backend.array_module(x)
    if x.ndim != 2:
        raise Q4KError(f"matmul_stacked: x must be [M, K], got {tuple(x.shape)}")
    parts = _parts(x, parts)
    M, K = x.shape
    N = sum(n for _, _, n in parts)
    if out is None:
        out = xp.empty((M, N), dtype=np.float32)
    elif tuple(out.shape) != (M, N) or out.dtype.name not in ("float32", "float16") or not out.flags.c_contiguous:
        raise Q4KError(f"matmul_stacked: out must be C-contiguous float32 or float16 {(M, N)}, "
                       f"got {out.dtype} {tuple(out.shape)}")
    if M == 0:
        return out
    if xp is not np and _use_linked([q for _, q, _ in parts], M, N, K):
        from .linked import decode_f16_linked, to_f16
        from .scratch import gemm_f16_f32, scratch

        w16 = scratch(xp, N * K, np.float16).reshape(N, K)
        r0 = 0
        for w_raw, q, n in parts:
            decode_f16_linked(w_raw, q, K, w16[r0:r0 + n])
            r0 += n
        return gemm_f16_f32(to_f16(x), w16, out)
    fused = [_fused(q, M, n, K) for _, q, n in parts] if xp is not np else [None]
    if all(v is not None for v in fused):  # fused GEMMs writing their column blocks (no scratch, no temporaries)
        from .linked import gemm_wgmma_linked, to_f16

        x16, c0 = to_f16(x), 0
        for (w_raw, q, n), v in zip(parts, fused):
            gemm_wgmma_linked(x16, w_raw, q, n, out[:, c0:c0 + n], **v.params)
            c0 += n
        return out
    c0 = 0
    for w_raw, q, n in parts:          # each weight as matmul would multiply it alone (float32, then out's type)
        out[:, c0:c0 + n] = matmul(x, w_raw, q, n)
        c0 += n
    return out


def matmul_ahead(x, w_raw, qtype, n_out, out, slab_rows: int = SLAB_ROWS, slots: int = SLOTS):
    """out [M, n_out] = x [M, K] @ W.T, W decoded ``slab_rows`` rows at a time into a ring of ``slots``
    slabs of the fp16 scratch on a side stream (module docstring). out: float32 or float16, rows
    unit-stride (a column block of a wider matrix is fine). x: float32 or float16."""
    xp = backend.array_module(x)
    q = qtype_name(qtype)
    K = columns(w_raw, q, n_out)
    if x.ndim != 2 or x.shape[1] != K:
        raise Q4KError(f"matmul_ahead: x must be [M, {K}] for this {q} weight, got {tuple(x.shape)}")
    M = x.shape[0]
    if tuple(out.shape) != (M, n_out) or out.dtype.name not in ("float32", "float16"):
        raise Q4KError(f"matmul_ahead: out must be float32 or float16 {(M, n_out)}, got {out.dtype} {tuple(out.shape)}")
    if slab_rows <= 0 or slab_rows % 16 or slots < 1:
        raise Q4KError(f"matmul_ahead: slab_rows must be a positive multiple of 16 and slots >= 1, "
                       f"got {slab_rows}, {slots}")
    if M == 0 or n_out == 0:
        return out
    slab_rows = min(slab_rows, -(-n_out // 16) * 16)
    bounds = list(range(0, n_out, slab_rows)) + [n_out]
    if xp is np:
        from .dispatch import dequantize_to
        from .scratch import scratch

        w16 = scratch(np, min(slots, len(bounds) - 1) * slab_rows * K, np.float16).reshape(-1, slab_rows, K)
        x16 = x.astype(np.float16).astype(np.float32)
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            slab = w16[j % slots, :b - a]
            slab[...] = dequantize_to(w_raw[a:b], q, b - a, np.float32)   # decoded in float32, rounded once
            out[:, a:b] = x16 @ slab.astype(np.float32).T
        return out
    import cupy

    from .blas import gemm
    from .linked import decode_f16_linked, gemm_wgmma_linked, to_f16
    from .scratch import scratch

    fused = _fused(q, M, n_out, K)
    if fused is not None:                    # the table's fused GEMM: W read as stored, no slabs
        return gemm_wgmma_linked(x, w_raw, q, n_out, out, **fused.params)
    n_slabs = len(bounds) - 1
    ring = min(slots, n_slabs)
    w16 = scratch(cupy, ring * slab_rows * K, np.float16).reshape(ring, slab_rows, K)
    x16 = to_f16(x)
    main = cupy.cuda.get_current_stream()
    dev = cupy.cuda.Device().id
    side = _side(dev)
    start = _event(dev, "start", 0)
    start.record(main)                       # the scratch's earlier readers are on main
    side.wait_event(start)
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        slot = j % ring
        with side:
            if j >= ring:                    # the GEMM of slab j - ring has read this slot
                side.wait_event(_event(dev, "read", slot))
            decode_f16_linked(w_raw[a:b], q, K, w16[slot, :b - a])
            ready = _event(dev, "decoded", slot)
            ready.record(side)
        main.wait_event(ready)
        gemm(out[:, a:b], x16, w16[slot, :b - a], trans_b=True)
        _event(dev, "read", slot).record(main)
    return out
