"""The planner against measured bytes, on the CPU.

reproduce-memory's own experiment (load, forward, two distillation steps per backend) runs with
NumPy stand-ins for the GPU kernels that allocate exactly what the GPU code allocates -- each
matmul variant what its Variant.workspace declares (the decode scratch through kernels.scratch,
x in fp16, the padded copy of odd-length rows; tests/test_kernels_gpu.py checks the declarations
against the GPU's counter), dequantize_to's result, nothing for the fused AdamW update, the
student's fused kernels (its GPU path, taken through ``fused.ON_HOST``) their outputs -- and
tracemalloc counts every byte. The rest is the
package's own code. Every array stays under NumPy's 256 KiB temporary-elision threshold, so NumPy
allocates what CuPy allocates, except the contiguous copies CuPy makes of non-contiguous batched
matmul operands (the planner counts those; NumPy measures up to one such copy less).
The allowance covers Python objects, which tracemalloc counts too.
"""
import dataclasses
import gc

import kernels
import numpy as np
import pytest
from kernels import dispatch, flash_attention_mma, fused_glu, fused_kd_loss, fused_rmsnorm, fused_rope, registry, weights
from kernels.scratch import scratch

from q4kdistill.formats import synthetic
from q4kdistill.formats.model_file import ModelFile
from q4kdistill.memory import planner
from q4kdistill.memory import reproduce as rm
from q4kdistill.student.ops import flash_attention
from q4kdistill.student.ops import fused as fused_ops
from q4kdistill.student.ops import fused_linear_loss
from q4kdistill.student.optim import AdamW
from q4kdistill.teacher import forward as teacher_forward

# Python objects next to the arrays (tracemalloc counts them; the GPU's counter does not). Measured
# 2026-12-04 at these tiny sizes: the teacher rows carry 16-28 KB of them, the student rows 84-96 KB
# (parameter views, caches' tuples and dicts, the interpreter's caches of the code that ran), which
# the relative slack covers only just: 32 KB left a row 1.8 KB short once the backward made two norm
# outputs again (a row that moved by the planner's 88.3 KB, measured 88.3 KB).
SLACK_BYTES = 40_000
SLACK = 0.015


def _declared_product(v):
    """A stand-in for variant v that allocates what v declares (Variant.workspace; checked against
    the GPU's counter by tests/test_kernels_gpu.py): its decode scratch through kernels.scratch,
    then its other buffers, all alive at once."""

    def product(x, w_raw, qtype, n_out, out, **params):
        M, K = x.shape
        dtype, nbytes = v.decode_scratch(qtype, M, n_out, K)
        if dtype:
            scratch(np, nbytes // np.dtype(dtype).itemsize, dtype)
        held = [np.empty(b, np.uint8) for k, b in v.workspace_bytes(qtype, M, n_out, K).items()
                if k not in registry.DECODE_SCRATCH.values()]
        out.fill(0)
        del held
        return out

    return product


def _dequantize_to(w_raw, qtype, n_out, out_dtype, out=None):
    views = weights.device_views(w_raw)            # alive while the result is allocated
    out = np.zeros((n_out, weights.columns(w_raw, qtype, n_out)), np.uint16 if out_dtype == "bfloat16" else out_dtype)
    del views
    return out


def _mma_attention_forward(q, k, v, key_mask, window, scale, dtype="bf16", out_dtype=None):
    """kernels.flash_attention_mma's buffers: 16-bit q, k, v, the mask as uint8 (while the kernel runs),
    o (float32, or out_dtype) and the log-sum-exp."""
    B, T, H, D = q.shape
    q16, k16, v16 = (np.zeros(a.shape, np.uint16) for a in (q, k, v))
    mask = None if key_mask is None else np.ascontiguousarray(key_mask, dtype=np.uint8)
    o, lse = np.zeros(q.shape, out_dtype or np.float32), np.zeros((B, H, T), np.float32)
    del mask
    return o, lse, (q16, k16, v16, dtype)


def _mma_attention_backward(do, cache):
    """... and of its backward: rowsum(do * o) per head, do in 16 bits, the mask, dq, dk, dv."""
    q16, k16, _, _ = cache.extra
    drow = np.ascontiguousarray((do * cache.o).sum(axis=-1).transpose(0, 2, 1))
    do16 = np.zeros(do.shape, np.uint16)
    mask = None if cache.key_mask is None else np.ascontiguousarray(cache.key_mask, dtype=np.uint8)
    dq = np.zeros(q16.shape, np.float32)
    dk, dv = np.zeros(k16.shape, np.float32), np.zeros(k16.shape, np.float32)
    del drow, do16, mask
    return dq, dk, dv


# The student's fused kernels (kernels/fused_*.py, reached through student/ops/fused.py with ON_HOST):
# each allocates its outputs and nothing else of size N (rmsnorm's backward: a [G, D] float32 partial
# with G = min(rows, 528) blocks on the GPU); rope rotates in place; add_outer accumulates in place.
def _rmsnorm_fwd(x, w, eps, residual=None, y=None, h=None, threads=None):
    y = np.zeros(x.shape, x.dtype) if y is None else y
    h = x if residual is None else (np.zeros(x.shape, x.dtype) if h is None else h)
    return y, h, np.zeros(int(np.prod(x.shape[:-1])), np.float32)


def _rmsnorm_bwd(dy, h, w, rstd, dres=None, dx=None, blocks=None, threads=None):
    dx = np.zeros(h.shape, dy.dtype) if dx is None else dx
    dw = np.zeros(w.shape, np.float32)
    partial = np.empty(min(rstd.size, 528) * w.size, np.float32)
    del partial
    return dx, dw


def _rmsnorm_apply(h, w, rstd, y=None):
    return np.zeros(h.shape, h.dtype) if y is None else y


def _rope_apply(x, style, cos=None, sin=None, positions=None, base=None, inverse=False, out=None):
    return x if out is None else out


def _glu_fwd(gate, up, act, y=None):
    F = gate.shape[-1] if up is not None else gate.shape[-1] // 2
    return np.zeros(gate.shape[:-1] + (F,), gate.dtype) if y is None else y


def _glu_bwd(dy, gate, up, act, dgate=None, dup=None):
    return np.zeros(dy.shape, dy.dtype), np.zeros(dy.shape, dy.dtype)


def _kd_loss_rows(s, t, targets, kd_weight, ce_weight, kind="kl", temperature=1.0, beta=0.5, ds=None, threads=None):
    ds = np.empty_like(s) if ds is None else ds
    n = s.shape[0]
    return np.zeros(n, np.float32), np.zeros(n, np.float32), ds, np.zeros(n, np.float32)


def _embedding_rows(w_raw, qtype, ids):
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    views = weights.device_views(w_raw)
    out = np.zeros((ids.size, weights.columns(w_raw, qtype, w_raw.shape[0])), np.float32)
    del views
    return out


@pytest.fixture
def gpu_allocations(monkeypatch):
    """-> measure(model, **plan_args): the plans, then the experiment under GPU-like allocations."""

    def measure(model, batch, seq, step_batch, student, chunk_tokens, checkpoint):
        monkeypatch.setattr(fused_ops, "ON_HOST", True)                  # the student's GPU path: its fused ops
        kw = dict(chunk_tokens=chunk_tokens, checkpoint=checkpoint)
        fwd, step = (planner.make_plan(model, b, seq, student, **kw) for b in (batch, step_batch))
        real_choose = dispatch.choose
        monkeypatch.setattr(dispatch, "choose", lambda q, M, N, K, on_gpu=None: real_choose(q, M, N, K, on_gpu=True))
        for name, v in list(registry._REGISTRY.items()):
            monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(v, fn=_declared_product(v)))
        monkeypatch.setattr(kernels, "dequantize_to", _dequantize_to)
        monkeypatch.setattr(kernels, "embedding_rows", _embedding_rows)
        monkeypatch.setattr(flash_attention, "choose_path", lambda q, path=None: "mma")
        # the teacher's GPU path (fused kernels, float16 product inputs) on NumPy arrays
        monkeypatch.setattr(teacher_forward, "_gpu", lambda x: x.flags.c_contiguous)
        monkeypatch.setattr(flash_attention_mma, "mma_attention_forward", _mma_attention_forward)
        monkeypatch.setattr(flash_attention_mma, "mma_attention_backward", _mma_attention_backward)
        monkeypatch.setattr(AdamW, "_update", lambda self, *args: None)
        for mod, name, fn in ((fused_rmsnorm, "rmsnorm_fwd", _rmsnorm_fwd), (fused_rmsnorm, "rmsnorm_bwd", _rmsnorm_bwd),
                              (fused_rmsnorm, "rmsnorm_apply", _rmsnorm_apply),
                              (fused_rope, "rope_apply", _rope_apply), (fused_glu, "glu_fwd", _glu_fwd),
                              (fused_glu, "glu_bwd", _glu_bwd), (fused_kd_loss, "kd_loss_rows", _kd_loss_rows),
                              (fused_linear_loss, "add_outer", lambda gW, ds, hc: gW)):
            monkeypatch.setattr(mod, name, fn)
        data = {name: model.tensor_data(name) for name in model.tensors}
        monkeypatch.setattr(model, "tensor_data", lambda name: data[name].copy())     # the upload's copy
        kernels.release_scratch()
        gc.collect()
        exp = rm._Experiment(model, log=lambda line: None)
        for b in planner.BACKENDS:
            exp.section(b, fwd, [step] if b == "native" else [])
        assert not exp.outcome, exp.outcome
        assert step.student["fused_ops"]
        return exp.compare(fwd, step), fwd, step

    yield measure
    kernels.release_scratch()


def _check(rows):
    assert len(rows) == 14
    for r in rows:
        assert abs(r["measured_bytes"] - r["predicted_bytes"]) <= SLACK * r["predicted_bytes"] + SLACK_BYTES, r


def _counts(plan, row):
    return plan.row(row).counts


@pytest.mark.parametrize("checkpoint", [True, False])
def test_tiny_teacher_every_row(gpu_allocations, checkpoint):
    """reproduce-memory --tiny's teacher and student; two loss chunks (the fused head drops a chunk's
    buffers before the next one's product, so the second chunk holds no more than the first)."""
    rows, fwd, step = gpu_allocations(ModelFile.open(rm.tiny_manifest()), 1, 32, 1, rm.TINY["student"], 16, checkpoint)
    _check(rows)
    assert "LM head + loss" in _counts(step, "distill: student forward/backward peak")
    assert "(16 tokens)" in _counts(step, "loss chunk working set")


@pytest.mark.parametrize("checkpoint, where", [(True, "block backward (ffn_up"), (False, "block backward (ffn_up")])
def test_attention_heavy_student(gpu_allocations, tmp_path, checkpoint, where):
    """8 heads at T = 88 and a small vocabulary: [B, H, T, T] scores would outweigh the rest (they
    did before flash attention); with 16-bit q, k, v and a [B, H, T] log-sum-exp they do not."""
    path = synthetic.write_gguf(tmp_path / "q.gguf", synthetic.tiny_config("qwen2"), qtypes={"*": "Q4_K", "output": "Q6_K"})
    student = "d_model=64,n_layers=3,d_ff=128,n_heads=8,n_kv_heads=2"
    rows, fwd, step = gpu_allocations(ModelFile.open(path), 1, 88, 1, student, 24, checkpoint)
    _check(rows)
    assert where in _counts(step, "distill: student forward/backward peak")
    assert "attention" not in _counts(fwd, "teacher forward working set (native)")


def test_lm_head_in_slabs(gpu_allocations, monkeypatch, tmp_path):
    """A Q6_K head of 2048 rows multiplied 768 rows at a time: the first forward grows the scratch
    from the blocks' size to a slab's (old and new buffer at once), odd-length rows are padded per
    product, and the step's last chunk of 8 tokens takes the fused GEMV."""
    monkeypatch.setattr(teacher_forward, "HEAD_ROWS", 768)
    path = synthetic.write_gguf(tmp_path / "q.gguf", synthetic.tiny_config("qwen2", vocab_size=2048),
                                qtypes={"*": "Q4_K", "output": "Q6_K"})
    rows, fwd, step = gpu_allocations(ModelFile.open(path), 1, 32, 1, "layers=1", 24, True)
    _check(rows)
    assert "slab_product" in _counts(fwd, "teacher forward working set (native)")
    assert fwd.row("teacher decode scratch (native)").predicted_bytes == 2 * 768 * 256


def test_teacher_logits_in_spans(gpu_allocations, monkeypatch, tmp_path):
    """A GPU step's teacher logits: Teacher.logits_fn multiplies a span of tokens at once into float16
    (teacher.model.head_span, forced here: 40 tokens, so the 16-token chunks take spans 0-40 and
    32-64), a Q6_K head of 2048 rows in slabs of 768; the span made before each chunk's s and held
    while later chunks read it."""
    from q4kdistill.teacher import model as teacher_model

    monkeypatch.setattr(teacher_forward, "HEAD_ROWS", 768)
    monkeypatch.setattr(teacher_model, "head_span", lambda on_gpu, tokens=None: (40, np.float16))
    path = synthetic.write_gguf(tmp_path / "q.gguf", synthetic.tiny_config("qwen2", vocab_size=2048),
                                qtypes={"*": "Q4_K", "output": "Q6_K"})
    rows, fwd, step = gpu_allocations(ModelFile.open(path), 1, 32, 2, "d_model=64,n_layers=1,d_ff=128,n_heads=4,"
                                      "n_kv_heads=2", 16, True)
    _check(rows)
    assert step.head_span == (40, 2)
    assert "LM head + loss" in _counts(step, "distill: student forward/backward peak")
    # at least a chunk's float32 s/ds beside the span's 40 float16 rows (per-call 16-token chunks: 262,144 at most)
    assert step.row("loss chunk working set").predicted_bytes >= 16 * 2048 * 4 + 40 * 2048 * 2


def test_untied_embedding_grad_as_rows(gpu_allocations, monkeypatch, tmp_path):
    """A student whose untied embedding's grad is the gathered rows (params.RowGrad, what a bf16
    student on one GPU does): the grad buffer without the [V, D], the rows kept through AdamW, and
    there their per-id sums and the rows' p, m, v before the update (the update itself a no-op here,
    as the fused kernel allocates nothing)."""
    from q4kdistill.student import model as student_model

    init = student_model.Student.__init__
    monkeypatch.setattr(student_model.Student, "__init__",
                        lambda self, config, *a, **k: init(self, config, *a, **dict(k, sparse_embedding_grad=True)))
    monkeypatch.setattr(planner, "_student_rows", lambda cfg, precision, gpus, given: True)
    monkeypatch.setattr(AdamW, "_apply", lambda self, *args: None)
    path = synthetic.write_gguf(tmp_path / "q.gguf", synthetic.tiny_config("qwen2", vocab_size=2048),
                                qtypes={"*": "Q4_K", "output": "Q6_K"})
    rows, fwd, step = gpu_allocations(ModelFile.open(path), 1, 32, 2, "d_model=64,n_layers=2,d_ff=128,n_heads=4,"
                                      "n_kv_heads=2,tied=0", 24, False)
    _check(rows)
    assert step.student["sparse_embedding_grad"]
    assert "gathered rows" in _counts(step, "distill: optimizer step peak")


@pytest.mark.parametrize("checkpoint", [True, False])
def test_gemma3_teacher_and_student(gpu_allocations, tmp_path, checkpoint):
    """q/k norms, post norms, GeGLU-tanh, sliding windows, a tied Q8_0 head."""
    path = synthetic.write_gguf(tmp_path / "g.gguf", synthetic.tiny_config("gemma3"), qtypes={"*": "Q8_0"})
    rows, fwd, step = gpu_allocations(ModelFile.open(path), 1, 60, 1, "layers=0,1", 16, checkpoint)
    _check(rows)
    # the fused GLU keeps no temporaries, so this small-d_ff teacher peaks at the attention output's product
    assert "stage 'attn_output'" in _counts(fwd, "teacher forward working set (native)")
    assert "(ffn" in _counts(step, "distill: student forward/backward peak")
