"""Faults a user can cause end in one clear line and exit status 2, never a traceback."""
import subprocess
import sys

import numpy as np

from q4kdistill import cli

from q4kdistill.train import checkpoint

from q4kdistill.formats import synthetic
from q4kdistill.student.model import Student

from _helpers_distill import DENSE, SMALL
from test_distill import args, corpus, teacher  # noqa: F401  (fixtures)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("q4kdistill: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_missing_and_empty_data(teacher, tmp_path, capsys):
    assert cli.main(args(teacher, str(tmp_path / "nowhere"), tmp_path / "a")) == 2
    assert "nowhere" in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert cli.main(args(teacher, str(tmp_path / "empty"), tmp_path / "b")) == 2
    assert "empty" in error_line(capsys)


def test_missing_teacher_through_the_console_script(corpus, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "q4kdistill", *args(str(tmp_path / "no.gguf"), corpus, tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("q4kdistill: error: ") and "Traceback" not in proc.stderr
    assert "no.gguf" in proc.stderr


def test_non_finite_loss_keeps_the_last_good_checkpoint(teacher, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(args(teacher, corpus, out, "--lr", "1e30", "--warmup", "0", "--clip", "0",
                           "--save-every", "1", steps=20))
    assert status == 2
    line = error_line(capsys)
    step = int(line.split("step ")[1].split(":")[0])
    assert step >= 2 and ("nan" in line or "inf" in line) and "last good checkpoint" in line
    ck = checkpoint.load(out)
    assert ck.step == step - 1
    assert all(np.isfinite(v).all() for v in ck.state["params"].values())


def test_out_of_memory_prints_the_plan(teacher, corpus, tmp_path, monkeypatch, capsys):
    class OutOfMemoryError(Exception):                        # what CuPy raises
        pass

    def no_memory(*a, **k):
        raise OutOfMemoryError("Out of memory allocating 1,073,741,824 bytes (allocated so far: 70 GB).")

    monkeypatch.setattr(Student, "loss_and_grads", no_memory)
    assert cli.main(args(teacher, corpus, tmp_path / "run")) == 2
    line = error_line(capsys)
    assert "out of" in line and "memory at step 1" in line
    assert "planner predicts" in line and "GB" in line and "--batch (now 3)" in line


def test_checkpoint_of_another_configuration_is_refused(teacher, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(teacher, corpus, out, steps=1)) == 0
    capsys.readouterr()
    assert cli.main(args(teacher, corpus, out, steps=1)) == 2            # no --resume: never overwrite
    assert "--resume" in error_line(capsys)
    changed = args(teacher, corpus, out, "--resume", steps=2)
    changed[changed.index("--seq") + 1] = "8"
    assert cli.main(changed) == 2
    assert "another configuration" in (line := error_line(capsys)) and "seq: checkpoint 16, now 8" in line


def test_vocabulary_mismatch(teacher, corpus, tmp_path, capsys):
    """A student started from a smaller-vocabulary model: refused, unless --truncate-vocab, and
    then only for data whose ids the smaller vocabulary holds."""
    small = synthetic.write_gguf(tmp_path / "small.gguf", synthetic.tiny_config("gemma3", **{**SMALL, "n_layers": 1},
                                                                                 vocab_size=360), qtypes=DENSE)
    run = args(teacher, corpus, tmp_path / "run", "--student-init", small, steps=2)
    assert cli.main(run) == 2
    line = error_line(capsys)
    assert "vocabulary mismatch" in line and "384" in line and "360" in line and "--truncate-vocab" in line
    assert cli.main(run + ["--truncate-vocab"]) == 2                      # the words corpus uses ids up to 38x
    assert "outside the student's vocabulary of 360" in error_line(capsys)
    letters = tmp_path / "letters"
    letters.mkdir()
    for i in range(6):                                     # digits: byte tokens and "\u2581", ids below 300
        (letters / f"{i}.txt").write_text(" ".join(str(i * j) for j in range(300)))
    run = args(teacher, str(letters), tmp_path / "run2", "--student-init", small, "--truncate-vocab", steps=2)
    assert cli.main(run) == 0
    assert checkpoint.load(tmp_path / "run2").config["student"]["vocab_size"] == 360
