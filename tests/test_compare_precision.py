"""scripts/compare_precision.py --tiny: the bf16-vs-fp32 distillation comparison (item 5 of issue 15)
on the CPU, where bf16 is emulated; the lead runs the real-teacher form on the GPU."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_precision.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_precision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_runs_both_precisions_and_judges(script, capsys):
    assert script.main(["--tiny", "--json"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    assert r["steps"] == [0, 3, 6] and r["result"] == "PASS"
    kl = r["teacher_kl"]
    assert len(kl["fp32"]) == len(kl["bf16"]) == 3
    assert kl["fp32"] != kl["bf16"]                     # two different runs, not one run twice
    assert abs(r["relative_gap"]) <= 0.02 and "PASS: final held-out teacher-KL" in captured.err
    assert kl["fp32"][-1] < kl["fp32"][0]               # it learned


def test_a_gap_over_the_bound_fails(script, capsys):
    assert script.main(["--tiny", "--steps", "3", "--within", "1e-9"]) == 1
    assert "FAIL: final held-out teacher-KL" in capsys.readouterr().out
