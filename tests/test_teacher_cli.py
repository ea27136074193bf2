"""`q4kdistill logits` and `q4kdistill generate` on a tiny synthetic teacher."""
import json
import subprocess
import sys

import numpy as np
import pytest

from q4kdistill.formats import synthetic
from q4kdistill.cli import main
from q4kdistill.teacher.model import Teacher
from q4kdistill.formats.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = synthetic.tiny_config("gemma3", sliding_window=4)
    path = synthetic.write_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", cfg, qtypes={"token_embd": "Q8_0"}, seed=7)
    return path, Teacher.load(path, device="cpu", log=None)


def test_logits_writes_npy_and_top5_json(tiny, tmp_path, capsys):
    path, teacher = tiny
    tokens = [2, 100, 7, 383, 55]
    out = tmp_path / "logits.npy"
    assert main(["logits", "--teacher", path, "--tokens", ",".join(map(str, tokens)), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert "uploaded" in captured.err                                    # the load line goes to stderr
    saved = np.load(out)
    want = teacher.logits_for_batch(np.array([tokens]))[0]               # [T, V]
    assert saved.dtype == np.float32 and saved.shape == (5, teacher.vocab_size)
    np.testing.assert_allclose(saved, want, rtol=1e-6, atol=1e-6)
    report = json.loads(captured.out)
    assert report["vocab_size"] == teacher.vocab_size and len(report["positions"]) == 5
    for pos, row in enumerate(report["positions"]):
        assert row["token"] == tokens[pos]
        assert row["top_ids"] == np.argsort(-want[pos], kind="stable")[:5].tolist()
        np.testing.assert_allclose(row["top_logits"], np.sort(want[pos])[::-1][:5], atol=1e-4)


def test_logits_table(tiny, capsys):
    path, _ = tiny
    assert main(["logits", "--teacher", path, "--tokens", "2,3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["pos", "token"] and len(lines) == 3


def test_generate_is_greedy(tiny, capsys):
    path, teacher = tiny
    ids = [2, 40, 41]
    assert main(["generate", "--teacher", path, "--tokens", ",".join(map(str, ids)), "-n", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    want = list(ids)
    for _ in range(4):
        nxt = int(teacher.logits_for_batch(np.array([want]))[0, -1].argmax())
        want.append(nxt)
        if nxt == teacher.config.eos_token_id:
            break
    assert report["ids"] == want and report["new_ids"] == want[3:]
    assert report["text"] == Tokenizer.from_gguf(path).decode(want[3:])


@pytest.mark.parametrize("args, message", [
    (["logits", "--tokens", "1,x"], "expected comma-separated integer token ids"),
    (["logits", "--tokens", ","], "at least one token id"),
    (["logits", "--tokens", "1,100000"], "token id 100000 is outside the teacher's vocabulary"),
    (["generate", "--tokens", "1", "-n", "-2"], "-n must be >= 0"),
    (["logits", "--tokens", "1", "--backend", "fp8"], "unknown teacher backend 'fp8'"),
])
def test_user_errors_are_one_line(tiny, capsys, args, message):
    path, _ = tiny
    assert main(args[:1] + ["--teacher", path] + args[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("q4kdistill: error:")


def test_command_modules_import_light():
    code = ("import sys, q4kdistill.cli.logits, q4kdistill.cli.generate; "
            "print([m for m in ('numpy', 'numba', 'gguf', 'kernels', 'q4kdistill.teacher.model') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"

