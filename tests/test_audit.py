"""Teacher audit: the per-token numbers against float64 formulas, the real gemma-3 file against
itself (KL 0, agreement 100 %) and against a coarsened copy written by our own quantizer (KL > 0)."""
import json

import numpy as np
import pytest

from q4kdistill import cli
from q4kdistill.errors import Q4KError
from q4kdistill.formats import synthetic
from q4kdistill.formats.degrade import coarsen, write_degraded_copy
from q4kdistill.teacher.audit import compare_chunk, summarize

KEYS = {"tokens", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agreement", "ppl_teacher", "ppl_reference"}
TEXT = ("The quick brown fox jumps over the lazy dog. Distillation trains a small student on the outputs "
        "of a large teacher, and here the teacher stays quantized on the GPU.")


def test_compare_chunk_against_direct_formulas():
    rng = np.random.default_rng(0)
    lr, lt = rng.standard_normal((6, 9)).astype(np.float32) * 3, rng.standard_normal((6, 9)).astype(np.float32) * 3
    targets = np.array([3, 1, -1, 8, 0, 2])
    sel = np.array([1, 1, 1, 0, 1, 1], bool)
    kl, agree, nr, nt = compare_chunk(lr, lt, targets, sel)
    p = np.exp(lr.astype(np.float64)) / np.exp(lr.astype(np.float64)).sum(-1, keepdims=True)
    q = np.exp(lt.astype(np.float64)) / np.exp(lt.astype(np.float64)).sum(-1, keepdims=True)
    assert np.allclose(kl, (p * np.log(p / q)).sum(-1)[sel], rtol=1e-10)
    assert np.array_equal(agree, (p.argmax(-1) == q.argmax(-1))[sel])
    has = (targets >= 0) & sel
    assert np.allclose(nr, -np.log(p[has, targets[has]])) and np.allclose(nt, -np.log(q[has, targets[has]]))
    r = summarize(np.array([0.0, 1.0, 2.0, -1e-17]), np.array([1, 0, 1, 1], bool), np.log([2.0, 8.0]), np.log([4.0, 4.0]))
    assert r["kl_mean"] == 0.75 and r["kl_median"] == 0.5 and r["kl_max"] == 2.0 and r["top1_agreement"] == 0.75
    assert r["ppl_reference"] == pytest.approx(4.0) and r["ppl_teacher"] == pytest.approx(4.0)
    assert r["kl_p99"] == pytest.approx(np.percentile([0, 1, 2, 0], 99))
    with pytest.raises(Q4KError):
        summarize(np.zeros(0), np.zeros(0, bool), np.zeros(0), np.zeros(0))


def test_coarsen_puts_each_group_on_its_grid():
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    y = coarsen(x, levels=4, group=16).reshape(3, 4, 16)
    g = x.reshape(3, 4, 16)
    for a, b in zip(y.reshape(-1, 16), g.reshape(-1, 16)):
        assert len(np.unique(a)) <= 4 and np.isclose(a.min(), b.min()) and np.isclose(a.max(), b.max())
    assert np.abs(y - g).max() <= (g.max(-1) - g.min(-1)).max() / 6 + 1e-6    # half a step


@pytest.fixture(scope="module")
def degraded(gemma_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("degraded") / "gemma-coarse.gguf"
    info = write_degraded_copy(gemma_path, out)
    assert len(info["tensors"]) == 27 and info["rms_change"] > 0.05
    return str(out)


def run_audit(capsys, teacher, reference, data):
    assert cli.main(["audit", "--teacher", teacher, "--reference", reference, "--data", str(data), "--seq", "12",
                     "--max-tokens", "12", "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_real_teacher_against_itself_and_a_coarser_copy(gemma_path, degraded, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    same = run_audit(capsys, gemma_path, gemma_path, data)
    assert KEYS <= set(same) and same["tokens"] == 12
    assert same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0 and same["ppl_teacher"] == same["ppl_reference"]
    worse = run_audit(capsys, degraded, gemma_path, data)
    print(json.dumps({k: worse[k] for k in sorted(KEYS)}))               # reported in docs/distill.md
    assert worse["tokens"] == 12 and worse["kl_mean"] > 0.01 and worse["kl_max"] >= worse["kl_p99"] >= worse["kl_median"] > 0
    assert worse["top1_agreement"] < 1.0 and worse["ppl_reference"] == pytest.approx(same["ppl_reference"], rel=1e-12)


def test_user_errors_are_one_line(gemma_path, tmp_path, capsys):
    other = synthetic.write_gguf(tmp_path / "tiny.gguf", synthetic.tiny_config("gemma3"), qtypes={"*": "F32"})
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    for argv, message in ((["--teacher", other, "--reference", gemma_path], "different tokenizers"),
                          (["--teacher", str(tmp_path / "nope.gguf"), "--reference", gemma_path], "no such model file")):
        assert cli.main(["audit", *argv, "--data", str(data)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_gpu_cache_audit_script_tiny(tmp_path):
    """scripts/gpu_cache_audit.py --tiny: the GPU measurement's code path on a tiny manifest (CPU)."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_cache_audit.py")
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, script, "--tiny", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [c["k"] for c in r["cache"]] == [16, 64] and r["cache"][0]["bytes_per_token"] < r["cache"][1]["bytes_per_token"]
    assert r["audit"]["tokens"] == 64 and r["audit"]["top1_agreement"] > 0.9


@pytest.mark.gpu
def test_audit_on_gpu_matches_the_cpu(gemma_path, tmp_path):
    """The real teacher against its coarse copy: the GPU audit's numbers equal the CPU's (float64 softmax)."""
    import cupy

    from q4kdistill.teacher.audit import audit_models, load_audit_data
    from q4kdistill.teacher.model import Teacher
    from q4kdistill.formats.tokenizer import Tokenizer

    coarse = tmp_path / "coarse.gguf"
    write_degraded_copy(gemma_path, coarse)
    data = tmp_path / "t.txt"
    data.write_text(TEXT * 20)
    d = load_audit_data(Tokenizer.from_gguf(gemma_path), str(data), 64, max_tokens=256)
    reports = [audit_models(Teacher.load(coarse, device=dev, log=None), Teacher.load(gemma_path, device=dev, log=None),
                            d, batch=2, progress=False) for dev in ("cpu", "cuda")]
    assert cupy.cuda.runtime.getDeviceCount() >= 1
    for key in ("kl_mean", "kl_p99", "ppl_teacher", "ppl_reference"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=2e-2), key
    assert abs(reports[1]["top1_agreement"] - reports[0]["top1_agreement"]) <= 0.02
