"""The step replayed as a CUDA graph (train/cuda_graph.py) against the same step run eagerly.

Two students start equal; one steps through GraphedStep (eager, capture, replays), the other eagerly,
interleaved, so the eager one's allocations land between the replays in the default pool (a graph
writing an address it does not own would corrupt them). Each step's ids are fresh: a graph that had
baked in its capture's ids would give another loss. The bf16 student's attention backward adds dq (and
GQA dk, dv) with atomics, and the embedding's backward adds rows with atomics, whose order varies from
run to run (even two eager fp32 steps differ in the last bits), so the bound is what two eager runs
differ by, with room.
CPU: the helpers that decide and count (no graphs there).
"""
import numpy as np
import pytest

from q4kdistill.student.losses import LossConfig
from q4kdistill.train import cuda_graph


def _teacher_and_students(precision, n_kv_heads=2, tied=None):
    from q4kdistill.config import ModelConfig
    from q4kdistill.memory.reproduce import tiny_manifest
    from q4kdistill.student.model import Student
    from q4kdistill.student.optim import AdamW
    from q4kdistill.student.spec import parse_student_shape, student_config
    from q4kdistill.teacher.model import Teacher

    teacher = Teacher.load(tiny_manifest(), log=None)
    cfg = student_config(teacher.config, parse_student_shape(
        f"layers=2,d_model=256,heads=4,kv_heads={n_kv_heads},head_dim=64,d_ff=512"))
    assert isinstance(cfg, ModelConfig)
    if tied is not None:
        cfg = cfg.replace(tied_output=tied)
    pair = []
    for _ in range(2):
        s = Student.from_config(cfg, seed=3, precision=precision, chunk_tokens=96)
        pair.append((s, AdamW.for_student(s)))
    return teacher, pair


def _rel(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / (den or 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv_heads, tied", [(2, True), (4, True), (2, False)])
def test_replay_equals_eager_step(n_kv_heads, tied):
    """(untied: the embedding's grad is the gathered rows, RowGrad, which each replay rewrites and the
    graph hands back to the student)"""
    import cupy

    import kernels

    teacher, [(gs, gopt), (es, eopt)] = _teacher_and_students("bf16", n_kv_heads, tied)
    assert (gs.embedding_rows is None) == tied
    loss_cfg = LossConfig()
    graphed = cuda_graph.GraphedStep(teacher, gs, loss_cfg)
    rng = np.random.default_rng(7)
    worst = 0.0
    for step in range(5):
        ids = rng.integers(0, teacher.vocab_size, (3, 80))
        gl, gparts = graphed(cupy.asarray(ids) if step % 2 else ids)     # NumPy and CuPy ids both
        gopt.step()
        if step == 2:
            kernels.release_scratch()        # the eager step below makes a new scratch; the graph keeps its own
        el, _, eparts = es.loss_and_grads(cupy.asarray(ids), teacher.logits_fn(cupy.asarray(ids)), loss_cfg)
        eopt.step()
        junk = cupy.full(1 << 22, cupy.nan, dtype=cupy.float32)           # default-pool bytes between replays
        g, e = gs.grad_buffer.flat.get(), es.grad_buffer.flat.get()
        if not tied:
            g = np.concatenate([gs.embedding_rows.dense().get().ravel(), g])
            e = np.concatenate([es.embedding_rows.dense().get().ravel(), e])
        assert np.isfinite(g).all() and np.isnan(junk[:4].get()).all()
        assert gl == pytest.approx(el, rel=1e-5) and gparts["kd"] == pytest.approx(eparts["kd"], rel=1e-5), step
        worst = max(worst, _rel(g, e), _rel(gs.param_buffer.flat.get(), es.param_buffer.flat.get()))
        del junk
    assert graphed.eager_steps == 1 and graphed.replays == 4
    assert graphed.captured_shapes == [(3, 80)]
    assert worst < 1e-3, worst               # the attention backward's atomics' order only
    graphed.close()
    assert graphed.captured_shapes == []


@pytest.mark.gpu
def test_fp32_student_runs_eagerly_and_says_why():
    """The fp32 student's FP32 attention multiplies 4-D blocks with CuPy's batched matmul, which CuPy
    refuses inside a capture: that shape runs eagerly, with one warning, and computes the same."""
    import cupy

    teacher, [(gs, gopt), (es, eopt)] = _teacher_and_students("fp32")
    loss_cfg = LossConfig()
    said = []
    graphed = cuda_graph.GraphedStep(teacher, gs, loss_cfg, log=said.append)
    rng = np.random.default_rng(1)
    for _ in range(3):
        ids = cupy.asarray(rng.integers(0, teacher.vocab_size, (2, 64)))
        gl, _ = graphed(ids)
        el, _, _ = es.loss_and_grads(ids, teacher.logits_fn(ids), loss_cfg)
        assert gl == pytest.approx(el, rel=1e-6)
        assert _rel(gs.grad_buffer.flat.get(), es.grad_buffer.flat.get()) < 1e-6   # the embedding's scatter-add atomics
    assert graphed.replays == 0 and graphed.eager_steps == 3
    assert len(said) == 1 and "CUDA graph capture of the 2x64 step failed" in said[0] and "cuBLAS" in said[0]


@pytest.mark.gpu
def test_a_read_inside_the_capture_makes_it_eager():
    import cupy

    teacher, [(gs, _), _] = _teacher_and_students("bf16")
    said = []
    graphed = cuda_graph.GraphedStep(teacher, gs, LossConfig(), log=said.append)
    real = gs.queue_loss_and_grads

    def reads_the_device(*args, **kw):   # a read inside the capture: CUDA refuses it
        queued = real(*args, **kw)
        float(queued.kd_sum)
        return queued

    gs.queue_loss_and_grads = reads_the_device
    ids = cupy.asarray(np.random.default_rng(1).integers(0, teacher.vocab_size, (2, 64)))
    losses = [graphed(ids)[0] for _ in range(3)]
    assert graphed.replays == 0 and graphed.eager_steps == 3 and np.isfinite(losses).all()
    assert len(said) == 1 and "step failed" in said[0]


@pytest.mark.gpu
def test_graph_bytes_are_counted_and_given_back():
    import cupy

    from q4kdistill.memory import meter

    teacher, [(gs, _), _] = _teacher_and_students("bf16")
    graphed = cuda_graph.GraphedStep(teacher, gs, LossConfig())
    counter = meter.install()
    ids = cupy.asarray(np.random.default_rng(2).integers(0, teacher.vocab_size, (2, 128)))
    graphed(ids)
    graphed(ids)
    pool = graphed._graphs[(2, 128)].pool
    assert pool.total_bytes() > 0 and any(p is pool for p in counter.private)
    assert counter.current() >= cupy.get_default_memory_pool().used_bytes() + pool.total_bytes()
    graphed.close()
    assert not any(p is pool for p in counter.private)


def test_enabled_needs_a_gpu_and_respects_the_switch(monkeypatch):
    from q4kdistill import backend

    monkeypatch.setattr(backend, "on_gpu", lambda: True)
    monkeypatch.delenv(cuda_graph.ENV, raising=False)
    assert cuda_graph.enabled()
    for off in ("0", "off", "false"):
        monkeypatch.setenv(cuda_graph.ENV, off)
        assert not cuda_graph.enabled()
    monkeypatch.setattr(backend, "on_gpu", lambda: False)
    monkeypatch.delenv(cuda_graph.ENV)
    assert not cuda_graph.enabled()


def test_the_loop_replays_only_where_a_graph_applies():
    """train/loop.one_rank_loss with a stand-in graph: a loss mask, CE only (no teacher) or no graph run
    eagerly; otherwise the graph steps, and a non-finite loss from it runs the step again eagerly (so the
    teacher's per-chunk finite check can name the position)."""
    from types import SimpleNamespace

    from q4kdistill.train import loop

    calls = []

    class Graph:
        def __init__(self, loss):
            self.loss = loss

        def __call__(self, ids, eager=None):
            calls.append("graph")
            return self.loss, {"kd": self.loss, "ce": 0.0}

    student = SimpleNamespace(loss_and_grads=lambda ids, t, cfg, loss_mask=None: calls.append("eager") or (1.0, None, {"kd": 1.0, "ce": 0.0}))
    targets = SimpleNamespace(targets=lambda batch, split: "teacher fn")
    batch = SimpleNamespace(ids=np.zeros((1, 4), np.int64), loss_mask=None)

    def run_with(graph, alpha=0.0, mask=None):
        calls.clear()
        run = SimpleNamespace(graph=graph, loss_cfg=LossConfig(alpha=alpha), targets=targets, student=student)
        loss, _ = loop.one_rank_loss(run, SimpleNamespace(ids=batch.ids, loss_mask=mask))
        return loss, list(calls)

    assert run_with(None) == (1.0, ["eager"])
    assert run_with(Graph(2.0)) == (2.0, ["graph"])
    assert run_with(Graph(2.0), mask=np.ones((1, 4))) == (1.0, ["eager"])
    assert run_with(Graph(2.0), alpha=1.0) == (1.0, ["eager"])
    assert run_with(Graph(float("nan"))) == (1.0, ["graph", "eager"])
    assert loop.DistillConfig().cuda_graph is True       # on by default where it applies


@pytest.mark.gpu
def test_distill_replays_the_step_and_learns_the_same(tmp_path_factory, tmp_path, monkeypatch):
    """The loop (one_rank_loss): 6 steps of the tiny gemma3 teacher with the graph and without it give
    the same losses (bf16 student: the atomics' order only). Evaluation (every 3 steps) gives the graph's
    pool back first, so: step 1 eager, 2 captured and replayed, 3 replayed, evaluation, 4 eager, 5
    captured and replayed, 6 replayed."""
    import json
    import os

    from q4kdistill import cli
    from _helpers_distill import write_corpus, write_teacher

    teacher, corpus = write_teacher(tmp_path_factory), write_corpus(tmp_path_factory)
    replays = []
    real = cuda_graph.GraphedStep._replay
    monkeypatch.setattr(cuda_graph.GraphedStep, "_replay", lambda self, cap, ids: replays.append(1) or real(self, cap, ids))

    def run(out, *extra):
        assert cli.main(["distill", "--teacher", teacher, "--data", corpus, "--out", str(out), "--student-layers", "0,2",
                         "--steps", "6", "--batch", "3", "--seq", "16", "--lr", "3e-3", "--warmup", "2",
                         "--eval-every", "3", "--eval-batches", "2", "--save-every", "100", "--no-progress", *extra]) == 0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    graphed = run(tmp_path / "graph")
    assert len(replays) == 4
    eager = run(tmp_path / "eager", "--no-cuda-graph")
    assert len(replays) == 4 and len(graphed) == len(eager) == 6
    np.testing.assert_allclose(graphed, eager, rtol=1e-4)


@pytest.mark.gpu
def test_teacher_trunk_replays_as_it_runs_eagerly():
    """Teacher.use_cuda_graphs: the third forward of a shape on replays the trunk; the logits equal the
    eager teacher's for fresh ids each time (a graph that baked in its capture's ids fails), eager
    allocations (NaN-filled) land between the replays, a masked batch stays eager, and turning the
    graphs off gives the pool's bytes back."""
    import cupy

    from q4kdistill.memory import meter
    from q4kdistill.memory.reproduce import tiny_manifest
    from q4kdistill.teacher.model import Teacher

    graphed, eager = Teacher.load(tiny_manifest(), log=None), Teacher.load(tiny_manifest(), log=None)
    assert graphed.use_cuda_graphs(True)
    rng = np.random.default_rng(4)
    for _ in range(5):
        ids = cupy.asarray(rng.integers(0, graphed.vocab_size, (2, 96)))
        junk = cupy.full((1 << 20,), np.nan, np.float32)         # the default pool, between replays
        got = [c.get() for _, _, c in graphed.iter_logits(ids, chunk_tokens=64)]
        want = [c.get() for _, _, c in eager.iter_logits(ids, chunk_tokens=64)]
        del junk
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert graphed._trunk_graphs.replays == 4            # eager, capture + replay, 3 replays
    mask = cupy.ones((2, 96), bool)
    mask[0, :5] = False
    a = graphed.logits_for_batch(ids, mask).get()
    b = np.concatenate([c.get() for _, _, c in graphed.iter_logits(ids, mask)])
    np.testing.assert_allclose(a.reshape(b.shape), b, rtol=1e-6, atol=1e-6)
    assert graphed._trunk_graphs.replays == 4
    pools = [c.pool for c in graphed._trunk_graphs._graphs.values() if isinstance(c, cuda_graph._Captured)]
    held = pools[0].total_bytes()                        # what the counter counts of a graph's pool
    assert len(pools) == 1 and held > 0
    counted = meter.install().current()
    graphed.use_cuda_graphs(False)                       # the pool's blocks back, and no longer counted
    assert graphed._trunk_graphs is None and pools[0].total_bytes() == 0
    assert meter.install().current() <= counted - held


def test_teacher_graphs_are_off_on_the_cpu():
    from q4kdistill.memory.reproduce import tiny_manifest
    from q4kdistill.teacher.model import Teacher

    t = Teacher.load(tiny_manifest(), device="cpu", log=None)
    assert not t.use_cuda_graphs(True) and t._trunk_graphs is None
    ids = np.random.default_rng(0).integers(0, t.vocab_size, (1, 9))
    assert next(t.iter_logits(ids))[2].shape == (9, t.vocab_size)
