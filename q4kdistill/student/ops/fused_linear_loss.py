"""The LM head and the distillation loss, fused: loss and gradients without ever holding [N, V] logits.

    fused_chunk_loss(s, t, targets, kd_weight, ce_weight, cfg, out=None)
        losses.chunk_loss's contract (every LossConfig: kl / rkl / jsd, CE, top-k, temperature),
        computed by one kernel (kernels.fused_kd_loss) that writes ds over s when out is s.
    fused_linear_loss(h, W, teacher, cfg, weights, chunk_tokens=None, gW=None, host_sums=True)
        the chunk loop of Student._head_backward (the idea of Liger-Kernel's fused linear losses):
        for each chunk of n tokens
            s   = h_c @ W.T                 [n, V]  (h's dtype: bf16 products where h and W are bf16)
            ds  = d loss / d s              written over s by the kernel
            dh_c = ds @ W                   [n, D]
            gW  += ds.T @ h_c               [V, D]  (one GemmEx into the float32 gW on the GPU: no
                                                     [V, D] temporary, FP32 accumulation)
        so [chunk, V] is the only logits buffer (with the teacher's chunk while the loss runs; each
        chunk's buffers are dropped before the next chunk's product). Row losses are summed on the device; one host
        read at the end.

Top-k (cfg.top_k < V): the teacher's k largest logits are gathered ([n, k], the same indices as
losses.kd_rows); "restricted" runs the kernel on the gathered [n, k] slabs and scatters its ds, with
the CE over the full row from a CE-only launch; "full" runs the kernel in its "student" kind (ds =
q over all V, plus CE) and finishes the loss and the -p at the k columns on the [n, k] slab.
"""
from __future__ import annotations

import numpy as np

from kernels import blas
from kernels.weights import address

from ...backend import array_module
from ...errors import Q4KError
from ..losses import LOG_FLOOR, LossConfig, SparseTargets, _top_k_index, chunk_loss, log_softmax

LOGITS_BUDGET = 2 ** 26   # default chunk: about this many logits (Student's rule)


def _f32(a):
    """float32 values of a float32 / float16 / bfloat16 (uint16 bits) array (a itself when float32)."""
    xp = array_module(a)
    if a.dtype == np.uint16:
        return (a.astype(xp.uint32) << 16).view(xp.float32)
    return a.astype(xp.float32, copy=False)


def _like(v, a):
    """float32 values v in a's storage type (bfloat16 bits rounded to nearest even)."""
    xp = array_module(v)
    if a.dtype == np.uint16:
        u = xp.ascontiguousarray(v, dtype=xp.float32).view(xp.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(xp.uint16)
    return v.astype(a.dtype)


def fused_chunk_loss(s, t, targets, kd_weight, ce_weight, cfg: LossConfig, out=None):
    """s [n, V] student logits, t [n, V] teacher logits (None: CE only) -> (kd [n], ce [n], ds [n, V]),
    ds = d/ds sum(kd_weight kd + ce_weight ce); ``out=s`` writes ds over s. kd, ce float32."""
    from kernels.fused_kd_loss import kd_loss_rows

    xp = array_module(s)
    n, V = (int(v) for v in s.shape)
    T, kind = float(cfg.temperature), cfg.effective_kind()
    ce_w = ce_weight if cfg.alpha > 0 else xp.zeros(n, dtype=np.float32)
    if t is None:
        if cfg.alpha != 1.0:
            raise Q4KError("no teacher logits: only the hard-label loss (alpha = 1) can be computed")
        _, ce, ds, _ = kd_loss_rows(s, None, targets, kd_weight, ce_w, "none", T, ds=out)
        return xp.zeros_like(ce), ce, ds
    if tuple(t.shape) != (n, V):
        raise Q4KError(f"teacher logits have shape {tuple(t.shape)}, expected {(n, V)}")
    if cfg.top_k is None or cfg.top_k >= V:
        kd, ce, ds, _ = kd_loss_rows(s, t, targets, kd_weight, ce_w, kind, T, cfg.beta, ds=out)
        return kd, ce, ds
    idx = _top_k_index(_f32(t), cfg.top_k)                           # [n, k]
    r = xp.arange(n)[:, None]
    s_k, t_k = xp.ascontiguousarray(s[r, idx]), xp.ascontiguousarray(t[r, idx])   # before ds overwrites s
    kd_w = xp.asarray(kd_weight, dtype=xp.float32).reshape(n, 1)
    if cfg.top_k_student == "full":                                  # kind "kl" (LossConfig checks)
        _, ce, ds, lse = kd_loss_rows(s, None, targets, kd_weight, ce_w, "student", T, ds=out)
        lp = log_softmax(_f32(t_k) / T)                              # [n, k] teacher over its top k
        lq = xp.maximum(_f32(s_k) / T - lse[:, None], LOG_FLOOR)
        p = xp.exp(lp)
        kd = T * T * (p * xp.where(p > 0, lp - lq, 0.0)).sum(axis=-1)
        ds[r, idx] = _like(_f32(ds[r, idx]) - kd_w * T * p, ds)
        return kd.astype(xp.float32), ce, ds
    _, ce, ds, _ = kd_loss_rows(s, None, targets, kd_weight, ce_w, "none", 1.0, ds=out)
    no_target, zero = xp.full(n, -1, dtype=np.int64), xp.zeros(n, dtype=np.float32)
    kd, _, ds_k, _ = kd_loss_rows(s_k, t_k, no_target, kd_weight, zero, kind, T, cfg.beta, ds=s_k)
    ds[r, idx] = _like(_f32(ds[r, idx]) + _f32(ds_k), ds)
    return kd, ce, ds


_CUDA_TYPES = ("float32", "float16", "bfloat16")               # add_outer's types on cuBLAS


def add_outer(gW, ds, hc):
    """gW [V, D] += ds [n, V].T @ hc [n, D], accumulated straight into gW.

    On the GPU with a float32 gW this is one cublasGemmEx with beta = 1 (kernels.blas; ds and hc
    float32, float16 or bfloat16; FP32 accumulation), so no [V, D] product is allocated and 16-bit
    products are not rounded to 16 bits before they are added. Elsewhere: gW += (ds.T @ hc) in gW's dtype."""
    xp = array_module(gW)
    if (xp is np or gW.dtype != np.float32 or ds.dtype.name not in _CUDA_TYPES or hc.dtype != ds.dtype
            or not (gW.flags.c_contiguous and ds.flags.c_contiguous and hc.flags.c_contiguous)):
        gW += (ds.T @ hc).astype(gW.dtype, copy=False)
        return gW
    return blas.gemm(gW, ds, hc, trans_a=True, beta=1.0)


def _writable_over(t, s, cfg) -> bool:
    """Whether the loss may write ds over the teacher's chunk t (a view of the span buffer, dead once
    the loss has read it): 16-bit like s, C-contiguous, full-vocabulary loss (top-k reads t after)."""
    return (not isinstance(t, SparseTargets) and t is not None and t.dtype.itemsize == s.dtype.itemsize == 2
            and t.flags.c_contiguous and (cfg.top_k is None or cfg.top_k >= s.shape[1]))


def _add_held(gW, held, h):
    """gW += DS.T @ h[rows] for the chunks whose ds the loss wrote over one teacher span: where they are
    consecutive rows of that span's buffer, one product over all of them (the [V, D] float32 gW read and
    written once a span instead of once a chunk: 4.4 GB a chunk for the 7B's 152064 x 3584 head)."""
    xp = array_module(gW)
    runs = []
    for start, stop, ds in held:
        last = runs[-1] if runs else None
        if last and last[1] == start and address(last[2]) + last[2].nbytes == address(ds) and last[2].strides == ds.strides:
            first = last[2]                                          # one view from first's row over both
            whole = xp.lib.stride_tricks.as_strided(first, shape=(stop - last[0], ds.shape[1]), strides=first.strides)
            runs[-1] = (last[0], stop, whole)
        else:
            runs.append((start, stop, ds))
    held.clear()
    for start, stop, ds in runs:
        add_outer(gW, ds, h[start:stop])


def matmul_f32(a, b, trans_b: bool, out=None):
    """float32 a @ b.T (trans_b, b [N, K]) or a @ b (b [K, N]) for 2-D C-contiguous CuPy arrays of
    one 16-bit type (float16 / bfloat16): one cublasGemmEx with FP32 accumulation and FP32 output,
    so the product is neither rounded to 16 bits nor cast back in a second pass."""
    if b.dtype != a.dtype or a.dtype.name not in ("float16", "bfloat16") or not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise Q4KError(f"matmul_f32 takes C-contiguous float16 / bfloat16 operands of one type, got {a.dtype}, {b.dtype}")
    if out is None:
        return blas.matmul(a, b, trans_b=trans_b, out_dtype=np.float32)
    return blas.gemm(out, a, b, trans_b=trans_b)


def _teacher_chunk(teacher, start, stop, V, xp):
    if teacher is None:
        return None
    t = teacher(start, stop) if callable(teacher) else teacher.reshape(-1, teacher.shape[-1])[start:stop]
    if isinstance(t, SparseTargets):                  # a teacher cache's top-k: the reference loss takes it
        return t.to(xp)
    if tuple(t.shape) != (stop - start, V):
        raise Q4KError(f"teacher logits for tokens {start}:{stop} have shape {tuple(t.shape)}, "
                       f"expected {(stop - start, V)} (same vocabulary as the student?)")
    return xp.ascontiguousarray(xp.asarray(t))


def fused_linear_loss(h, W, teacher, cfg: LossConfig, weights: dict, chunk_tokens=None, gW=None, host_sums=True):
    """h [N, D] final hidden states, W [V, D] head weight, teacher [N, V] logits / fn(start, stop) ->
    [stop - start, V] (or losses.SparseTargets, a teacher cache's top-k: losses.chunk_loss runs
    that chunk) / None (CE only); weights from losses.token_weights.

    -> (dh [N, D] in h's dtype, gW [V, D] (+= into the given gW, else a new float32 array),
        kd_sum, ce_sum) with the row sums masked by weights["kd_mask"] / ["ce_mask"]: floats, or with
        ``host_sums=False`` 0-d device arrays, so the caller can queue its backward before the one
        read that waits for the device (the student converts them after its whole backward)."""
    xp = array_module(h)
    if h.ndim != 2 or W.ndim != 2 or h.shape[1] != W.shape[1]:
        raise Q4KError(f"fused linear loss: h {tuple(h.shape)} and W {tuple(W.shape)} must be [N, D] and [V, D]")
    if h.dtype == np.uint16 or W.dtype == np.uint16:
        raise Q4KError("fused linear loss: bfloat16 products need bfloat16 arrays (CuPy >= 14), not uint16 bits")
    N, V = int(h.shape[0]), int(W.shape[0])
    step = chunk_tokens or max(1, min(N, LOGITS_BUDGET // max(V, 1)))
    dh = xp.empty_like(h)
    gW = xp.zeros(W.shape, dtype=xp.float32) if gW is None else gW
    kd_sum = xp.zeros((), dtype=xp.float64)
    ce_sum = xp.zeros((), dtype=xp.float64)
    spans = hasattr(teacher, "covers")                               # a Teacher.logits_fn SpanLogits (a GPU's)
    held = []                                                        # (start, stop, ds) written over the span at hand
    for start in range(0, N, step):
        stop = min(start + step, N)
        sl = slice(start, stop)
        hc = h[sl]                                                   # [n, D]
        if held and not teacher.covers(start, stop):                 # the span is done: its gW before the next
            _add_held(gW, held, h)
        t = _teacher_chunk(teacher, start, stop, V, xp)              # first: its product's buffers never meet s
        s = blas.product(hc, W, trans_b=True)                        # [n, V]
        rows = (weights["targets"][sl], weights["kd_weight"][sl], weights["ce_weight"][sl], cfg)
        over_t = spans and _writable_over(t, s, cfg)
        if isinstance(t, SparseTargets):                             # losses.chunk_loss in float32, ds back in s's type
            kd, ce, ds = chunk_loss(_f32(s), t, *rows)
            ds = _like(ds, s)
        else:
            kd, ce, ds = fused_chunk_loss(s, t, *rows, out=t.view(s.dtype) if over_t else s)
        del t                                                        # the teacher's chunk: used
        dh[sl] = blas.product(ds, W)                                    # [n, D]
        if over_t:
            held.append((start, stop, ds))                           # gW once the span's rows are all here
        else:
            add_outer(gW, ds, hc)                                    # gW [V, D] += ds.T @ h_c
        kd_sum += xp.where(weights["kd_mask"][sl], kd, 0.0).sum()
        ce_sum += xp.where(weights["ce_mask"][sl], ce, 0.0).sum()
        del s, ds                                                    # the next chunk's s never meets this one
    if held:
        _add_held(gW, held, h)
    if not host_sums:
        return dh, gW, kd_sum, ce_sum
    return dh, gW, float(kd_sum), float(ce_sum)
