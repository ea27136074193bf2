"""Data-parallel distillation throughput: N GPUs against 1, at a fixed batch per GPU.

Each rank is a process on its own GPU (torchrun-style variables, NCCL through CuPy) holding the
teacher (default: the 7B Q4_K_M manifest, random valid blocks) and a student replica (default:
qwen2-0.5b's layout); every rank runs ``train.loop.train_step``, the training loop's own step
(teacher forward on its rows, student backward, status agreement, gradient all-reduce, AdamW),
on a global batch of N x 8 x 512 tokens. Rank 0 reports global tokens/s; the table gives each
world's speedup over 1 GPU beside the targets (1.9x on 2 GPUs, 3.6x on 4).

    python scripts/dp_throughput.py --gpus 1,2,4 --json dp.json     # on a machine with 4 GPUs
    python scripts/dp_throughput.py --tiny                          # CPU: threads (LocalGroup), tiny models

Worlds larger than the machine's GPU count are skipped with a note. NCCL's environment is kept
as it is (NCCL_NVLS_ENABLE=0 where the machine sets it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # q4kdistill/ from this checkout

TARGETS = {2: 1.9, 4: 3.6}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2,4", help="worlds to time, comma-separated (default %(default)s)")
    p.add_argument("--teacher", default=None, help="teacher file or manifest (default: the 7B Q4_K_M manifest)")
    p.add_argument("--student-shape", default="qwen2-0.5b", help="student (distill's --student-shape)")
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU (default %(default)s)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--tiny", action="store_true", help="CPU: worlds 1 and 2 as threads, tiny teacher and student")
    p.add_argument("--worker", metavar="RESULT", help=argparse.SUPPRESS)   # one rank (set by the launcher)
    return p.parse_args(argv)


class RandomBatches:
    """Endless random global batches [B, T] (the same on every rank: one seed)."""

    def __init__(self, vocab, batch, seq, seed=0):
        import numpy as np

        self.rng, self.shape, self.vocab = np.random.default_rng(seed), (batch, seq), vocab

    def next_batch(self):
        import numpy as np

        from q4kdistill.train.corpus import Batch

        ids = self.rng.integers(0, self.vocab, self.shape).astype(np.int32)
        return Batch(ids, None, np.arange(self.shape[0]))


def make_run(args, comm, teacher_source):
    """A loop.Run for timing: the teacher, a fresh student of --student-shape, AdamW, random batches."""
    from q4kdistill.student.model import Student
    from q4kdistill.student.spec import parse_student_shape, student_config
    from q4kdistill.teacher.model import Teacher
    from q4kdistill.train import loop as D

    teacher = Teacher.load(teacher_source, log=None)
    global_batch = args.batch * comm.world_size
    cfg = D.DistillConfig(teacher="<bench>", data="<random>", out="<none>", batch=global_batch, seq=args.seq,
                          steps=args.warmup + args.steps, precision=args.precision)
    config = student_config(teacher.config, parse_student_shape(args.student_shape))
    student = Student.from_config(config, seed=0, chunk_tokens=cfg.chunk_tokens, precision=args.precision)
    return D.Run(cfg, teacher, None, None, None, RandomBatches(teacher.config.vocab_size, global_batch, args.seq),
                 student, D.make_optimizer(cfg, student), D.make_loss_config(cfg), {},
                 targets=D.OnlineTargets(teacher), comm=comm)


def time_rank(args, comm, teacher_source) -> dict:
    """Warm-up and timed steps of the loop's train_step on this rank -> rank 0's report row."""
    from q4kdistill import backend
    from q4kdistill.train import loop as D

    run = make_run(args, comm, teacher_source)
    for _ in range(args.warmup):
        D.train_step(run, run.sampler)
    comm.barrier()
    backend.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        record = D.train_step(run, run.sampler)
    backend.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq * comm.world_size
    return {"gpus": comm.world_size, "global_tokens_per_step": tokens, "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "loss": record["loss"]}


def teacher_source(args):
    if args.tiny:
        from q4kdistill.memory.reproduce import tiny_manifest

        return tiny_manifest()
    from q4kdistill.data import MANIFEST_7B

    return args.teacher or MANIFEST_7B


def worker(args) -> int:
    """One rank (RANK, WORLD_SIZE, ... set by the launcher): rank 0 writes its row to --worker."""
    from q4kdistill.train import distributed as dist

    comm = dist.from_environment()
    row = time_rank(args, comm, teacher_source(args))
    if comm.rank == 0:
        with open(args.worker, "w") as f:
            json.dump(row, f)
    comm.close()
    return 0


def worker_argv(args) -> list:
    argv = ["--student-shape", args.student_shape, "--batch", str(args.batch), "--seq", str(args.seq),
            "--precision", args.precision, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    return argv + (["--teacher", args.teacher] if args.teacher else [])


def run_world_processes(n, argv) -> dict:
    """``n`` rank processes of this script on this host -> rank 0's row."""
    from q4kdistill.train import distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "row.json")
        env = dict(os.environ, WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist.free_port()))
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker", result],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r), CUDA_VISIBLE_DEVICES=str(r)))
                 for r in range(n)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"dp_throughput: a rank of the world of {n} failed (exit {codes})")
        with open(result) as f:
            return json.load(f)


def run_world_threads(n, args) -> dict:
    """``n`` ranks as threads (distributed.LocalGroup, NumPy): the CPU form of the same step."""
    from q4kdistill.train import distributed as dist

    group, rows, errors = dist.LocalGroup(n, timeout=600), [None] * n, []
    source = teacher_source(args)

    def body(r):
        try:
            rows[r] = time_rank(args, group.communicator(r), source)
        except BaseException as exc:
            errors.append(exc)
            group.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return rows[0]


def table(rows) -> str:
    base = next((r["tokens_per_s"] for r in rows if r["gpus"] == 1), None)
    lines = ["| GPUs | tokens / step | s / step | tokens / s | speedup | target |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        r["speedup"] = None if base is None else r["tokens_per_s"] / base
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        target = f">= {TARGETS[r['gpus']]}x" if r["gpus"] in TARGETS else ""
        lines.append(f"| {r['gpus']} | {r['global_tokens_per_step']:,} | {r['seconds_per_step']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {speed} | {target} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.tiny:
        args.student_shape, args.batch, args.seq, args.precision = "tiny", 2, 16, "fp32"
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        rows = [run_world_threads(n, args) for n in (1, 2)]
    else:
        from q4kdistill.train import distributed as dist

        have = dist.gpu_count()
        if have == 0:
            print("dp_throughput: needs CUDA GPUs (CuPy with NCCL); on the CPU run --tiny", file=sys.stderr)
            return 2
        worlds = [int(x) for x in args.gpus.split(",")]
        rows = []
        for n in worlds:
            if n > have:
                print(f"dp_throughput: skipping {n} GPUs (this machine has {have})", file=sys.stderr)
                continue
            rows.append(run_world_processes(n, worker_argv(args)))
            print(f"{n} GPU(s): {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
