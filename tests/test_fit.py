"""`plan --fit` and `distill --gpu-memory`: the budget search over the planner's own numbers."""
import json

import pytest

from q4kdistill import cli
from q4kdistill.errors import Q4KError
from q4kdistill.memory import fit, planner
from q4kdistill.memory.reproduce import tiny_manifest

STUDENT = "d_model=64,n_layers=2,d_ff=128,n_heads=4,n_kv_heads=2"


@pytest.fixture(scope="module")
def teacher():
    return planner.open_teacher(tiny_manifest())


def _peak(teacher, batch, seq, chunk, ck):
    return planner.make_plan(teacher, batch, seq, STUDENT, chunk_tokens=chunk, checkpoint=ck).distill_step_peak_bytes


@pytest.mark.parametrize("text, want", [("24GB", 24 * 10 ** 9), ("24GiB", 24 * 2 ** 30), ("2.5e10", 25 * 10 ** 9),
                                        ("512MB", 512 * 10 ** 6), (" 1.5 gb ", 15 * 10 ** 8), (3e9, 3 * 10 ** 9)])
def test_parse_bytes(text, want):
    assert fit.parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["", "GB", "24XB", "-1GB", "1e400", "nan", "24 G B", "1KB", True])
def test_parse_bytes_refuses(bad):
    with pytest.raises(Q4KError):
        fit.parse_bytes(bad)


def test_choice_fits_and_next_does_not(teacher):
    budget = int(_peak(teacher, 24, 32, 32, True) * 1.1) + 1
    c = fit.fit(teacher, budget, seq=32, student=STUDENT)
    assert c.predicted_peak_bytes * 1.1 <= budget
    assert c.predicted_peak_bytes == _peak(teacher, c.batch, 32, c.chunk_tokens, c.checkpoint_activations)
    nxt = c.next_larger
    assert nxt["batch"] == c.batch + 1 and nxt["predicted_peak_bytes"] * 1.1 > budget
    assert c.batch >= 24                            # batch 24 with the leanest settings fits by construction
    # every setting the search ranks faster than the choice does not fit at this batch
    order = fit._settings({})
    for ck, chunk in order[:order.index((c.checkpoint_activations, c.chunk_tokens))]:
        assert _peak(teacher, c.batch, 32, min(chunk, c.batch * 32), ck) * 1.1 > budget


def test_monotone_in_budget(teacher):
    base = _peak(teacher, 1, 32, 32, True) * 1.1
    batches = [fit.fit(teacher, int(base * f), seq=32, student=STUDENT).batch for f in (1.01, 1.5, 2, 4, 8)]
    assert batches == sorted(batches) and batches[-1] > batches[0]


def test_explicit_settings_win(teacher):
    budget = int(_peak(teacher, 8, 32, 32, True) * 1.1 * 3)
    c = fit.fit(teacher, budget, seq=32, student=STUDENT, fixed={"batch": 3, "checkpoint_activations": True})
    assert (c.batch, c.checkpoint_activations) == (3, True) and c.next_larger is None
    c = fit.fit(teacher, budget, seq=32, student=STUDENT, fixed={"chunk_tokens": 64})
    assert c.chunk_tokens == 64


def test_too_small_budget_is_one_line(teacher):
    with pytest.raises(Q4KError, match="not even one sequence"):
        fit.fit(teacher, 2 ** 20, seq=32, student=STUDENT)
    with pytest.raises(Q4KError, match="does not fit"):
        fit.fit(teacher, int(_peak(teacher, 2, 32, 32, True) * 1.2), seq=32, student=STUDENT, fixed={"batch": 64})


def test_plan_fit_cli_json(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_manifest()))
    assert cli.main(["plan", "--teacher", str(path), "--fit", "200MB", "--seq", "32", "--student", STUDENT, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("batch", "seq", "chunk_tokens", "checkpoint_activations", "predicted_peak_bytes", "budget_bytes"):
        assert key in out
    assert out["budget_bytes"] == 200 * 10 ** 6 and out["predicted_peak_bytes"] * 1.1 <= out["budget_bytes"]
    assert cli.main(["plan", "--teacher", str(path), "--fit", "lots", "--seq", "32"]) == 2
    assert "memory budget 'lots'" in capsys.readouterr().err


def test_apply_budget_keeps_explicit_and_refuses_auto_on_cpu(tmp_path):
    from q4kdistill.train.loop import DistillConfig

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_manifest()))
    cfg = DistillConfig(teacher=str(path), data="demo", seq=32, gpu_memory="300MB", chunk_tokens=64, student_layers=[0, 1])
    got = fit.apply_budget(cfg, explicit={"chunk_tokens"}, log=lambda s: None)
    assert got.chunk_tokens == 64 and got.batch >= 1
    plan = planner.make_plan(planner.open_teacher(str(path)), got.batch, 32, {"layers": [0, 1]}, chunk_tokens=64,
                             checkpoint=got.checkpoint_activations)
    assert plan.distill_step_peak_bytes * 1.1 <= 300 * 10 ** 6
    with pytest.raises(Q4KError, match="needs a GPU"):
        fit.apply_budget(DistillConfig(teacher=str(path), data="demo", gpu_memory="auto"), log=lambda s: None)


def test_fit_budgets_script_tiny(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "fit.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "fit_budgets.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "ok" and r["measured_peak_bytes"] > 0 for r in rows)
