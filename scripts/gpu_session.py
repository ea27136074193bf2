"""The GPU checks and benchmarks still due, in parts that each fit one device call (<= 10 minutes): run a
part, keep its logs, and say which commands failed. What each part measures and why is in docs/perf.md
(thirteenth to seventeenth stops); the figures go there with card, date and command.

    python scripts/gpu_session.py --list                 # the parts and their commands (no GPU needed)
    python scripts/gpu_session.py --part 1 --out OUT     # run part 1, logs in OUT/part1/*.log, OUT/part1.json
    python scripts/gpu_session.py --part 3 --env Q4KDISTILL_FA_SCHED=17   # a part with a setting over its own

Parts:
    1  GPU tests of what no GPU has run yet: schedule 20, the fused GEMMs, the tile setting, and schedules 13 / 16
       on the attention files
    2  kernel benches, one process each: attention at D = 64 in 19 and 20 (the bulk-copy dQ: its prediction in
       docs/perf.md, seventeenth stop), at D = 128 in 13 and 19 and with 64-key, one-warpgroup
       tiles (two CTAs an SM); torch SDPA beside
    3  the step beside the peer at 8x512, 2x4096 and 1x8192 in the default schedule (19)
    4  the rest of the GPU suite (every file but part 1's), then the one test that failed in the thirteenth stop's
       full run on its own
    5  the real gemma-3 file's GPU parity (the file must be in $Q4KDISTILL_GEMMA_GGUF; last run in the seventeenth
       stop under schedule 19: 12 passed)
    7  the rest of part 1's files on the GPU
    8  the fused GEMMs beside the scratch path and cuBLAS
    6  ncu of the D = 64 and D = 128 attention forward and backward in the default schedule (19), with the stall
       samples of every SASS instruction (--page source), to say where each warp still waits
    9  the backward's row pass against the ops it replaced (bench_attention_rows.py), then the student / graph / fused
       GPU files that the seventeenth stop's call did not finish
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

PY = "python -m"

PART1_FILES = ("tests/test_attention_wgmma.py tests/test_attention_flash.py tests/test_kernels_gemm_wgmma.py "
               "tests/test_kernels_gemm_wgmma_s8.py")

NEW = "sched20 or sched13 or sched16 or schedule_13 or tiles_setting or gemm_wgmma"   # part 1: what no GPU has run
# part -> [(name, command, extra environment, timeout s)]
PARTS = {
    1: [("gpu_tests_new", f"{PY} pytest -q -m gpu {PART1_FILES} -k \"{NEW}\"", {}, 540)],
    2: [("attention_d64", "python scripts/bench_attention.py --T 8192 --paths wgmma --scheds 19 20 --torch "
                          "--json {out}/att64.json", {}, 200),
        ("attention_d128", "python scripts/bench_attention.py --T 8192 --D 128 --H 28 --KV 4 --paths wgmma "
                           "--scheds 13 19 --tiles 64,1,3 --torch --json {out}/att128.json", {}, 300)],
    8: [("gpu_tests_rs", f"{PY} pytest -q -m gpu tests/test_kernels_gemm_wgmma_rs.py", {}, 300),   # MT = 2, Q6_K: new
        ("bench_gemm", f"{PY} q4kdistill bench kernels --qtypes Q4_K Q6_K --shapes 3584x3584 3584x18944 18944x3584 "
                       "3584x152064 --m 512 4096 --variants gemm_wgmma_rs_linked gemm_wgmma_rs_linked_tma "
                       "gemm_wgmma_rs_linked_m2 gemm_wgmma_rs_linked_m2_tma dequant_linked_cublas --csv {out}/rs.csv",
         {}, 300)],
    3: [("step_default", f"{PY} q4kdistill bench step --shapes 8x512 2x4096 1x8192 --only --json {{out}}/step.json", {},
         400)],
    4: [("gpu_suite_rest", f"{PY} pytest -q -m gpu tests " + " ".join(f"--ignore={f}" for f in PART1_FILES.split())
         + " -p no:cacheprovider", {}, 520),
        ("launch_test_alone", f"{PY} pytest -q -m gpu tests/test_kernels_launch.py", {}, 60)],
    7: [("gpu_tests_rest", f"{PY} pytest -q -m gpu {PART1_FILES} -k \"not ({NEW})\"", {}, 540)],
    9: [("bench_rows", "python scripts/bench_attention_rows.py", {}, 60),
        ("gpu_student_files", f"{PY} pytest -q -m gpu tests/test_student_bf16.py tests/test_cuda_graph.py "
                              "tests/test_student_fused.py tests/test_fused_kernels.py tests/test_memory_reproduce.py "
                              "tests/test_claims_commands.py", {}, 540)],
    5: [("gemma3_parity", f"{PY} pytest -q -m gpu tests/test_teacher_gpu.py tests/test_teacher_cache.py tests/test_audit.py",
         {}, 540)],
    6: [(f"ncu_source_d{D}", f"ncu --set full -k regex:^kernel --launch-count 3 -f -o {{out}}/faw{D} "
                           f"python scripts/bench_attention.py --T 8192 --D {D} --H {H} --KV {KV} --paths wgmma "
                           f"--warmup 1 --reps 1 && ncu --import {{out}}/faw{D}.ncu-rep --page source --csv --print-source "
                           f"sass > {{out}}/faw{D}_source.csv && ncu --import {{out}}/faw{D}.ncu-rep --page details "
                           f"> {{out}}/faw{D}_details.txt", {}, 280) for D, H, KV in ((64, 14, 2), (128, 28, 4))],
}

PARTS = dict(sorted(PARTS.items()))


def commands(part: int, out: Path, extra_env: dict | None = None) -> list:
    """(name, command, environment, timeout) of a part's commands; extra_env (--env) over each's own."""
    return [(name, cmd.format(out=out), {**{k: v.format(out=out) for k, v in env.items()}, **(extra_env or {})}, t)
            for name, cmd, env, t in PARTS[part]]


def run_part(part: int, out: Path, extra_env: dict | None = None) -> dict:
    folder = out / f"part{part}"
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cmd, env, timeout in commands(part, folder, extra_env):
        t0 = time.time()
        with open(folder / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, shell=True, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        results[name] = {"rc": rc, "seconds": round(time.time() - t0, 1), "command": cmd, "env": env}
        print(f"part {part} {name}: rc {rc} in {results[name]['seconds']} s", flush=True)
    (out / f"part{part}.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", type=int, choices=sorted(PARTS))
    p.add_argument("--out", type=Path, default=Path("gpu_session"))
    p.add_argument("--list", action="store_true", help="print the parts' commands and exit (no GPU needed)")
    p.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="settings over every command's own, e.g. Q4KDISTILL_FA_SCHED=17 for part 3 or 6")
    args = p.parse_args(argv)
    extra = {}
    for kv in args.env:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            print(f"error: --env {kv!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        extra[key] = value
    if args.list or args.part is None:
        for part in PARTS:
            for name, cmd, env, t in commands(part, args.out / f"part{part}", extra):
                pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
                print(f"[{part}] {name} (<= {t} s): {pre + ' ' if pre else ''}{cmd}")
        return 0
    from q4kdistill import backend
    if not backend.on_gpu():
        print("error: gpu_session runs on a GPU machine (use --list here)", file=sys.stderr)
        return 2
    results = run_part(args.part, args.out, extra)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
