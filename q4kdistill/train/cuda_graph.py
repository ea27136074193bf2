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
    def __init__(self, graph, ids, queued, pool, stream, keep, rows=None):
        self.graph, self.ids, self.queued, self.pool, self.stream, self.keep = graph, ids, queued, pool, stream, keep
        self.rows = rows               # the student's RowGrad pairs as captured (rewritten by each replay)


class GraphedStep:
    """fn(ids) -> (loss, parts) with the student's grads written, by a CUDA graph per batch shape."""

    def __init__(self, teacher, student, loss_cfg, log=None):
        self.teacher, self.student, self.loss_cfg = teacher, student, loss_cfg
        self.log = log or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._graphs = {}              # (B, T) -> "warm" (ran eagerly once), _Captured, or None (capture failed: eager)
        self.replays = self.eager_steps = 0

    def __call__(self, ids, eager=None):
        """One step on ``ids`` [B, T] (NumPy or CuPy). ``eager``: () -> (loss, parts), the caller's own
        eager step for the calls that do not replay (default: the teacher's logits straight into
        student.loss_and_grads)."""
        shape = tuple(int(n) for n in ids.shape)
        if shape not in self._graphs:
            self._graphs[shape] = "warm"            # the first call of a shape: eager, then capture next time
            return self._eager(ids, eager)
        if self._graphs[shape] == "warm":
            self._graphs[shape] = self._capture(shape)
        cap = self._graphs[shape]
        if cap is None:
            return self._eager(ids, eager)
        return self._replay(cap, ids)

    def close(self) -> None:
        """Drop every graph and give its pool's blocks back."""
        from ..memory import meter

        graphs, self._graphs = self._graphs, {}
        for cap in graphs.values():
            if isinstance(cap, _Captured):
                pool = cap.pool
                cap.graph = cap.queued = cap.ids = cap.keep = None
                meter.drop_private_pool(pool)

    @property
    def captured_shapes(self) -> list:
        return [s for s, c in self._graphs.items() if isinstance(c, _Captured)]

    # -- the three ways a step runs ---------------------------------------------------------------
    def _eager(self, ids, eager):
        self.eager_steps += 1
        if eager is not None:
            return eager()
        loss, _, parts = self.student.loss_and_grads(ids, self.teacher.logits_fn(ids), self.loss_cfg)
        return loss, parts

    def _capture(self, shape):
        import cupy

        from kernels import scratch

        from ..memory import meter

        ids = cupy.zeros(shape, dtype=cupy.int64)           # the static input (default pool: lives with us)
        meter.release_cached()       # the eager step's cached blocks go back before the graph's pool takes its own
        pool, malloc = meter.private_pool()
        stream = cupy.cuda.Stream(non_blocking=True)
        try:
            with cupy.cuda.using_allocator(malloc), stream:
                stream.begin_capture()
                try:
                    queued = self.student.queue_loss_and_grads(ids, self.teacher.logits_fn(ids), self.loss_cfg)
                except BaseException:
                    _end_quietly(stream)
                    raise
                graph = stream.end_capture()
            graph.upload(stream)
            stream.synchronize()
        except Exception as exc:
            meter.drop_private_pool(pool)
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.log(f"CUDA graph capture of the {shape[0]}x{shape[1]} step failed ({type(exc).__name__}: {first}); "
                     "this shape runs eagerly")
            return None
        keep = scratch.scratch_buffers()                    # arrays made before the capture that it writes
        rows = self.student.embedding_rows                  # a sparse embedding grad: the captured pairs
        return _Captured(graph, ids, queued, pool, stream, keep, None if rows is None else rows.state())

    def _replay(self, cap, ids):
        import cupy

        self.teacher.check_ids(ids)                         # the captured embedding does not check them
        current = cupy.cuda.get_current_stream()
        cap.ids[...] = cupy.asarray(ids)
        cap.stream.wait_event(current.record())             # after the ids and the last optimizer step
        cap.graph.launch(cap.stream)
        current.wait_event(cap.stream.record())             # what follows (AdamW) after the grads
        if cap.rows is not None:                            # (an eager step since may have set others)
            self.student.embedding_rows.restore(cap.rows)
        self.replays += 1
        return cap.queued.read()


def _end_quietly(stream) -> None:
    try:
        stream.end_capture()
    except Exception:
        pass
