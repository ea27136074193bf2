"""The memory experiment behind `q4kdistill reproduce-memory`: measure, next to the planner.

Runs, in order, each in its own try (an out-of-memory error becomes that row's result):

  1. native teacher: load, forward at B x T (iter_logits), then a distillation step at
     STEP_B x T with a student (teacher logits_fn -> student loss_and_grads -> AdamW step; twice),
     and with ``long_step`` (``--long-step 1x8192``) the same at that shape (rows "... (1x8192)")
  2. dequant-f32 teacher: load, forward     (skipped when the planner says the card is too small)
  3. dequant-bf16 teacher: load, forward

Every byte is counted by q4kdistill.memory.meter (CuPy pool + Numba through it); measured numbers
are bytes in use above what was in use before the teacher was loaded. On the CPU (``tiny_manifest()``)
the same code runs on NumPy and the meter counts host bytes with tracemalloc: it exercises the code,
it does not measure a GPU.

Python: ``reproduce(...) -> report dict`` (used by notebooks/03_memory_budget.ipynb),
``check_claims``, ``format_report``, ``plot(report, path)``.
"""
from __future__ import annotations

DEFAULTS = dict(batch=1, seq=512, step_batch=8, student="params=0.5e9")
TINY = dict(batch=1, seq=32, step_batch=2, student="d_model=64,n_layers=2,d_ff=128,n_heads=4,n_kv_heads=2")
WITHIN = 0.10                       # every prediction within 10 % of its measurement
CLAIMS_7B = (("teacher forward peak (native)", 1, 5.5e9, "teacher forward peak at 1x512 <= 5.5 GB"),
             ("distill step peak", 8, 16e9, "distillation step at 8x512 with a ~0.5B student <= 16 GB"))


def within(predicted: int, measured: int) -> bool:
    """The prediction is within WITHIN of the measurement; a row measured at 0 bytes (no decode
    scratch at a size the GEMVs take) holds only if 0 was predicted."""
    if measured == 0:
        return predicted == 0
    return abs(predicted / measured - 1) <= WITHIN


def tiny_manifest() -> dict:
    """A 2-block qwen2 teacher small enough for the CPU: Q4_K matrices, a Q6_K head, F32 vectors."""
    from gguf import GGMLQuantizationType as QT

    from ..formats import manifest
    from ..config import ModelConfig

    cfg = ModelConfig("qwen2", n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512,
                      vocab_size=1024, qkv_bias=True, tied_output=False)
    meta = {"general.architecture": "qwen2", "qwen2.block_count": cfg.n_layers, "qwen2.embedding_length": cfg.d_model,
            "qwen2.feed_forward_length": cfg.d_ff, "qwen2.attention.head_count": cfg.n_heads,
            "qwen2.attention.head_count_kv": cfg.n_kv_heads, "qwen2.context_length": 2048,
            "tokenizer.ggml.tokens": {"array_len": cfg.vocab_size}}
    qtype = {2: QT.Q4_K, 1: QT.F32}
    tensors = [manifest.tensor_info("<tiny>", name, QT.Q6_K if name == "output.weight" else qtype[len(shape)],
                                    shape[::-1]) for name, shape in cfg.tensor_shapes().items()]
    return manifest.to_dict(meta, tensors, "tiny synthetic qwen2 teacher (reproduce-memory --tiny)")


# -- the experiment -------------------------------------------------------------------------------

def reproduce(source, batch=1, seq=512, step_batch=8, student="params=0.5e9", chunk_tokens=None,
              checkpoint=True, backends=("native", "dequant-f32", "dequant-bf16"), log=print, precision="fp32",
              long_step=None) -> dict:
    """Measure, compare with the planner, check the claims -> report dict (see format_report).
    precision: the student's (auto: bf16 on a GPU, fp32 on the CPU). long_step (B, T), e.g. (1, 8192):
    also a step at that shape with the native teacher, its rows named "... (BxT)"."""
    import datetime

    from .. import backend
    from ..student.precision import resolve

    precision = resolve(precision, backend.on_gpu())

    from ..memory import planner
    from ..train.loop import DistillConfig

    exp = _Experiment(source, log)
    fwd_plan = planner.make_plan(exp.model, batch, seq, student, chunk_tokens=chunk_tokens, checkpoint=checkpoint,
                                 precision=precision)
    step_plan = planner.make_plan(exp.model, step_batch, seq, student, checkpoint=checkpoint,
                                  chunk_tokens=chunk_tokens or DistillConfig.chunk_tokens, precision=precision)
    long_plan = None if long_step is None else planner.make_plan(
        exp.model, long_step[0], long_step[1], student, checkpoint=checkpoint,
        chunk_tokens=chunk_tokens or DistillConfig.chunk_tokens, precision=precision)
    log(f"reproduce-memory on {backend.gpu_name()} ({exp.meter.counter.name}): teacher {exp.model.path}, "
        f"student {step_plan.student['n_params']:,} params")
    for b in backends:
        exp.section(b, fwd_plan, [p for p in (step_plan, long_plan) if p is not None] if b == "native" else [])
    report = {"device": backend.gpu_name(), "counter": exp.meter.counter.name,
              "date": datetime.date.today().isoformat(), "teacher": fwd_plan.teacher,
              "student": step_plan.student, "batch": batch, "seq": seq, "step_batch": step_batch,
              "chunk_tokens": step_plan.chunk_tokens, "checkpoint": checkpoint,
              "rows": exp.compare(fwd_plan, step_plan, long_plan), "phases": [r.to_dict() for r in exp.meter.records],
              "plans": {"forward": fwd_plan.to_json(), "step": step_plan.to_json()}}
    if long_plan is not None:
        report["long_step"] = f"{long_plan.batch}x{long_plan.seq}"
        report["plans"]["long step"] = long_plan.to_json()
    report["claims"] = check_claims(report, exp.model)
    return report


class _Experiment:
    """The meter, the teacher file, and what was measured (row name -> bytes above the baseline)."""

    STEP_PHASES = {"teacher trunk": "distill: teacher trunk peak",
                   "student forward/backward": "distill: student forward/backward peak",
                   "optimizer step": "distill: optimizer step peak", "distill step": "distill step peak"}

    def __init__(self, source, log):
        from ..memory import meter as memory
        from ..formats.model_file import ModelFile

        memory.install()
        self.meter = memory.MemoryMeter()
        self.model = source if isinstance(source, ModelFile) else ModelFile.open(source)   # a truncated file fails here
        self.log = log
        self.measured = {}
        self.outcome = {}               # backend -> {"status": "skipped" | "oom" | "error", "note": ...}

    def section(self, b, fwd_plan, step_plans) -> None:
        """One teacher backend (and the steps, for native); an out-of-memory error or a failure
        becomes the outcome of the rows not measured yet."""
        import traceback

        import kernels

        from ..memory import meter as memory

        try:
            self.teacher(b, fwd_plan, step_plans)
        except Exception as exc:        # OOM from CuPy (MemoryError) or Numba (CudaAPIError), or a bug
            status = "oom" if _is_out_of_memory(exc) else "error"
            note = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            self.outcome[b] = {"status": status, "note": note}
            self.log(f"  {b}: {status.upper()}: {note}")
            if status == "error":
                traceback.print_exc()
        finally:
            kernels.release_scratch()       # the decode scratch outlives the teacher otherwise
            memory.release_cached()

    def teacher(self, b, fwd_plan, step_plans) -> None:
        from ..memory import meter as memory
        from ..teacher.model import Teacher

        need = fwd_plan.row(f"teacher load peak ({b})").predicted_bytes
        need = max(need, fwd_plan.row(f"teacher forward peak ({b})").predicted_bytes)
        free = memory.driver_info()
        if free is not None and need > 0.95 * free[0]:
            self.outcome[b] = {"status": "skipped", "note": f"needs {need / 1e9:.1f} GB, {free[0] / 1e9:.1f} GB free"}
            self.log(f"  {b}: skipped ({self.outcome[b]['note']})")
            return
        ids = _random_ids(self.model.config.vocab_size, fwd_plan.batch, fwd_plan.seq)
        memory.release_cached()         # garbage an earlier caller left is not in the baseline (a phase collects it)
        base = self.meter.current_bytes()
        with self.meter.phase(f"load ({b})") as load:
            teacher = Teacher.load(self.model, backend=b, log=None)
        self.measured[f"teacher resident ({b})"] = load.end_bytes - base
        self.measured[f"teacher load peak ({b})"] = load.peak_bytes - base
        with self.meter.phase(f"forward ({b}, {fwd_plan.batch}x{fwd_plan.seq})") as fwd:
            _consume(teacher.iter_logits(ids, chunk_tokens=fwd_plan.teacher_chunk_tokens))
        self.measured[f"teacher forward peak ({b})"] = fwd.peak_bytes - base
        if b == "native":
            self.measured["teacher decode scratch (native)"] = fwd.end_bytes - load.end_bytes
        self.log(f"  {b}: resident {(load.end_bytes - base) / 1e9:.3f} GB, forward peak {(fwd.peak_bytes - base) / 1e9:.3f} GB")
        for i, plan in enumerate(step_plans):
            self.step(teacher, plan, base, suffix=f" ({plan.batch}x{plan.seq})" if i else "")

    def step(self, teacher, plan, base, suffix="") -> None:
        """Two distillation steps as distill.py runs them; each phase keeps its larger peak. ``suffix``
        names another shape's rows ("distill step peak (1x8192)")."""
        import gc

        from ..memory import meter as memory

        from ..config import ModelConfig
        from ..student.losses import LossConfig
        from ..student.optim import AdamW
        from ..student.model import Student

        gc.collect()                    # an earlier step's student is garbage by now: not in this one's peaks
        memory.release_cached()
        cfg = ModelConfig.from_dict(plan.student["config"])
        ids = _random_ids(cfg.vocab_size, plan.batch, plan.seq)
        with self.meter.phase("student init"):
            student = Student.from_config(cfg, seed=0, checkpoint=plan.checkpoint, chunk_tokens=plan.chunk_tokens,
                                          precision=plan.student["precision"])
            opt = AdamW.for_student(student)
        for _ in range(2):
            with self.meter.phase("distill step"):
                with self.meter.phase("teacher trunk"):
                    fn = teacher.logits_fn(ids)
                with self.meter.phase("student forward/backward"):
                    student.loss_and_grads(ids, fn, LossConfig())
                del fn
                with self.meter.phase("optimizer step"):
                    opt.step()
            for phase, row in self.STEP_PHASES.items():
                key = row + suffix
                self.measured[key] = max(self.measured.get(key, 0), self.meter.record(phase).peak_bytes - base)
        del student, opt
        self.log(f"  distill step {plan.batch}x{plan.seq}: peak {self.measured['distill step peak' + suffix] / 1e9:.3f} GB")

    def compare(self, fwd_plan, step_plan, long_plan=None) -> list:
        """Predicted vs measured for every measured row: teacher rows at B x T, step rows at STEP_B x T
        (and at the long step's shape, named with it)."""
        rows = [(r, r.name) for r in fwd_plan.rows if r.measured and r.name.startswith("teacher")]
        rows += [(r, r.name) for r in step_plan.rows if r.measured and r.name.startswith("distill")]
        if long_plan is not None:
            rows += [(r, f"{r.name} ({long_plan.batch}x{long_plan.seq})") for r in long_plan.rows
                     if r.measured and r.name.startswith("distill")]
        out = []
        for r, name in rows:
            got = self.measured.get(name)
            entry = {"name": name, "predicted_bytes": r.predicted_bytes, "measured_bytes": got,
                     "ratio": r.predicted_bytes / got if got else None, "status": "ok", "note": "", "counts": r.counts}
            if got is None:
                b = next((b for b in ("dequant-f32", "dequant-bf16") if f"({b})" in r.name), "native")
                entry.update(self.outcome.get(b, {"status": "not run"}))
            out.append(entry)
        return out


def _is_out_of_memory(exc) -> bool:
    from ..train.loop import is_out_of_memory

    return is_out_of_memory(exc) or "OUT_OF_MEMORY" in str(exc)


def _random_ids(vocab, B, T):
    import numpy as np

    from .. import backend

    return backend.asarray(np.random.default_rng(0).integers(0, vocab, size=(B, T)))


def _consume(chunks) -> None:
    for _start, _stop, _logits in chunks:    # the loop variable holds one chunk while the next is made
        pass


# -- comparison and claims ------------------------------------------------------------------------

def _is_7b(teacher: dict) -> bool:
    from ..memory import planner
    from ..data import MANIFEST_7B

    ref = planner.open_teacher(MANIFEST_7B)
    return (teacher["tensor_count"], teacher["total_tensor_bytes"]) == (len(ref.tensors), ref.total_tensor_bytes)


def check_claims(report: dict, info) -> list:
    """PASS / FAIL / SKIP for each claim of issue 7."""
    rows = {r["name"]: r for r in report["rows"]}
    claims = []

    def claim(text, ok, detail):
        claims.append({"claim": text, "result": "SKIP" if ok is None else "PASS" if ok else "FAIL", "detail": detail})

    native = rows["teacher resident (native)"]["measured_bytes"]
    tensor_bytes = info.total_tensor_bytes
    claim("native resident <= 1.02 x tensor bytes", None if native is None else native <= 1.02 * tensor_bytes,
          "not measured" if native is None else f"{native / tensor_bytes:.4f} x {tensor_bytes / 1e9:.3f} GB")
    f32 = rows["teacher resident (dequant-f32)"]["measured_bytes"]
    want = 4 * info.n_elements
    claim("dequant-f32 resident = 4 bytes x elements (~30 GB at 7B)", None if f32 is None else abs(f32 / want - 1) <= 0.02,
          f"not measured (predicted {want / 1e9:.1f} GB)" if f32 is None else f"{f32 / 1e9:.2f} GB vs {want / 1e9:.2f} GB")
    is_7b = _is_7b(report["teacher"])
    for row, batch, limit, text in CLAIMS_7B:
        got = rows[row]["measured_bytes"]
        shape_ok = is_7b and report["seq"] == 512 and batch == (report["batch"] if row.startswith("teacher") else report["step_batch"])
        if not shape_ok:
            claim(text, None, "applies to the 7B teacher at that shape only")
        else:
            claim(text, None if got is None else got <= limit, "not measured" if got is None else f"{got / 1e9:.3f} GB")
    for r in report["rows"]:
        ok = None if r["measured_bytes"] is None else within(r["predicted_bytes"], r["measured_bytes"])
        detail = ("not measured" if ok is None else
                  f"predicted {r['predicted_bytes'] / 1e9:.3f} GB, measured {r['measured_bytes'] / 1e9:.3f} GB")
        claim(f"prediction within {WITHIN:.0%}: {r['name']}", ok, detail)
    return claims


# -- output ---------------------------------------------------------------------------------------

def format_report(report: dict) -> str:
    unit = "GB" if report["counter"] == "cupy-pool" else "GB of host memory (CPU stand-in, tracemalloc)"
    lines = [f"device {report['device']}, {report['date']}; counter {report['counter']}; bytes in {unit}",
             f"teacher {report['teacher']['source']}: {report['teacher']['tensor_count']} tensors, "
             f"{report['teacher']['total_tensor_bytes']:,} bytes; student {report['student']['n_params']:,} params "
             f"({report['student'].get('precision', 'fp32')}); "
             f"forward {report['batch']}x{report['seq']}, step {report['step_batch']}x{report['seq']}, "
             f"chunk {report['chunk_tokens']}, checkpointing {'on' if report['checkpoint'] else 'off'}", ""]
    width = max(len(r["name"]) for r in report["rows"])
    lines.append(f"{'row':<{width}}  {'predicted':>10}  {'measured':>10}  {'pred/meas':>9}")
    for r in report["rows"]:
        got = "-" if r["measured_bytes"] is None else f"{r['measured_bytes'] / 1e9:.3f}"
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") else r["status"].upper()
        note = f"  {r['note']}" if r.get("note") else ""
        lines.append(f"{r['name']:<{width}}  {r['predicted_bytes'] / 1e9:>10.3f}  {got:>10}  {ratio:>9}{note}")
    lines += ["", "phases (bytes in use: start / peak / end):"]
    lines += [f"  {p['name']:<34} {p['start_bytes'] / 1e9:8.3f} {p['peak_bytes'] / 1e9:8.3f} {p['end_bytes'] / 1e9:8.3f}"
              + ("" if p["driver_used_after"] is None else f"   driver used {p['driver_used_after'] / 1e9:.3f}")
              for p in report["phases"]]
    lines += [""] + [f"{c['result']:<4}  {c['claim']}: {c['detail']}" for c in report["claims"]]
    return "\n".join(lines)


def plot(report: dict, path, log=print) -> bool:
    """Horizontal bars, predicted vs measured, per row. False (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot needs matplotlib, which is not installed: pip install 'q4kdistill[plot]' (the report above is complete)")
        return False
    rows = report["rows"]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh([i + 0.2 for i in y], [r["predicted_bytes"] / 1e9 for r in rows], height=0.4, label="predicted")
    ax.barh([i - 0.2 for i in y], [(r["measured_bytes"] or 0) / 1e9 for r in rows], height=0.4, label="measured")
    ax.set_yticks(list(y), [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("GB" if report["counter"] == "cupy-pool" else "GB (host, CPU stand-in)")
    ax.set_title(f"q4kdistill memory: {report['device']}, {report['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"wrote {path}")
    return True
