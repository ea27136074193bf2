"""An untied embedding's grad as the rows a step gathered (params.RowGrad) instead of a [V, D] array.

Held to the dense grad it replaces: the same rows bit for bit (ids repeated, padded batches,
accumulated backwards), the same AdamW update bit for bit without clipping (m and v decay and weight
decay move every row, gathered or not), the same to float32 rounding with clipping (the norm sums in
another order), and the planner's grad row without the [V, D]. CPU (NumPy); the graph's replay of it
is tests/test_cuda_graph.py's untied case on a GPU.
"""
import numpy as np
import pytest
from _helpers_student import batch, randomize, tiny_config

from q4kdistill.errors import Q4KError
from q4kdistill.memory import planner
from q4kdistill.student import Student
from q4kdistill.student.losses import LossConfig
from q4kdistill.student.ops.embedding import embedding_backward
from q4kdistill.student.optim import AdamW, OptimConfig
from q4kdistill.student.params import FlatBuffer, RowGrad


def test_rows_sum_as_the_dense_grad_adds_them():
    rng = np.random.default_rng(0)
    V, D = 11, 6
    rows = RowGrad((V, D), np, np.float32)
    assert rows.dense().shape == (V, D) and not rows.dense().any()        # nothing gathered yet
    dense = np.zeros((V, D), np.float32)
    for _ in range(3):                                                      # three backwards, repeated ids
        ids = rng.integers(0, V, (2, 7))
        dy = rng.standard_normal((2, 7, D)).astype(np.float32)
        rows.add(ids, dy)
        embedding_backward(dy, (ids, (V, D)), out=dense)
    u, r = rows.summed()
    assert np.all(np.diff(u) > 0) and r.shape == (u.size, D)
    np.testing.assert_array_equal(rows.dense(), dense)
    state = rows.state()
    rows.reset()
    assert rows.summed()[0].size == 0
    rows.restore(state)
    np.testing.assert_array_equal(rows.dense(), dense)


def test_flat_buffer_without_its_first_tensor():
    shapes = {"e": (4, 3), "w": (2, 3), "n": (3,)}
    full = FlatBuffer(shapes, np, np.float32)
    part = full.zeros_like(without="e")
    assert part.start == 12 and part.size == full.size - 12 and set(part.views) == {"w", "n"}
    assert part.decay_stop == full.decay_stop == 18 and part.offsets == full.offsets
    part.views["w"][...] = 1
    assert part.flat[:6].sum() == 6 and part.flat[6:].sum() == 0
    with pytest.raises(ValueError, match="first tensor"):
        full.zeros_like(without="w")


def _pair(precision, seed=5):
    cfg = tiny_config("llama")                       # untied
    models = []
    for sparse in (True, False):
        m = Student(cfg, xp=np, precision=precision, sparse_embedding_grad=sparse)
        randomize(m, np.random.default_rng(seed), 0.2)
        models.append(m)
    return cfg, models


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_student_grads_are_the_dense_ones(precision):
    cfg, (sparse, dense) = _pair(precision)
    assert sparse.embedding_rows is not None and dense.embedding_rows is None
    assert sparse.grad_buffer.size == dense.grad_buffer.size - cfg.vocab_size * cfg.d_model
    rng = np.random.default_rng(1)
    ids, mask = batch(rng, cfg)
    teacher = (rng.standard_normal(ids.shape + (cfg.vocab_size,)) * 2).astype(np.float32)
    for accumulate in (False, True):                 # a second backward adds its rows to the first's
        out = [m.loss_and_grads(ids, teacher, LossConfig(), attention_mask=mask, accumulate=accumulate)
               for m in (sparse, dense)]
        assert out[0][0] == out[1][0]
    gs, gd = out[0][1], out[1][1]
    assert isinstance(gs["token_embd.weight"], RowGrad)
    np.testing.assert_array_equal(gs["token_embd.weight"].dense(), gd["token_embd.weight"])
    for name in gd:
        if name != "token_embd.weight":
            np.testing.assert_array_equal(gs[name], gd[name], err_msg=name)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_adamw_moves_every_row_as_with_the_dense_grad(clip):
    cfg, (sparse, dense) = _pair("fp32")
    opt_cfg = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1, grad_clip=clip)
    opts = [AdamW.for_student(m, opt_cfg) for m in (sparse, dense)]
    rng = np.random.default_rng(2)
    for _ in range(3):                               # a few ids a step: most rows get no grad
        ids = rng.integers(0, 4, (1, 5))
        teacher = (rng.standard_normal(ids.shape + (cfg.vocab_size,)) * 2).astype(np.float32)
        for m, opt in zip((sparse, dense), opts):
            m.loss_and_grads(ids, teacher, LossConfig())
            info = opt.step()
        assert info["grad_norm"] > 0
    got = [(m.param_buffer.flat, o.m, o.v) for m, o in zip((sparse, dense), opts)]
    untouched = sparse.params["token_embd.weight"][4:]
    assert not np.array_equal(untouched, Student(cfg, xp=np).params["token_embd.weight"][4:])   # decayed
    for a, b in zip(*got):
        if clip:                                     # the clip scale from a norm summed in another order
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        else:
            np.testing.assert_array_equal(a, b)


def test_what_cannot_be_sparse_says_so():
    with pytest.raises(Q4KError, match="untied"):
        Student(tiny_config("qwen2"), xp=np, sparse_embedding_grad=True)       # tied
    assert Student(tiny_config("llama"), xp=np, precision="bf16").embedding_rows is None   # the CPU: dense
    s = Student(tiny_config("llama"), xp=np)
    with pytest.raises(Q4KError, match="RowGrad"):
        AdamW(s.param_buffer, s.param_buffer.zeros_like(without="token_embd.weight"))


def test_planner_counts_the_rows_not_the_table():
    manifest = "q4kdistill/data/deepseek-r1-distill-qwen-7b-q4_k_m.manifest.json"
    plans = [planner.make_plan(manifest, 8, 512, [0, 27], checkpoint=False, precision="bf16", fused_ops=True,
                               sparse_embedding_grad=s) for s in (True, False)]
    V, D = 152064, 3584                              # the 7B's untied embedding
    grads = [p.row("student grads").predicted_bytes for p in plans]
    assert grads[1] - grads[0] == 4 * V * D
    assert plans[0].student["sparse_embedding_grad"] and not plans[1].student["sparse_embedding_grad"]
    opt = [p.row("distill: optimizer step peak").predicted_bytes for p in plans]
    assert opt[1] - opt[0] == 4 * V * D - (5 * 4096 * D * 4 + 2 * 4096 * 8)
    tied = planner.make_plan(manifest, 8, 512, "d_model=896,n_layers=2,d_ff=4864,n_heads=14,n_kv_heads=2,tied=1",
                             precision="bf16", sparse_embedding_grad=True)
    assert not tied.student["sparse_embedding_grad"]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_rows_and_adamw_match_the_dense_grad(precision):
    """The same on CuPy: cupy.unique, the per-id sum and AdamW's broadcast zero grad. fp32: the per-id
    sums and the dense add.at add repeated ids atomically, in any order, so float32 rounding apart the
    same (three AdamW steps, clipped). bf16 (the case the rows are for): its attention backward's
    atomics make two runs differ more (tests/test_cuda_graph.py), so the rows against the dense grad."""
    import cupy

    cfg = tiny_config("llama", vocab_size=301, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
    models = []
    for sparse in (True, False):
        m = Student(cfg, xp=cupy, precision=precision, sparse_embedding_grad=sparse)
        randomize(m, np.random.default_rng(5), 0.2)
        models.append(m)
    assert models[0].embedding_rows is not None and models[1].embedding_rows is None
    opt_cfg = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1, grad_clip=1.0)
    opts = [AdamW.for_student(m, opt_cfg) for m in models]
    rng = np.random.default_rng(2)
    for _ in range(1 if precision == "bf16" else 3):
        ids = rng.integers(0, 40, (2, 33))             # repeated ids; most of the 301 rows get no grad
        teacher = (rng.standard_normal(ids.shape + (cfg.vocab_size,)) * 2).astype(np.float32)
        grads = [m.loss_and_grads(cupy.asarray(ids), cupy.asarray(teacher), LossConfig())[1] for m in models]
        rows, dense = grads[0]["token_embd.weight"].dense().get(), grads[1]["token_embd.weight"].get()
        assert not rows[40:].any() and rows[:40].any()
        np.testing.assert_allclose(rows, dense, rtol=1e-3 if precision == "bf16" else 1e-5, atol=1e-6)
        if precision == "bf16":
            return
        norms = [opt.step()["grad_norm"] for opt in opts]
        assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    for a, b in zip(*[(m.param_buffer.flat, o.m, o.v) for m, o in zip(models, opts)]):
        np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(b), rtol=1e-4, atol=1e-7)
