"""`q4kdistill bench step`: the whole distillation step, ours beside the PyTorch peer, same run, same GPU.

    ours   teacher.logits_fn (quantized teacher trunk; its LM head runs chunk by chunk inside the
           loss) -> Student.loss_and_grads (chunked KD loss, hand-written backward) -> AdamW.step;
           on a GPU the part before AdamW is replayed as a CUDA graph, as distill does (the first
           warm-up step eager, the second captured; ``cuda_graph=False``: every step eager)
    peer   peer_torch.Peer.step: a bf16 transformers teacher, an autocast-bf16 student with fp32
           master weights, full-vocabulary forward KL, clip 1.0, fused AdamW (when torch imports)

For each student -- (a) a fresh student of ``student_shape`` with the teacher's vocabulary, (b)
``cut_layers`` blocks cut from the teacher -- and each shape B x T: tokens/s (median of CUDA-event
timings of ``repeats`` steps after ``warmup`` steps, the ids rotating over a few random batches),
the peak of GPU bytes in use over those steps (ours: q4kdistill.memory.meter's counter; the peer:
torch.cuda.max_memory_allocated; both include the resident teacher, the student and its optimizer
state), and ours / peer ratios; beside our measured step peak, the planner's prediction of it
(``planned_bytes``; memory/planner.py at that student and shape). Also the teacher forward alone
(every position's logits): tokens/s and resident bytes. Out of memory is a row's result ("OOM"),
never the end of the run.

``tiny=True`` runs on the CPU: a tiny synthetic qwen2 teacher, tiny students, perf_counter timings
(the peer on torch's CPU when it imports), no peak bytes.
"""
from __future__ import annotations

import datetime
import os
import statistics
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import Q4KError
from .clock import Clock

SHAPES = ((8, 512), (2, 4096), (1, 8192))
TINY_SHAPES = ((2, 32),)
ROTATE = 3                     # distinct id batches the timed steps cycle through


@dataclass
class StepBench:
    teacher: object = None                     # path / manifest dict; None: the 7B manifest (tiny: a tiny one)
    shapes: tuple = SHAPES
    student_shape: str = "qwen2-0.5b"          # student (a); spec.parse_student_shape
    cut_layers: int = 2                        # student (b): this many teacher blocks, spread out
    precision: str = "auto"                    # our student's (bf16 on a GPU)
    chunk_tokens: int = 256                    # distill's default
    checkpoint: bool = False                   # distill's default
    cuda_graph: bool = True                    # distill's default: our step replayed as a CUDA graph (GPU)
    warmup: int = 2
    repeats: int = 5
    peer: bool = True
    tiny: bool = False
    rows: list = field(default_factory=list)


def parse_shapes(items, flag="--shapes") -> list:
    """['8x512', '1x16384'] -> [(8, 512), (1, 16384)]; errors name ``flag``."""
    out = []
    for item in items or []:
        try:
            b, t = (int(n) for n in item.lower().split("x"))
        except ValueError:
            raise Q4KError(f"{flag}: expected BxT like 8x512, got {item!r}") from None
        if b < 1 or t < 2:
            raise Q4KError(f"{flag} {item}: need B >= 1 and T >= 2")
        out.append((b, t))
    return out


# -- our side -----------------------------------------------------------------------------------

def _is_oom(exc) -> bool:
    from ..train.loop import is_out_of_memory

    return is_out_of_memory(exc) or "OUT_OF_MEMORY" in str(exc)


def _timed(run_once, batches, warmup, repeats, mark, seconds):
    """Median seconds of ``repeats`` calls after ``warmup``, the inputs rotating."""
    for i in range(warmup):
        run_once(batches[i % len(batches)])
    times = []
    for i in range(repeats):
        a = mark()
        run_once(batches[i % len(batches)])
        times.append(seconds(a, mark()))
    return statistics.median(times)


def graph_warmup(warmup: int, graphed: bool) -> int:
    """Warm-up calls before timing: with CUDA graphs at least 2 (the first call runs eager, the second captures),
    so that no timed call captures (a capture among two timed calls made a teacher forward read 27 % slow:
    docs/perf.md, sixteenth stop)."""
    return max(warmup, 2) if graphed else warmup


def _row(kind, student, shape, side, seconds=None, peak=None, note="", **extra) -> dict:
    B, T = shape
    status = "ok" if seconds is not None else ("OOM" if note.startswith("OOM") else "skipped" if note else "error")
    return dict(kind=kind, student=student, shape=f"{B}x{T}", side=side, status=status,
                seconds=seconds, tokens_per_s=None if seconds is None else B * T / seconds,
                peak_bytes=peak, note=note, **extra)


class Ours:
    def __init__(self, bench: StepBench, source, log):
        from .. import backend
        from ..memory import meter as memory
        from ..teacher.model import Teacher

        memory.install()
        self.bench, self.log = bench, log
        self.meter = memory.MemoryMeter()
        self.teacher = Teacher.load(source, log=None)
        self.xp = self.teacher.xp
        self.clock = Clock(self.xp)
        self.on_gpu = backend.on_gpu()

    def release(self):
        from ..memory import meter as memory

        import kernels

        kernels.release_scratch()
        memory.release_cached()

    def students(self):
        """(label, ModelConfig-or-layers builder) for students (a) and (b)."""
        from ..student.spec import parse_student_shape, student_config
        from ..train.loop import spread_layers

        cfg = self.teacher.config
        fresh = student_config(cfg, parse_student_shape(self.bench.student_shape))
        layers = spread_layers(cfg.n_layers, self.bench.cut_layers)
        return [(f"fresh {self.bench.student_shape}", fresh, None),
                (f"cut blocks {','.join(map(str, layers))}", cfg.replace(n_layers=len(layers)), layers)]

    def make_student(self, config, layers):
        from .. import backend
        from ..student.model import Student
        from ..student.optim import AdamW
        from ..student.precision import resolve

        kw = dict(checkpoint=self.bench.checkpoint, chunk_tokens=self.bench.chunk_tokens,
                  precision=resolve(self.bench.precision, backend.on_gpu()))
        student = (Student.from_config(config, seed=0, **kw) if layers is None
                   else Student.from_teacher(self.teacher, layers, **kw))
        return student, AdamW.for_student(student)

    def step_row(self, label, student, opt, shape, batches) -> dict:
        from ..student.losses import LossConfig

        from ..train import cuda_graph

        loss_cfg = LossConfig()
        graphed = (cuda_graph.GraphedStep(self.teacher, student, loss_cfg, log=self.log)
                   if self.bench.cuda_graph and cuda_graph.enabled() else None)

        def once(ids):
            if graphed is not None:                  # first call eager, second captured, then replays
                graphed(ids)
            else:
                student.loss_and_grads(ids, self.teacher.logits_fn(ids), loss_cfg)
            opt.step()

        try:
            with self.meter.phase(f"step {label} {shape}") as rec:
                seconds = _timed(once, batches, graph_warmup(self.bench.warmup, graphed is not None), self.bench.repeats,
                                 self.clock.mark, self.clock.seconds)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if graphed is not None:
                graphed.close()
            self.release()
            return _row("step", label, shape, "ours", note=f"OOM ({type(exc).__name__})")
        replayed = graphed is not None and graphed.replays >= self.bench.repeats
        if graphed is not None:
            graphed.close()
        peak = rec.peak_bytes if self.on_gpu else None
        return _row("step", label, shape, "ours", seconds, peak, n_params=student.n_params, precision=student.prec.name,
                    cuda_graph=replayed)

    def forward_row(self, shape, batches) -> dict:
        def once(ids):
            for _ in self.teacher.iter_logits(ids):
                pass

        graphed = bool(self.bench.cuda_graph and self.teacher.use_cuda_graphs(True, log=self.log))   # the trunk, replayed
        try:
            seconds = _timed(once, batches, graph_warmup(self.bench.warmup, graphed), self.bench.repeats,
                             self.clock.mark, self.clock.seconds)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            self.release()
            return _row("teacher forward", "-", shape, "ours", note=f"OOM ({type(exc).__name__})")
        finally:
            replays = self.teacher.trunk_replays
            self.teacher.use_cuda_graphs(False)
        return _row("teacher forward", "-", shape, "ours", seconds, resident_bytes=self.teacher.resident_bytes,
                    cuda_graph=replays >= self.bench.repeats)


# -- the run --------------------------------------------------------------------------------------

def _batches(vocab, shape, xp=None, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, shape) for _ in range(ROTATE)]
    return [xp.asarray(i) for i in ids] if xp is not None else ids


def run(bench: StepBench, log=print) -> dict:
    """Time ours, then the peer (ours' GPU memory handed back first) -> report dict (see format_table)."""
    from .. import backend
    from ..formats.model_file import ModelFile

    source = bench.teacher
    if source is None:
        if bench.tiny:
            from ..memory.reproduce import tiny_manifest

            source = tiny_manifest()
        else:
            from ..data import MANIFEST_7B

            source = MANIFEST_7B
    model = ModelFile.open(source)
    ours = Ours(bench, model, log)
    tcfg = ours.teacher.config
    students = ours.students()
    rows = []
    log(f"bench step on {backend.gpu_name()}: teacher {model.path} ({tcfg.architecture}, {tcfg.n_layers} blocks)")
    environment = {k: v for k, v in sorted(os.environ.items()) if k.startswith("Q4KDISTILL_")}
    if environment:
        log("settings from the environment: " + " ".join(f"{k}={v}" for k, v in environment.items()))
    for shape in bench.shapes:
        rows.append(ours.forward_row(shape, _batches(tcfg.vocab_size, shape, ours.xp)))
        log(_line(rows[-1]))
    for label, config, layers in students:
        student, opt = ours.make_student(config, layers)
        for shape in bench.shapes:
            ours.teacher.span_tokens = _span(bench, model, shape, layers, student) if ours.on_gpu else None
            rows.append(ours.step_row(label, student, opt, shape, _batches(tcfg.vocab_size, shape, ours.xp)))
            rows[-1]["planned_bytes"] = _planned(bench, model, shape, layers, student, ours.teacher.span_tokens)
            rows[-1]["head_span"] = ours.teacher.span_tokens
            log(_line(rows[-1]))
        ours.teacher.span_tokens = None
        del student, opt
        ours.release()
    teacher_resident = ours.teacher.resident_bytes
    del ours
    _release_ours()
    rows += _peer_rows(bench, tcfg, students, log)
    return {"device": backend.gpu_name(), "date": datetime.date.today().isoformat(),
            "teacher": {"source": model.path, "architecture": tcfg.architecture, "n_layers": tcfg.n_layers,
                        "resident_bytes": teacher_resident},
            "settings": {k: v for k, v in asdict(bench).items() if k not in ("rows", "teacher")},
            "environment": environment,
            "rows": rows, "ratios": ratios(rows)}


def _plan_args(bench, shape, layers, student) -> tuple:
    from ..student.spec import parse_student_shape

    spec = parse_student_shape(bench.student_shape) if layers is None else layers
    return (shape[0], shape[1], spec), dict(checkpoint=bench.checkpoint, chunk_tokens=bench.chunk_tokens,
                                            precision=student.prec.name,
                                            sparse_embedding_grad=student.embedding_rows is not None)


def _span(bench, model, shape, layers, student) -> int:
    """The teacher-logit span distill would take for this student and shape (planner.step_head_span)."""
    from ..memory import planner

    args, kw = _plan_args(bench, shape, layers, student)
    return planner.step_head_span(model, *args, **kw)


def _planned(bench, model, shape, layers, student, span_tokens=None) -> int:
    """The planner's step peak for this student and shape (memory/planner.py), to print beside the
    measured one: the fresh student's --student-shape, or the cut one's teacher blocks."""
    from ..memory import planner

    args, kw = _plan_args(bench, shape, layers, student)
    plan = planner.make_plan(model, *args, head_span_tokens=span_tokens, **kw)
    return plan.row("distill step peak").predicted_bytes


def _release_ours():
    import gc

    import kernels

    from ..memory import meter as memory

    gc.collect()
    kernels.release_scratch()
    memory.release_cached()


def _peer_rows(bench, tcfg, students, log) -> list:
    from . import peer_torch

    why = None if bench.peer else "--no-peer"
    why = why or peer_torch.unavailable() or peer_torch.unsupported(tcfg)
    if why:
        log(f"peer: skipped ({why})")
        return [_row(kind, label, shape, "peer", note=why) for shape in bench.shapes
                for kind, label in [("teacher forward", "-")] + [("step", s[0]) for s in students]]
    rows = []
    peer = peer_torch.Peer(tcfg)
    resident = peer.resident_bytes(peer.teacher)
    for shape in bench.shapes:
        rows.append(_peer_timed(peer, bench, "teacher forward", "-", shape, tcfg.vocab_size,
                                peer.teacher_forward, resident_bytes=resident))
        log(_line(rows[-1]))
    for label, config, _layers in students:
        why = peer_torch.unsupported(config)
        if why:
            rows += [_row("step", label, shape, "peer", note=why) for shape in bench.shapes]
            continue
        peer.set_student(config)
        for shape in bench.shapes:
            rows.append(_peer_timed(peer, bench, "step", label, shape, tcfg.vocab_size, peer.step))
            log(_line(rows[-1]))
        peer.release()
    return rows


def _peer_timed(peer, bench, kind, label, shape, vocab, fn, **extra) -> dict:
    batches = [peer.ids(i) for i in _batches(vocab, shape)]
    try:
        peer.reset_peak()
        seconds = _timed(fn, batches, bench.warmup, bench.repeats, peer.mark, peer.seconds)
    except Exception as exc:
        if not peer.is_out_of_memory(exc):
            raise
        peer.torch.cuda.empty_cache()
        return _row(kind, label, shape, "peer", note=f"OOM ({type(exc).__name__})")
    return _row(kind, label, shape, "peer", seconds, peer.peak_bytes(), **extra)


# -- output ---------------------------------------------------------------------------------------

def ratios(rows) -> list:
    """ours / peer for every (kind, student, shape) both sides measured: speed (tokens/s) and peak bytes."""
    by = {(r["kind"], r["student"], r["shape"], r["side"]): r for r in rows}
    out = []
    for (kind, student, shape, side), r in by.items():
        p = by.get((kind, student, shape, "peer"))
        if side != "ours" or p is None or r["status"] != "ok" or p["status"] != "ok":
            continue
        out.append(dict(kind=kind, student=student, shape=shape, speed=r["tokens_per_s"] / p["tokens_per_s"],
                        memory=r["peak_bytes"] / p["peak_bytes"] if r["peak_bytes"] and p["peak_bytes"] else None,
                        resident=(r["resident_bytes"] / p["resident_bytes"] if r.get("resident_bytes") and p.get("resident_bytes")
                                  else None)))
    return out


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _line(r) -> str:
    what = f"{r['side']:<4} {r['kind']:<15} {r['student']:<24} {r['shape']:>8}"
    if r["status"] != "ok":
        return f"{what}  {r['status'].upper()}  {r['note']}"
    mem = f"resident {_gb(r['resident_bytes'])}" if r.get("resident_bytes") else f"peak {_gb(r['peak_bytes'])}"
    return f"{what}  {r['tokens_per_s']:>10,.0f} tok/s  {r['seconds'] * 1e3:8.1f} ms  {mem}"


def format_table(report) -> str:
    """One line per (kind, student, shape): ours and the peer side by side, then the ratios."""
    rows = report["rows"]
    keys = list(dict.fromkeys((r["kind"], r["student"], r["shape"]) for r in rows))
    by = {(r["kind"], r["student"], r["shape"], r["side"]): r for r in rows}
    rat = {(x["kind"], x["student"], x["shape"]): x for x in report["ratios"]}

    def side(r):
        if r is None:
            return f"{'-':>12} {'-':>10}"
        if r["status"] != "ok":
            return f"{r['status'].upper():>12} {'':>10}"
        mem = r.get("resident_bytes") or r["peak_bytes"]
        return f"{r['tokens_per_s']:>12,.0f} {_gb(mem):>10}"

    head = (f"{'':<15} {'student':<24} {'shape':>8} {'ours tok/s':>12} {'ours mem':>10} "
            f"{'peer tok/s':>12} {'peer mem':>10} {'speed':>7} {'memory':>7}")
    lines = [f"device {report['device']}, {report['date']}; teacher {report['teacher']['source']}; memory: peak bytes "
             "in use over the timed steps (teacher forward: resident bytes)", head, "-" * len(head)]
    for kind, student, shape in keys:
        x = rat.get((kind, student, shape))
        mem_ratio = None if x is None else (x["resident"] if kind == "teacher forward" else x["memory"])
        lines.append(f"{kind:<15} {student:<24} {shape:>8} {side(by.get((kind, student, shape, 'ours')))} "
                     f"{side(by.get((kind, student, shape, 'peer')))} "
                     f"{'-' if x is None else format(x['speed'], '.2f') + 'x':>7} "
                     f"{'-' if mem_ratio is None else format(mem_ratio, '.2f') + 'x':>7}")
    notes = sorted({r["note"] for r in rows if r["status"] == "skipped"})
    graphed = [r for r in rows if r["side"] == "ours" and r["kind"] == "step" and r["status"] == "ok"]
    if graphed:
        how = {bool(r.get("cuda_graph")) for r in graphed}
        notes.append("our steps replayed as a CUDA graph after two warm-up steps (as distill does)" if how == {True}
                     else "our steps ran eagerly (no CUDA graph)" if how == {False}
                     else "some of our steps replayed a CUDA graph, some ran eagerly (see cuda_graph in --json)")
    forwards = [r for r in rows if r["side"] == "ours" and r["kind"] == "teacher forward" and r["status"] == "ok"]
    if forwards:
        how = {bool(r.get("cuda_graph")) for r in forwards}
        notes.append("our teacher forward's trunk replayed as a CUDA graph (Teacher.use_cuda_graphs), its LM head "
                     "chunks eager" if how == {True} else "our teacher forward ran eagerly" if how == {False}
                     else "our teacher forward replayed a CUDA graph in some rows (see cuda_graph in --json)")
    spans = [r for r in rows if r.get("head_span")]
    if spans:
        notes.append("the teacher's logits reach our loss in float16 spans of " + ", ".join(
            f"{r['head_span']} tokens ({r['student']} {r['shape']})" for r in spans) + " (memory.planner.step_head_span)")
    lines += [f"note: {n}" for n in notes]
    planned = [r for r in rows if r.get("planned_bytes") and r["status"] == "ok" and r["peak_bytes"]]
    if planned:
        lines.append("planner (memory/planner.py) against our measured step peaks: " + "; ".join(
            f"{r['student']} {r['shape']} {_gb(r['planned_bytes'])} / {_gb(r['peak_bytes'])} "
            f"({r['planned_bytes'] / r['peak_bytes']:.3f})" for r in planned))
    return "\n".join(lines)
