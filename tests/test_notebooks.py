"""The notebooks run headless, top to bottom, and fail on any error.

On the CPU they run with SIZE = "cpu" (tiny shapes; the Numba CUDA simulator for kernels);
`pytest -m gpu` runs them at full size on a GPU. Each notebook checks its own results with
asserts (hand decode == reference decoder, kernel == float64 reference, ...), so running it is
the test. The committed files must also be exactly what scripts/make_notebooks.py writes:
no outputs, no execution counts.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CPU_TIMEOUT_S = 600          # per cell (generous: a busy machine); all four take ~3 minutes on 2 idle cores
GPU_TIMEOUT_S = 1800


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _execute(path: Path, size: str, out_dir: Path, monkeypatch, timeout: int):
    from nbclient import NotebookClient

    monkeypatch.setenv("Q4KDISTILL_NB_SIZE", size)
    monkeypatch.setenv("Q4KDISTILL_NB_OUT", str(out_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()                 # raises CellExecutionError on the first failing cell
    return nb


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


def test_all_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_q4k_format.ipynb", "02_kernel_variants.ipynb",
                                          "03_memory_budget.ipynb", "04_distill.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_generated(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"
    assert path.read_text() == _generator().text(path.name), \
        f"{path.name} differs from scripts/make_notebooks.py: run `python scripts/make_notebooks.py`"


def test_a_failing_cell_fails_the_run(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="Q4KDISTILL_NB_SIZE must be"):
        _execute(NOTEBOOKS[0], "tiny", tmp_path, monkeypatch, CPU_TIMEOUT_S)   # the parameter cell refuses it


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu(path, tmp_path, monkeypatch):
    nb = _execute(path, "cpu", tmp_path, monkeypatch, CPU_TIMEOUT_S)
    assert "SIZE=cpu" in _stdout(nb)
    assert list(tmp_path.glob("*.png")), f"{path.name} drew no figure"


@pytest.mark.gpu
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_gpu_at_full_size(path, tmp_path, monkeypatch):
    nb = _execute(path, "gpu", tmp_path, monkeypatch, GPU_TIMEOUT_S)
    assert "SIZE=gpu" in _stdout(nb)
    assert list(tmp_path.glob("*.png")), f"{path.name} drew no figure"
