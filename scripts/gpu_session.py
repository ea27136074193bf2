"""The GPU checks and benchmarks still due, in parts that each fit one device call (<= 10 minutes): run a
part, keep its logs, and say which commands failed. What each part measures and why is in docs/perf.md
(twelfth stop, "Commands for the next lease"); the figures go there with card, date and command.

    python scripts/gpu_session.py --list                 # the parts and their commands (no GPU needed)
    python scripts/gpu_session.py --part 1 --out OUT     # run part 1, logs in OUT/part1/*.log, OUT/part1.json

Parts:
    1  GPU tests of the CPU-only kernels (wgmma attention, fused fp16 and int8 GEMMs, decode_ahead, launch)
    2  kernel benches: the fused GEMMs beside the scratch path and cuBLAS; attention at D = 64 and 128
    3  the step beside the peer: 8x512 and 1x8192, default kernels against the wgmma attention
    4  the teacher's opt-in fp16 products (GLU inputs, q/k/v) at 8x512, and a table pinning the fused GEMM
    5  the real gemma-3 file's GPU parity (the file must be in $Q4KDISTILL_GEMMA_GGUF)
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
WGMMA_ATT = {"Q4KDISTILL_FA_FWD": "wgmma", "Q4KDISTILL_FA_BWD": "wgmma"}

# part -> [(name, command, extra environment, timeout s)]
PARTS = {
    1: [("gpu_tests", f"{PY} pytest -q -m gpu tests/test_attention_wgmma.py tests/test_kernels_gemm_wgmma.py "
                      "tests/test_kernels_gemm_wgmma_s8.py tests/test_decode_ahead.py tests/test_kernels_launch.py", {}, 540)],
    2: [("bench_gemm", f"{PY} q4kdistill bench kernels --variants gemm_wgmma_linked gemm_wgmma_linked_n128 "
                       "gemm_wgmma_linked_plain gemm_wgmma_s8_linked dequant_linked_cublas --m 512 4096 --x16 "
                       "--csv {out}/wgmma.csv", {}, 300),
        ("attention_d64", "python scripts/bench_attention.py --T 8192 --paths mma wgmma --torch --json {out}/att64.json",
         {}, 120),
        ("attention_d128", "python scripts/bench_attention.py --T 512 8192 --D 128 --H 28 --KV 4 --paths mma wgmma "
                           "--torch --json {out}/att128.json", {}, 150)],
    3: [("step_default", f"{PY} q4kdistill bench step --shapes 8x512 1x8192 --only --json {{out}}/step_default.json", {},
         280),
        ("step_wgmma_attention", f"{PY} q4kdistill bench step --shapes 8x512 1x8192 --only "
                                 "--json {out}/step_wgmma.json", WGMMA_ATT, 280)],
    4: [("teacher_default", f"{PY} q4kdistill bench step --shapes 8x512 --only --no-peer "
                            "--json {out}/step_default.json", {}, 150),
        ("teacher_glu16", f"{PY} q4kdistill bench step --shapes 8x512 --only --no-peer --json {{out}}/step_glu16.json",
         {"Q4KDISTILL_GLU_INPUTS": "float16"}, 150),
        ("teacher_glu_qkv16", f"{PY} q4kdistill bench step --shapes 8x512 --only --no-peer "
                              "--json {out}/step_glu_qkv16.json",
         {"Q4KDISTILL_GLU_INPUTS": "float16", "Q4KDISTILL_QKV_PRODUCT": "float16"}, 150),
        ("pin_fused_gemm", "python -c \"from kernels import autotune, dispatch; autotune.pin(dispatch.table_path(), "
                           "'{out}/pin.json', 'NVIDIA H200', 'gemm_wgmma_linked', 65)\"", {}, 30),
        ("teacher_fused_gemm", f"{PY} q4kdistill bench step --shapes 8x512 --only --no-peer "
                               "--json {out}/step_fused_gemm.json", {"Q4KDISTILL_TUNING": "{out}/pin.json"}, 150)],
    5: [("gemma3_parity", f"{PY} pytest -q -m gpu tests/test_teacher_gpu.py tests/test_teacher_cache.py tests/test_audit.py",
         {}, 540)],
}


def commands(part: int, out: Path) -> list:
    return [(name, cmd.format(out=out), {k: v.format(out=out) for k, v in env.items()}, t)
            for name, cmd, env, t in PARTS[part]]


def run_part(part: int, out: Path) -> dict:
    folder = out / f"part{part}"
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cmd, env, timeout in commands(part, folder):
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
    args = p.parse_args(argv)
    if args.list or args.part is None:
        for part in PARTS:
            for name, cmd, env, t in commands(part, args.out / f"part{part}"):
                pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
                print(f"[{part}] {name} (<= {t} s): {pre + ' ' if pre else ''}{cmd}")
        return 0
    from q4kdistill import backend
    if not backend.on_gpu():
        print("error: gpu_session runs on a GPU machine (use --list here)", file=sys.stderr)
        return 2
    results = run_part(args.part, args.out)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
