"""Every command the project tells people to run, run by the CPU suite at a tiny size.

Three sources of commands, each checked for coverage, so a new one without a tiny form fails here:
  docs/claims.md   every backticked command in a table's "command" column ("same" = the row
                   above's); a `pytest ...` command is checked by collecting its tests (the suite
                   runs them), any other needs an entry in CLAIM_TINY
  scripts/*.py     every script: --help (which must work without a GPU), --tiny where its help
                   offers it, and the CPU modes of GPU scripts (SCRIPT_CPU_RUNS)
  q4kdistill       every sub-command and every `bench` target: --help, and the tiny run in CLI_TINY
                   (None: GPU-only, then it must refuse in one line without a GPU)
The README's set-up and test commands must be the lines .ci/run runs.

Commands run as subprocesses (the memory meter hooks the process it runs in) from a scratch
folder, with this checkout first on PYTHONPATH; each distinct command runs once per session.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from q4kdistill import backend

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "docs" / "claims.md"
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
TIMEOUT = 300

# claims.md command -> the command the suite runs ({work}: the scratch folder, {tiny}: a tiny GGUF
# there, {root}: this checkout)
CLAIM_TINY = {
    "q4kdistill reproduce-memory --json --plot memory.png":
        "q4kdistill reproduce-memory --tiny --json --plot {work}/memory.png",
    "q4kdistill plan --teacher FILE --batch 8 --seq 512 --student-params 0.5e9":
        "q4kdistill plan --teacher {tiny} --batch 8 --seq 512 --student-params 0.5e9",
    "python3 scripts/gpu_kernels.py run OUT --x16 ...": "python3 scripts/gpu_kernels.py --help",
    "q4kdistill bench kernels --json bench.json": "q4kdistill bench kernels --help",
    "python3 scripts/probe_ceilings.py": "python3 scripts/probe_ceilings.py --help",
    "python3 scripts/sweep_mma.py OUT": "python3 scripts/sweep_mma.py --help",
    "q4kdistill bench teacher --json": "q4kdistill bench teacher --tiny --json",
    "q4kdistill bench student --preset qwen2-0.5b --batch 8 --seq 512":
        "q4kdistill bench student --preset qwen2-0.5b --tiny --json",
    "python scripts/evidence_kd_vs_ce.py": "python scripts/evidence_kd_vs_ce.py --tiny",
    "q4kdistill reproduce-memory --precision bf16 --backends native --json":
        "q4kdistill reproduce-memory --tiny --precision bf16 --backends native --json",
    "q4kdistill bench step --shapes 8x512 --only --json step.json":
        "q4kdistill bench step --tiny --no-peer --shapes 1x24 --only --json {work}/step.json",
    "q4kdistill bench step --shapes 2x4096 1x8192 1x32768 --only --json step_long.json":
        "q4kdistill bench step --tiny --no-peer --shapes 1x24 1x40 --only --json {work}/step_long.json",
    "q4kdistill bench step --shapes 1x16384 1x32768 --only --repeats 2 --warmup 1 --json step_16k.json":
        "q4kdistill bench step --tiny --no-peer --shapes 1x24 --only --repeats 1 --warmup 1 --json {work}/step_16k.json",
    "python scripts/bench_attention.py --T 4096 8192 16384 --torch": "python scripts/bench_attention.py --tiny",
    "q4kdistill bench kernels --variants gemm_mma_linked_64x64 gemm_mma_linked_128x64 "
    "gemm_mma_linked_128x64w4 dequant_linked_cublas --m 64 512 4096 --x16": "q4kdistill bench kernels --help",
    "python scripts/fit_budgets.py": "python scripts/fit_budgets.py --tiny",
    "python scripts/gpu_cache_audit.py": "python scripts/gpu_cache_audit.py --tiny",
    "q4kdistill reproduce-memory --long-step 1x8192 --backends native --json":
        "q4kdistill reproduce-memory --tiny --long-step 1x40 --backends native --json",
    "python scripts/compare_precision.py --json --plot docs/precision.png":
        "python scripts/compare_precision.py --tiny --json --plot {work}/precision.png",
    "python scripts/probe_int8_accuracy.py": "python scripts/probe_int8_accuracy.py --tiny",
}

# sub-command -> its tiny run (None: needs a GPU)
CLI_TINY = {
    "inspect": "q4kdistill inspect {tiny} --json",
    "convert": "q4kdistill convert {tiny} {work}/tiny.apr",
    "logits": "q4kdistill logits --teacher {tiny} --tokens 2,3,4",
    "generate": "q4kdistill generate --teacher {tiny} --tokens 2,3 -n 2 --json",
    "tokenize": "q4kdistill tokenize --teacher {tiny} 'hello world' --json",
    "plan": CLAIM_TINY["q4kdistill plan --teacher FILE --batch 8 --seq 512 --student-params 0.5e9"],
    "reproduce-memory": CLAIM_TINY["q4kdistill reproduce-memory --json --plot memory.png"],
    "distill": "q4kdistill distill --teacher {tiny} --data {work}/text --student-layers 0,1 --steps 2 --batch 2 "
               "--seq 16 --eval-every 2 --eval-batches 1 --save-every 2 --out {work}/run --no-progress",
    "export": "q4kdistill export --checkpoint {work}/run --out {work}/student.gguf --type f16",
    "demo": "q4kdistill demo --synthetic --steps 1 --out {work}/demo",
    "cache-teacher": "q4kdistill cache-teacher --teacher {tiny} --data {work}/text --top-k 4 --seq 16 --batch 2 "
                     "--out {work}/cache --json --no-progress",
    "audit": "q4kdistill audit --teacher {tiny} --reference {tiny} --data {work}/text --seq 16 --batch 2 "
             "--max-tokens 32 --json --no-progress",
    "bench student": CLAIM_TINY["q4kdistill bench student --preset qwen2-0.5b --batch 8 --seq 512"],
    "bench teacher": CLAIM_TINY["q4kdistill bench teacher --json"],
    "bench step": "q4kdistill bench step --tiny --no-peer --json {work}/step.json",
    "bench kernels": None,
    "autotune": None,
}
RUN_FIRST = {"export": "distill"}          # export reads distill's checkpoint

# GPU-only entry points at full size: without a GPU each must refuse in one line, no traceback
GPU_ONLY = [
    "q4kdistill bench kernels", "q4kdistill autotune", "q4kdistill bench student", "q4kdistill bench teacher",
    "q4kdistill bench step",
    "python scripts/probe_paths.py", "python scripts/probe_ceilings.py", "python scripts/probe_teacher_matmul.py",
    "python scripts/probe_teacher_ops.py",
    "python scripts/ncu_targets.py gemv_dp4a_r1w4:1", "python scripts/sweep_mma.py {work}/sweep",
    "python scripts/gpu_kernels.py run {work}/gpu --no-tests",
]
# a tiny script run may end with 1 when it ran but its verdict is negative
SCRIPT_TINY_RC = {"evidence_kd_vs_ce.py": (0, 1)}
# CPU modes of GPU scripts, run beside --help
SCRIPT_CPU_RUNS = {"gpu_kernels.py": ["report {root}/docs/bench/kernels_h100_2026-11-26_timerfix.csv"],
                   "gpu_session.py": ["--list"]}


# -- reading the docs --------------------------------------------------------------------------
def _cells(line: str) -> list:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def claim_rows(text: str) -> list:
    """[(claim, [commands])] for every row of a table with a 'command' column; a cell starting
    with 'same' carries the row above's commands (plus any of its own)."""
    rows, header, previous = [], None, []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if "command" not in header or set(line) <= set("|-: "):
            continue
        cell = cells[header.index("command")]
        commands = re.findall(r"`([^`]+)`", cell)
        if cell.lower().startswith("same"):
            commands = previous + commands
        rows.append((cells[0], commands))
        previous = commands
    return rows


def uncovered(text: str, mapping: dict) -> list:
    """Commands in ``text``'s claim tables that are neither a pytest command nor in ``mapping``."""
    found = {c for _, cs in claim_rows(text) for c in cs}
    return sorted(c for c in found if not c.startswith("pytest ") and c not in mapping)


def pytest_commands(text: str) -> list:
    """[(marker expression or None, [test files])] of the claims' pytest commands."""
    out = []
    for c in sorted({c for _, cs in claim_rows(text) for c in cs if c.startswith("pytest ")}):
        args = shlex.split(c)[1:]
        marker = args[args.index("-m") + 1] if "-m" in args else None
        out.append((marker, [a for a in args if a.endswith(".py")]))
    return out


# -- running -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Scratch folder: a tiny gemma3 GGUF and three small text files to distil on."""
    from q4kdistill.formats import synthetic

    d = tmp_path_factory.mktemp("claims")
    synthetic.write_gguf(d / "tiny.gguf", synthetic.tiny_config("gemma3", sliding_window=4), seed=0)
    (d / "text").mkdir()
    for f in range(3):
        (d / "text" / f"t{f}.txt").write_text(
            " ".join(f"The quick brown fox {i} jumps over the lazy dog number {7 * i + f}." for i in range(300)))
    return d


_DONE: dict = {}


def run(command: str, work: Path) -> subprocess.CompletedProcess:
    """Run ``command`` (q4kdistill ... | python[3] scripts/...) in ``work``, once per session."""
    line = command.format(work=work, tiny=work / "tiny.gguf", root=ROOT)
    if line not in _DONE:
        argv = shlex.split(line)
        if argv[0] == "q4kdistill":
            argv = [sys.executable, "-m", "q4kdistill", *argv[1:]]
        elif argv[0] in ("python", "python3"):
            argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        else:
            raise AssertionError(f"do not know how to run {command!r}")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        _DONE[line] = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return _DONE[line]


def ok(proc, rcs=(0,)) -> subprocess.CompletedProcess:
    assert proc.returncode in rcs, f"{proc.args} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


# what a tiny run must show beyond exit status 0 (keyed by its command before formatting)
def _bench_student(p, work):
    from q4kdistill.bench.student import OPS

    r = json.loads(p.stdout)
    assert r["device"] == backend.gpu_name() and r["preset"] == "qwen2-0.5b (tiny)" and r["batch"] * r["seq"] == 32
    assert r["step_ms"] > 0 and 0 < r["share_of_ceiling"] and r["params"] > 0
    called = {label for label, ms in r["ops_ms"].items() if ms > 0}
    assert {label for _, _, label, _ in OPS} <= called, "an op in bench.student.OPS is no longer called by the step"


def _bench_teacher(p, work):
    r = json.loads(p.stdout)
    assert r["device"] == backend.gpu_name() and r["batch"] * r["seq"] == 64
    assert r["resident_ratio"] == 1.0 and r["native_s"] > 0 and r["dense_f16_s"] > 0
    assert 0 < r["matmul_share_native"] < 1 and 0 < r["matmul_share_dense_f16"] < 1
    assert r["forward_peak_bytes"] > 0 and "native / dense fp16" in p.stderr


def _reproduce(p, work):
    r = json.loads(p.stdout)
    assert r["rows"] and all(row["status"] != "error" for row in r["rows"])
    assert (work / "memory.png").stat().st_size > 0


CHECKS = {
    CLI_TINY["bench student"]: _bench_student,
    CLI_TINY["bench teacher"]: _bench_teacher,
    CLI_TINY["reproduce-memory"]: _reproduce,
    CLI_TINY["plan"]: lambda p, w: "predicted" in p.stdout or pytest.fail(p.stdout),
    CLI_TINY["inspect"]: lambda p, w: json.loads(p.stdout)["architecture"] == "gemma3" or pytest.fail(p.stdout),
    CLI_TINY["convert"]: lambda p, w: (w / "tiny.apr").stat().st_size > 0 or pytest.fail("no APR file"),
    CLI_TINY["logits"]: lambda p, w: len(p.stdout.strip().splitlines()) == 4 or pytest.fail(p.stdout),
    CLI_TINY["generate"]: lambda p, w: len(json.loads(p.stdout)["new_ids"]) <= 2 or pytest.fail(p.stdout),
    CLI_TINY["tokenize"]: lambda p, w: json.loads(p.stdout) or pytest.fail(p.stdout),
    CLI_TINY["distill"]: lambda p, w: (w / "run" / "checkpoint.npz").exists() or pytest.fail("no checkpoint"),
    CLI_TINY["export"]: lambda p, w: (w / "student.gguf").stat().st_size > 0 or pytest.fail("no GGUF"),
    CLI_TINY["demo"]: lambda p, w: "teacher-KL" in p.stdout or pytest.fail(p.stdout),
}


def run_checked(command, work, rcs=(0,)):
    proc = ok(run(command, work), rcs)
    if command in CHECKS:
        CHECKS[command](proc, work)
    if command.endswith("--help"):
        assert proc.stdout.startswith("usage:"), proc.stdout
    return proc


# -- docs/claims.md ----------------------------------------------------------------------------
def test_every_claim_row_names_a_command():
    rows = claim_rows(CLAIMS.read_text())
    assert len(rows) >= 25, "claims.md's tables were not found"
    assert [claim for claim, commands in rows if not commands] == []


def test_every_claim_command_has_a_tiny_form():
    text = CLAIMS.read_text()
    assert uncovered(text, CLAIM_TINY) == [], "add these commands' tiny forms to CLAIM_TINY"
    found = {c for _, cs in claim_rows(text) for c in cs}
    assert sorted(set(CLAIM_TINY) - found) == [], "CLAIM_TINY names commands claims.md no longer has"
    for claim, tiny in CLAIM_TINY.items():     # the tiny form runs the same program / sub-command
        words = shlex.split(claim)
        k = 3 if words[1] == "bench" else 2
        assert shlex.split(tiny)[:k] == words[:k], (claim, tiny)


def test_coverage_check_sees_a_new_command():
    row = "| a new claim | 1.0 | H200 | `q4kdistill bench newthing --json` |"
    extra = "\n| claim | ours | card | command |\n| --- | --- | --- | --- |\n" + row + "\n| another | 2 | CPU | same |\n"
    assert uncovered(CLAIMS.read_text() + extra, CLAIM_TINY) == ["q4kdistill bench newthing --json"]
    assert claim_rows(extra)[-1] == ("another", ["q4kdistill bench newthing --json"])
    mapped = {**CLAIM_TINY, "q4kdistill bench newthing --json": "q4kdistill bench newthing --tiny"}
    assert uncovered(CLAIMS.read_text() + extra, mapped) == []


@pytest.mark.parametrize("claim_command", sorted(CLAIM_TINY))
def test_claim_command_runs_tiny(claim_command, work):
    name = Path(shlex.split(claim_command)[1]).name
    run_checked(CLAIM_TINY[claim_command], work, SCRIPT_TINY_RC.get(name, (0,)))


def test_claimed_pytest_commands_collect():
    """Each pytest command's files exist and hold tests its marker selects (the suite runs them)."""
    groups = pytest_commands(CLAIMS.read_text())
    assert groups, "no pytest command found in claims.md"
    for marker in {m for m, _ in groups}:
        files = sorted({f for m, fs in groups if m == marker for f in fs})
        assert all((ROOT / f).is_file() for f in files), files
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
        proc = ok(subprocess.run(cmd + (["-m", marker] if marker else []), cwd=ROOT, capture_output=True,
                                 text=True, timeout=TIMEOUT))
        ids = [line for line in proc.stdout.splitlines() if "::" in line]
        assert [f for f in files if not any(i.startswith(f + "::") for i in ids)] == [], (marker, proc.stdout[-2000:])


# -- scripts/ ----------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_script_help_and_tiny(script, work):
    help_ = run_checked(f"python scripts/{script} --help", work)
    if "--tiny" in help_.stdout:
        run_checked(f"python scripts/{script} --tiny", work, SCRIPT_TINY_RC.get(script, (0,)))
    for args in SCRIPT_CPU_RUNS.get(script, []):
        assert run_checked(f"python scripts/{script} {args}", work).stdout.strip()


# -- the command line --------------------------------------------------------------------------
def subcommands() -> list:
    from q4kdistill.cli import _command_modules
    from q4kdistill.cli.bench import TARGETS

    names = [m.NAME for m in _command_modules() if m.NAME != "bench"]
    return sorted(names + [f"bench {t}" for t in TARGETS])


def test_every_subcommand_has_a_tiny_form():
    assert sorted(CLI_TINY) == subcommands()


@pytest.mark.parametrize("name", subcommands())
def test_subcommand_help(name, capsys):
    from q4kdistill.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*name.split(), "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: q4kdistill " + name)


@pytest.mark.parametrize("name", [n for n in sorted(CLI_TINY) if CLI_TINY[n]])
def test_subcommand_runs_tiny(name, work):
    if name in RUN_FIRST:
        run_checked(CLI_TINY[RUN_FIRST[name]], work)
    run_checked(CLI_TINY[name], work)


@pytest.mark.skipif(backend.on_gpu(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("command", GPU_ONLY)
def test_gpu_only_refuses_in_one_line(command, work):
    proc = run(command, work)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in proc.stderr, proc.stderr


# -- the speed claims' own commands at full size (GPU) -------------------------------------------
@pytest.mark.gpu
def test_bench_student_claim_on_gpu(work):
    """~0.5B student step at 8x512: >= 45 % of the matmul ceiling measured in the same run."""
    proc = run_checked("q4kdistill bench student --preset qwen2-0.5b --batch 8 --seq 512 --json", work)
    r = json.loads(proc.stdout)
    assert r["params"] > 4.5e8 and r["batch"] * r["seq"] == 4096
    assert r["share_of_ceiling"] >= 0.45, proc.stderr


@pytest.mark.gpu
def test_bench_teacher_claim_on_gpu(work):
    """7B-shaped prefill 8x512 within 1.15x of dense fp16; resident <= 1.02x; forward peak <= 5.5 GB."""
    proc = run_checked("q4kdistill bench teacher --json", work)
    r = json.loads(proc.stdout)
    assert r["ratio"] <= r["ratio_target"] and r["resident_ratio"] <= r["resident_target"], proc.stderr
    assert r["forward_peak_bytes"] <= r["forward_peak_target"], proc.stderr


# -- README set-up ---------------------------------------------------------------------------
def readme_block(text: str, heading: str) -> str:
    """The first ```bash block under ``## heading`` of a README's ``text``."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def ci_runs(ci: str, block: str) -> bool:
    """Whether .ci/run's text ``ci`` runs ``block``'s commands verbatim, as whole lines."""
    lines = ci.splitlines()
    want = [line for line in block.splitlines() if line.strip()]
    return any(lines[i:i + len(want)] == want for i in range(len(lines)))


def test_readme_setup_and_test_commands_are_what_ci_runs():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    for heading in ("Set up", "Test"):
        block = readme_block(readme, heading)
        assert "pip install" in block or "pytest" in block, block
        assert ci_runs(ci, block), f"README.md's {heading!r} command is not what .ci/run runs:\n{block}"
    assert not ci_runs(ci, readme_block(readme, "Set up").replace(" -e ", " -q -e "))   # the check can fail


# -- what runs where -----------------------------------------------------------------------------
def test_what_runs_where_names_every_shipped_choice():
    """kernels/README.md's table names every variant the shipped tables and the built-in rule pick."""
    import kernels
    from kernels import dispatch

    section = (ROOT / "kernels" / "README.md").read_text().split("## What runs where\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z0-9_]+)`", section))
    table = json.loads(dispatch.SHIPPED_TABLE.read_text())
    picked = {e["variant"] for gpu in table["gpus"].values() for q, es in gpu.items() if not q.startswith("_")
              for e in es}
    picked |= {dispatch.builtin_choice(q, m) for q in ("Q4_K", "Q6_K", "Q8_0", "Q5_0") for m in (1, 8, 9, 4096)}
    assert sorted(picked - named) == [], "kernels/README.md 'What runs where' misses these choices"
    for name in (n for n in named if n.startswith(("gemv_", "dequant_", "numpy_"))):
        kernels.get(name)                      # every variant it names exists
