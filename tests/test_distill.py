"""The distillation loop through the CLI, on a tiny synthetic teacher and a small text corpus:
exact resume after Ctrl-C, the config-file form, B > 1, export of a checkpoint, the demo."""
import json
import os
import signal

import numpy as np
import pytest

from q4kdistill import cli
from q4kdistill.student.model import Student
from q4kdistill.train import checkpoint, export
from q4kdistill.train import loop as D

from _helpers_distill import write_corpus, write_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory)


def args(teacher, corpus, out, *extra, steps=6):
    return ["distill", "--teacher", teacher, "--data", corpus, "--out", str(out), "--student-layers", "0,2",
            "--steps", str(steps), "--batch", "3", "--seq", "16", "--lr", "3e-3", "--warmup", "2",
            "--eval-every", "3", "--eval-batches", "2", "--save-every", "100", "--no-progress", *extra]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_after_ctrl_c_is_bit_identical(teacher, corpus, tmp_path, monkeypatch, capsys):
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert cli.main(args(teacher, corpus, straight)) == 0
    assert "teacher-KL" in capsys.readouterr().out                     # the what-was-learned table

    real_step = D.train_step

    def ctrl_c_after_step_3(run, batches):
        record = real_step(run, batches)
        if run.opt.steps == 3:
            os.kill(os.getpid(), signal.SIGINT)                           # as if the user pressed Ctrl-C
        return record

    monkeypatch.setattr(D, "train_step", ctrl_c_after_step_3)
    assert cli.main(args(teacher, corpus, parts)) == 130
    assert "interrupted at step 3" in capsys.readouterr().err
    assert checkpoint.load(parts).step == 3
    monkeypatch.setattr(D, "train_step", real_step)
    assert cli.main(args(teacher, corpus, parts, "--resume")) == 0

    a, b = checkpoint.load(straight), checkpoint.load(parts)
    assert a.step == b.step == 6
    for name, value in a.state["params"].items():
        assert np.array_equal(value, b.state["params"][name]), name
    for key in ("m", "v"):
        assert np.array_equal(a.state["optimizer"][key], b.state["optimizer"][key])
    assert a.state["data"] == b.state["data"]                             # the sampler's position
    assert losses(straight) == losses(parts) and len(losses(parts)) == 6
    assert a.state["evals"] == b.state["evals"]
    start = json.loads(open(straight / "metrics.jsonl").readline())
    assert start["step"] == 0 and start["eval"]["teacher_kl"] > a.state["evals"]["6"]["teacher_kl"]


def test_config_file_and_flags(teacher, corpus, tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"teacher": teacher, "data": corpus, "out": str(tmp_path / "run"),
                                    "student_layers": "1", "steps": 5, "batch": 2, "seq": 8, "loss": "jsd",
                                    "beta": 0.3, "alpha": 0.25, "eval_every": 100, "save_every": 1}))
    assert cli.main(["distill", "--config", str(cfg_file), "--steps", "2", "--no-progress"]) == 0
    ck = checkpoint.load(tmp_path / "run")
    assert ck.step == 2
    assert ck.config["distill"]["seq"] == 8 and ck.config["distill"]["loss"] == "jsd" and ck.config["student"]["n_layers"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"teacher": teacher, "data": corpus, "stepz": 3}))
    assert cli.main(["distill", "--config", str(bad)]) == 2


def test_every_sequence_of_a_batch_trains(teacher):
    """The loss of a [2, T] batch is the mean of its two rows' losses; so are the gradients."""
    from q4kdistill.student.losses import LossConfig
    from q4kdistill.teacher.model import Teacher

    t = Teacher.load(teacher, log=None)
    ids = np.random.default_rng(3).integers(0, t.vocab_size, (2, 9))
    loss_cfg = LossConfig(alpha=0.3)
    student = Student.from_teacher(t, [0, 2])
    both, g, _ = student.loss_and_grads(ids, t.logits_fn(ids), loss_cfg)
    g_both = student.grad_buffer.flat.copy()
    rows = []
    for r in range(2):
        loss, _, _ = student.loss_and_grads(ids[r:r + 1], t.logits_fn(ids[r:r + 1]), loss_cfg)
        rows.append((loss, student.grad_buffer.flat.copy()))
    assert both == pytest.approx((rows[0][0] + rows[1][0]) / 2, rel=1e-5)
    np.testing.assert_allclose(g_both, (rows[0][1] + rows[1][1]) / 2, rtol=1e-3, atol=1e-7)
    assert np.abs(rows[0][1] - rows[1][1]).max() > 1e-4                 # the rows do differ


def test_export_command_runs_in_llama_cpp(teacher, corpus, tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    run = tmp_path / "run"
    assert cli.main(args(teacher, corpus, run, steps=2)) == 0
    out = tmp_path / "student.gguf"
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--type", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    ck = checkpoint.load(run)
    cfg, params = export.read_student(out)
    assert cfg.n_layers == 2 and cfg.swa_layers == ck.config["student"]["swa_layers"]
    assert all(np.array_equal(params[n], v) for n, v in ck.state["params"].items())
    student = Student(cfg)
    for name, view in student.params.items():
        view[...] = params[name]
    ids = [2, 40, 41, 300, 12, 77, 5, 9, 260, 261, 262]
    ours = student.forward(np.array([ids]))[0].astype(np.float64)
    llm = llama_cpp.Llama(str(out), logits_all=True, verbose=False, n_ctx=64, n_threads=2)
    llm.eval(ids)
    ref = np.array(llm.scores[:len(ids)], dtype=np.float64)
    cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() >= 0.9999
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--type", "q2_k"]) == 2


def test_demo_runs_and_reports(tmp_path, capsys):
    """The demo command end to end (synthetic Q4_K teacher, Python's stdlib corpus), cut to 2 steps."""
    assert cli.main(["demo", "--synthetic", "--steps", "2", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "step 0" in out and "step 2" in out and "top-1 agreement" in out
    ck = checkpoint.load(tmp_path / "demo")
    assert ck.step == 2 and ck.config["distill"]["data"] == "demo" and ck.config["student"]["n_layers"] == 2
