"""Offline teacher cache vs online KD: bytes per token, and the held-out teacher-KL they reach.

One student (blocks of the teacher), trained on the same tokens in the same order for the same
steps: once online (the teacher runs every step, full-vocabulary forward KL), and once from a
teacher cache for each k (sparse KL over the k ids + the rest class). The cache is made once at
the largest k by ``cache-teacher``; the smaller ones are cut from it (``shrink_cache``: the same
ids, the dropped ones joined to the rest). Every student is then evaluated against the real
teacher on the held-out file (full vocabulary, T = 1).

    python scripts/cache_vs_online.py                      # gemma-3-270m on the CPU, small sizes
    python scripts/cache_vs_online.py --steps 40 --seq 64 --batch 4 --ks 16,64,256
    python scripts/cache_vs_online.py --tiny               # a tiny synthetic teacher (the test suite)

Prints a Markdown table and writes OUT/cache_vs_online.json; docs/distill.md records a run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # q4kdistill/ from this checkout


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="teacher GGUF (default: gemma-3-270m from its package)")
    p.add_argument("--layers", default="0,17", help="teacher blocks copied into the student")
    p.add_argument("--ks", default="16,64,256", help="cache sizes k to compare")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--files", type=int, default=5, help="data files (one held out) of --chars characters each")
    p.add_argument("--chars", type=int, default=600)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--out", default="runs/cache_vs_online")
    p.add_argument("--tiny", action="store_true", help="a tiny synthetic teacher and corpus (seconds; for the tests)")
    return p.parse_args(argv)


def make_corpus(out: Path, files: int, chars: int, tiny: bool) -> str:
    """``files`` text files: slices of Python's own documentation topics (or synthetic words)."""
    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    if tiny:
        import numpy as np
        from q4kdistill.formats import synthetic

        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(synthetic._WORDS, chars // 5)) for _ in range(files)]
    else:
        src = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
        body = src.read_text(encoding="utf-8")
        texts = [body[20000 + i * chars: 20000 + (i + 1) * chars] for i in range(files)]
    for i, text in enumerate(texts):
        (root / f"part{i}.txt").write_text(text)
    return str(root)


def tiny_teacher(out: Path) -> str:
    from q4kdistill.formats import synthetic

    cfg = synthetic.tiny_config("gemma3", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
    return synthetic.write_gguf(out / "tiny-teacher.gguf", cfg, qtypes={"*": "F32"}, seed=5)


def train(args, teacher, data, out, cache=None):
    from q4kdistill.train.loop import DistillConfig, distill

    cfg = DistillConfig(teacher=teacher, data=data, out=str(out), student_layers=[int(x) for x in args.layers.split(",")],
                        steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, warmup=max(1, args.steps // 5),
                        eval_every=args.steps, eval_batches=args.eval_batches, save_every=args.steps,
                        heldout=1 / args.files, seed=0, teacher_cache=None if cache is None else str(cache))
    t0 = time.perf_counter()
    summary = distill(cfg, progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr))
    return summary, cfg, time.perf_counter() - t0


def main(argv=None) -> int:
    from q4kdistill.teacher.model import Teacher
    from q4kdistill.train.loop import OnlineTargets, evaluate, heldout_batches, load_data
    from q4kdistill.train.teacher_cache import cache_teacher, shrink_cache

    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.ks, args.steps, args.layers = "4,16,64", min(args.steps, 4), "1"
        teacher = tiny_teacher(out)
    else:
        from q4kdistill.data import gemma_path

        teacher = args.teacher or gemma_path()
    data = make_corpus(out, args.files, args.chars, args.tiny)
    ks = sorted(int(k) for k in args.ks.split(","))
    log = lambda m: print(m, file=sys.stderr)    # noqa: E731

    t0 = time.perf_counter()
    big = cache_teacher(teacher, data, out / f"cache-k{ks[-1]}", top_k=ks[-1], seq=args.seq, heldout=1 / args.files,
                        progress=False, log=log)
    cache_seconds = time.perf_counter() - t0
    caches = {ks[-1]: (out / f"cache-k{ks[-1]}", big)}
    for k in ks[:-1]:
        caches[k] = (out / f"cache-k{k}", shrink_cache(out / f"cache-k{ks[-1]}", out / f"cache-k{k}", k))

    rows, students = [], {}
    summary, cfg, seconds = train(args, teacher, data, out / "online")
    students["online"], rows = summary["student"], [{"mode": "online KD", "k": None, "bytes_per_token": None,
                                                     "train_seconds": seconds}]
    for k in ks:
        summary, _, seconds = train(args, teacher, data, out / f"from-cache-k{k}", cache=caches[k][0])
        students[f"k{k}"] = summary["student"]
        rows.append({"mode": f"cache, k = {k}", "k": k, "bytes_per_token": caches[k][1]["bytes_per_token"],
                     "train_seconds": seconds})

    t = Teacher.load(teacher, log=None)                       # one evaluation, with the real teacher, for all
    _, _, held, _ = load_data(cfg, log)
    batches = heldout_batches(cfg, held)
    from q4kdistill.train.loop import build_student

    start = evaluate(build_student(cfg, t), OnlineTargets(t), batches)
    for row, student in zip(rows, students.values()):
        row.update({f"heldout_{k}": v for k, v in evaluate(student, OnlineTargets(t), batches).items()})

    result = {"teacher": os.path.basename(teacher), "steps": args.steps, "batch": args.batch, "seq": args.seq,
              "layers": args.layers, "cache_seconds": cache_seconds, "cache_tokens": big["tokens"],
              "start": start, "rows": rows}
    (out / "cache_vs_online.json").write_text(json.dumps(result, indent=1))
    print(f"{result['teacher']}, student blocks {args.layers}, {args.steps} steps of {args.batch} x {args.seq} tokens; "
          f"held-out teacher-KL at step 0: {start['teacher_kl']:.4f} ({start['tokens']} tokens)\n")
    print("| training signal | bytes/token | held-out teacher-KL | top-1 agreement | train s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        b = "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        print(f"| {r['mode']} | {b} | {r['heldout_teacher_kl']:.4f} | {100 * r['heldout_top1_agreement']:.1f} % "
              f"| {r['train_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
