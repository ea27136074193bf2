"""Measured proof of `--gpu-memory`: for each budget, the settings `plan --fit` picks, run for a few
steps with CuPy's pool capped at the budget; predicted vs measured peak and tokens/s.

    python scripts/fit_budgets.py [--budgets 12GB,16GB,24GB,48GB] [--seqs 512,4096] [--json OUT]
    python scripts/fit_budgets.py --tiny          # the CPU: a tiny manifest teacher, host bytes

Teacher: the shipped 7B Q4_K_M manifest (random valid blocks, native quantized); student: a fresh
qwen2-like student of 0.5e9 parameters with the teacher's vocabulary (``params=0.5e9``). Measured
bytes are the package counter's (``memory.meter``: CuPy pool + Numba through it) above what was in
use before the teacher was loaded, as reproduce-memory counts them. A budget is held when the
measured step peak <= the budget and no step ran out of memory under the cap.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import q4kdistill  # noqa: F401  (backend first)
from q4kdistill import backend
from q4kdistill.errors import Q4KError
from q4kdistill.memory import fit, planner
from q4kdistill.memory import meter as memory


def _case(model, teacher, budget, seq, student, steps, base, meter, log):
    from q4kdistill.config import ModelConfig
    from q4kdistill.student.losses import LossConfig
    from q4kdistill.student.model import Student
    from q4kdistill.student.optim import AdamW

    row = {"budget_bytes": budget, "seq": seq}
    try:
        choice = fit.fit(model, budget, seq=seq, student=student)
    except Q4KError as exc:
        row.update(status="does not fit", note=str(exc))
        log(_line(row))
        return row
    row.update(choice.to_json(), status="ok")
    plan = planner.make_plan(model, choice.batch, seq, student, chunk_tokens=choice.chunk_tokens,
                             checkpoint=choice.checkpoint_activations)
    cfg = ModelConfig.from_dict(plan.student["config"])
    pool = None
    if backend.on_gpu():
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.set_limit(size=budget)
    ids = backend.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(choice.batch, seq)))
    student_obj = opt = None
    try:
        with meter.phase(f"fit {budget / 1e9:.0f}GB x {seq}") as ph:
            student_obj = Student.from_config(cfg, seed=0, checkpoint=choice.checkpoint_activations,
                                              chunk_tokens=choice.chunk_tokens)
            opt = AdamW.for_student(student_obj)
            times = []
            for _ in range(steps):
                backend.synchronize()
                t0 = time.perf_counter()
                student_obj.loss_and_grads(ids, teacher.logits_fn(ids), LossConfig())
                opt.step()
                backend.synchronize()
                times.append(time.perf_counter() - t0)
        row["measured_peak_bytes"] = ph.peak_bytes - base
        row["tokens_per_s"] = choice.batch * seq / float(np.median(times[1:] or times))
        row["held"] = row["measured_peak_bytes"] <= budget
        row["pred_over_meas"] = choice.predicted_peak_bytes / max(row["measured_peak_bytes"], 1)
    except Exception as exc:                          # an OOM under the cap is this row's result
        row.update(status="oom" if "memory" in str(exc).lower() else "error",
                   note=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}", held=False)
    finally:
        del student_obj, opt
        if pool is not None:
            pool.set_limit(size=0)
        memory.release_cached()
    log(_line(row))
    return row


def _line(r) -> str:
    if r["status"] == "does not fit":
        return f"{r['budget_bytes'] / 1e9:6.2f} GB  seq {r['seq']:>5}  does not fit: {r['note']}"
    if r["status"] != "ok":
        return f"{r['budget_bytes'] / 1e9:6.2f} GB  seq {r['seq']:>5}  batch {r['batch']:>3}  {r['status'].upper()}: {r['note']}"
    return (f"{r['budget_bytes'] / 1e9:6.2f} GB  seq {r['seq']:>5}  batch {r['batch']:>3}  chunk {r['chunk_tokens']:>5}  "
            f"ckpt {'on ' if r['checkpoint_activations'] else 'off'}  predicted {r['predicted_peak_bytes'] / 1e9:6.2f}  "
            f"measured {r['measured_peak_bytes'] / 1e9:6.2f} GB  {r['tokens_per_s']:9,.0f} tok/s  "
            f"{'held' if r['held'] else 'OVER BUDGET'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="12GB,16GB,24GB,48GB")
    ap.add_argument("--seqs", default="512,4096")
    ap.add_argument("--student", default="params=0.5e9")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny manifest teacher on the CPU (host bytes)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    from q4kdistill.memory.reproduce import TINY, tiny_manifest
    from q4kdistill.teacher.model import Teacher

    if args.tiny:
        source, budgets, seqs, student = tiny_manifest(), [40e6, 80e6], [32], TINY["student"]
    else:
        from q4kdistill.data import MANIFEST_7B

        source = MANIFEST_7B
        budgets = [fit.parse_bytes(b) for b in args.budgets.split(",")]
        seqs, student = [int(s) for s in args.seqs.split(",")], args.student
    model = planner.open_teacher(source)
    memory.install()
    meter = memory.MemoryMeter()
    memory.release_cached()
    base = meter.current_bytes()
    teacher = Teacher.load(model, backend="native", log=None)
    rows = [_case(model, teacher, int(b), s, student, args.steps, base, meter, print) for s in seqs for b in budgets]
    report = {"device": backend.gpu_name(), "counter": meter.counter.name, "date": time.strftime("%Y-%m-%d"),
              "teacher": model.path, "student": student, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    # on the CPU the counter sees host bytes of the NumPy path (reference ops, their temporaries), not
    # the GPU path the planner predicts: the tiny run checks the code, a budget is judged on a GPU only
    over = [r for r in rows if r["status"] == "ok" and not r["held"]] if backend.on_gpu() else []
    print(f"{len(rows)} cases on {report['device']}: {sum(r['status'] == 'ok' for r in rows)} ran, "
          f"{len(over)} over budget")
    return 1 if over or any(r["status"] in ("oom", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
