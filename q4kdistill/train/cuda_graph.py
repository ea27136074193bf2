"""The distillation step's GPU work captured once as a CUDA graph and replayed (CuPy stream capture).

Why: at 8 x 512 tokens the host needed ~210 ms to issue one step -- ~1,100 kernel launches, ~600
cuBLAS calls, ~2,500 pool allocations -- about as long as the GPU needed to run it (docs/perf.md,
sixth stop). A replay is one launch, so the GPU runs the step back to back.

    step = GraphedStep(teacher, student, loss_cfg)
    loss, parts = step(ids)      # the teacher's trunk, the student's forward, the chunked KD loss and
    opt.step()                   # the backward: grads written; AdamW stays eager (it reads the grad norm)

What the graph holds: ``teacher.logits_fn(ids)`` -> ``student.queue_loss_and_grads(ids, fn, loss_cfg)``
on a static ids buffer of the batch's shape. Outside it: the ids check and copy (before), reading the
loss sums (after), and the optimizer.

The first call for a shape runs eagerly (Numba compiles, the dispatch tables choose, the decode scratch
reaches its size); the second captures, then replays; later calls replay. A capture records pointers,
so every array the captured work allocates comes from a pool of its own that nothing else draws from
(memory.meter.private_pool): no later array is handed an address the graph writes. Its bytes are the
eager step's temporaries, held for the graph's life and counted by the memory meter. Arrays made before
the capture (teacher weights, params, grads, the bf16 copy, the decode scratch) are used in place and
kept referenced here, so a ``kernels.release_scratch()`` cannot free memory the graph still writes;
whatever writes params or AdamW moments must write them in place (checkpoint loads do).

The replay runs the eager step's kernels in the same order (tests/test_cuda_graph.py: losses, grads
and params against an interleaved eager student, within what two eager runs differ by -- the order of
the attention's and the embedding's atomic adds). If the capture fails the shape runs eagerly (one
warning). The caller decides where a graph applies (train/loop.py: setup and
one_rank_loss): a GPU, no padding or loss mask (their token counts are read from the device), a live
teacher (not a cache), one rank. ``Q4KDISTILL_CUDA_GRAPH=0`` turns it off everywhere.

GraphedTrunk does the same for the teacher's trunk alone, for loops that only run the teacher
(Teacher.use_cuda_graphs: bench step's teacher-forward row, cache-teacher): ~28 x 15 launches of a
7B forward become one.
"""
from __future__ import annotations

import os
import warnings

ENV = "Q4KDISTILL_CUDA_GRAPH"


def enabled() -> bool:
    """Graphs allowed in this process: a GPU, and not turned off by Q4KDISTILL_CUDA_GRAPH=0."""
    from .. import backend

    return backend.on_gpu() and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _Captured:
    def __init__(self, graph, ids, result, pool, stream, keep):
        self.graph, self.ids, self.result, self.pool, self.stream, self.keep = graph, ids, result, pool, stream, keep
        self.rows = None               # the student's RowGrad pairs as captured (rewritten by each replay)


class _PerShape:
    """A graph per [B, T] shape: the first call of a shape runs eagerly, the second captures
    (self._capture(shape) -> _Captured, or None when the capture failed: eager from then on), later
    calls replay."""

    def __init__(self, log=None):
        self.log = log or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._graphs = {}              # (B, T) -> "warm" (ran eagerly once), _Captured, or None (capture failed: eager)
        self.replays = 0

    def _graph_for(self, ids):
        """The _Captured to replay for ``ids``' shape, or None: run this call eagerly."""
        shape = tuple(int(n) for n in ids.shape)
        if shape not in self._graphs:
            self._graphs[shape] = "warm"            # the first call of a shape: eager, then capture next time
            return None
        if self._graphs[shape] == "warm":
            self._graphs[shape] = self._capture(shape)
        return self._graphs[shape]

    def close(self) -> None:
        """Drop every graph and give its pool's blocks back."""
        graphs, self._graphs = self._graphs, {}
        from ..memory import meter

        for cap in graphs.values():
            if isinstance(cap, _Captured):
                pool = cap.pool
                cap.graph = cap.result = cap.ids = cap.keep = None
                meter.drop_private_pool(pool)

    @property
    def captured_shapes(self) -> list:
        return [s for s, c in self._graphs.items() if isinstance(c, _Captured)]


class GraphedStep(_PerShape):
    """fn(ids) -> (loss, parts) with the student's grads written, by a CUDA graph per batch shape."""

    def __init__(self, teacher, student, loss_cfg, log=None):
        super().__init__(log)
        self.teacher, self.student, self.loss_cfg = teacher, student, loss_cfg
        self.eager_steps = 0

    def __call__(self, ids, eager=None):
        """One step on ``ids`` [B, T] (NumPy or CuPy). ``eager``: () -> (loss, parts), the caller's own
        eager step for the calls that do not replay (default: the teacher's logits straight into
        student.loss_and_grads)."""
        cap = self._graph_for(ids)
        return self._eager(ids, eager) if cap is None else self._replay(cap, ids)

    # -- the three ways a step runs ---------------------------------------------------------------
    def _eager(self, ids, eager):
        self.eager_steps += 1
        if eager is not None:
            return eager()
        loss, _, parts = self.student.loss_and_grads(ids, self.teacher.logits_fn(ids), self.loss_cfg)
        return loss, parts

    def _capture(self, shape):
        cap = capture(shape, lambda ids: self.student.queue_loss_and_grads(ids, self.teacher.logits_fn(ids), self.loss_cfg),
                      self.log, "step")
        rows = self.student.embedding_rows                  # a sparse embedding grad: the captured pairs
        if cap is not None and rows is not None:
            cap.rows = rows.state()
        return cap

    def _replay(self, cap, ids):
        self.teacher.check_ids(ids)                         # the captured embedding does not check them
        replay(cap, ids)
        if cap.rows is not None:                            # (an eager step since may have set others)
            self.student.embedding_rows.restore(cap.rows)
        self.replays += 1
        return cap.result.read()


class GraphedTrunk(_PerShape):
    """The teacher's trunk (embedding .. final norm, Teacher.hidden_states) as a CUDA graph per [B, T]
    shape, for teacher-only loops (Teacher.use_cuda_graphs): the first call of a shape runs eagerly,
    the second captures, later calls replay. The hidden states a replay returns are the graph's own
    output array, rewritten by the next call of the same shape: use them (the LM head's chunks)
    before the next forward. No attention mask (the caller runs those eagerly)."""

    def __init__(self, teacher, log=None):
        super().__init__(log)
        self.teacher = teacher

    def __call__(self, ids):
        """ids: [B, T] checked by the caller (Teacher._inputs) -> float32 [B, T, D]."""
        cap = self._graph_for(ids)
        if cap is None:
            return self.teacher._trunk(ids)
        replay(cap, ids)
        self.replays += 1
        return cap.result

    def _capture(self, shape):
        return capture(shape, self.teacher._trunk, self.log, "teacher forward")


def capture(shape, fn, log, what):
    """fn(ids) on a static int64 ids array of ``shape``, captured on a stream of its own with every
    allocation from a private pool -> _Captured (fn's result; the decode scratch it writes kept
    referenced), or None (logged) when the capture fails."""
    import cupy

    from kernels import scratch

    from ..memory import meter

    ids = cupy.zeros(shape, dtype=cupy.int64)           # the static input (default pool: lives with the graph)
    meter.release_cached()       # the eager run's cached blocks go back before the graph's pool takes its own
    pool, malloc = meter.private_pool()
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with cupy.cuda.using_allocator(malloc), stream:
            stream.begin_capture()
            try:
                result = fn(ids)
            except BaseException:
                _end_quietly(stream)
                raise
            graph = stream.end_capture()
        graph.upload(stream)
        stream.synchronize()
    except Exception as exc:
        meter.drop_private_pool(pool)
        first = str(exc).splitlines()[0] if str(exc) else ""
        log(f"CUDA graph capture of the {shape[0]}x{shape[1]} {what} failed ({type(exc).__name__}: {first}); "
            "this shape runs eagerly")
        return None
    return _Captured(graph, ids, result, pool, stream, scratch.scratch_buffers())   # arrays made before it that it writes


def replay(cap, ids) -> None:
    """Copy ``ids`` into the graph's input and launch it, ordered after the current stream's work and
    before what the current stream queues next."""
    import cupy

    current = cupy.cuda.get_current_stream()
    cap.ids[...] = cupy.asarray(ids)
    cap.stream.wait_event(current.record())
    cap.graph.launch(cap.stream)
    current.wait_event(cap.stream.record())


def _end_quietly(stream) -> None:
    try:
        stream.end_capture()
    except Exception:
        pass
