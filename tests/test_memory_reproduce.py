"""`q4kdistill reproduce-memory`: the whole experiment on a tiny teacher (CPU: host stand-in
meter), out-of-memory handling per section, and the optional plot."""
import json
import sys

import pytest

from q4kdistill import backend, cli

from q4kdistill.memory import planner
from q4kdistill.memory import reproduce as rm

ROWS = {f"teacher {what} ({b})" for what in ("resident", "load peak", "forward peak")
        for b in ("native", "dequant-f32", "dequant-bf16")}
ROWS |= {"teacher decode scratch (native)", "distill: teacher trunk peak", "distill: student forward/backward peak", "distill: optimizer step peak",
         "distill step peak"}


def test_tiny_run_measures_every_row(tmp_path, capsys):
    png = tmp_path / "memory.png"
    assert cli.main(["reproduce-memory", "--tiny", "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == ROWS
    assert all(r["status"] == "ok" and r["measured_bytes"] is not None for r in rows.values())
    assert all(r["measured_bytes"] > 0 for name, r in rows.items() if "scratch" not in name)   # CPU: no scratch
    assert report["counter"] == ("cupy-pool" if backend.on_gpu() else "host-tracemalloc")
    # what Teacher.load keeps is what the planner counts (host arrays are seen exactly by tracemalloc)
    for b in ("native", "dequant-f32", "dequant-bf16"):
        assert 0.95 < rows[f"teacher resident ({b})"]["ratio"] < 1.05, rows[f"teacher resident ({b})"]
    assert [p["name"] for p in report["phases"]].count("distill step") == 2
    claims = {c["claim"]: c["result"] for c in report["claims"]}
    assert claims["native resident <= 1.02 x tensor bytes"] == "PASS"
    assert [claims[text] for *_, text in rm.CLAIMS_7B] == ["SKIP", "SKIP"]
    assert sum(c.startswith("prediction within") for c in claims) == len(ROWS)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "PASS  native resident" in rm.format_report(report)


def test_long_step_rows_are_measured_beside_the_step(capsys):
    """--long-step BxT: the step's four rows again at that shape, named with it, each predicted by a plan
    at that shape and measured; a malformed shape is one line and exit 2."""
    assert cli.main(["reproduce-memory", "--tiny", "--backends", "native", "--long-step", "1x64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["rows"]}
    steps = [name for name in ROWS if name.startswith("distill")]
    assert {f"{name} (1x64)" for name in steps} <= set(rows)
    assert all(rows[f"{name} (1x64)"]["measured_bytes"] for name in steps)
    long_plan = {r["name"]: r["predicted_bytes"] for r in report["plans"]["long step"]["rows"]}
    assert all(rows[f"{name} (1x64)"]["predicted_bytes"] == long_plan[name] for name in steps)
    assert report["long_step"] == "1x64" and [p["name"] for p in report["phases"]].count("distill step") == 4
    assert cli.main(["reproduce-memory", "--tiny", "--long-step", "8by512"]) == 2
    assert "--long-step: expected BxT like 8x512" in capsys.readouterr().err


def test_out_of_memory_becomes_a_row_result(monkeypatch):
    from q4kdistill.teacher.model import Teacher

    class OutOfMemoryError(MemoryError):       # what CuPy raises
        pass

    real_load = Teacher.load

    def load(source, backend="auto", **kw):
        if backend == "dequant-f32":
            raise OutOfMemoryError("Out of memory allocating 30,462,466,048 bytes")
        return real_load(source, backend=backend, **kw)

    monkeypatch.setattr(Teacher, "load", staticmethod(load))
    report = rm.reproduce(rm.tiny_manifest(), seq=16, step_batch=1, student=rm.TINY["student"],
                          backends=("dequant-f32", "dequant-bf16"), log=lambda line: None)
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["teacher resident (dequant-f32)"]["status"] == "oom"
    assert "30,462,466,048" in rows["teacher forward peak (dequant-f32)"]["note"]
    assert rows["teacher resident (dequant-bf16)"]["status"] == "ok"
    assert rows["distill step peak"]["status"] == "not run"
    claims = {c["claim"]: c["result"] for c in report["claims"]}
    assert claims["dequant-f32 resident = 4 bytes x elements (~30 GB at 7B)"] == "SKIP"


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    said = []
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = {"rows": [], "counter": "host-tracemalloc", "device": "cpu", "date": "today"}
    assert rm.plot(report, tmp_path / "x.png", said.append) is False
    assert "pip install 'q4kdistill[plot]'" in said[0] and not (tmp_path / "x.png").exists()


def test_tiny_manifest_is_a_valid_teacher():
    info = planner.open_teacher(rm.tiny_manifest())
    assert info.config.architecture == "qwen2" and info.config.n_layers == 2 and not info.config.tied_output
    assert {t.type_name for t in info.tensors.values()} == {"Q4_K", "Q6_K", "F32"}


@pytest.mark.gpu
def test_tiny_run_on_the_gpu_counts_pool_bytes(capsys):
    assert cli.main(["reproduce-memory", "--tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counter"] == "cupy-pool"
    native = {r["name"]: r for r in report["rows"]}["teacher resident (native)"]
    assert native["measured_bytes"] >= native["predicted_bytes"]          # the pool rounds up to 512 bytes
    assert native["measured_bytes"] < native["predicted_bytes"] + 512 * 32


def test_within_compares_to_the_measurement_and_a_zero_row_only_to_zero():
    from q4kdistill.memory.reproduce import within

    assert within(0, 0) and not within(5, 0)
    assert within(109, 100) and within(91, 100) and not within(111, 100) and not within(89, 100)
