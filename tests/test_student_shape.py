"""A student of any shape (student/spec.py): --student-shape parsing and presets, the ModelConfig
it makes from a teacher, and the same flag through distill, plan and reproduce-memory."""
import json
import math

import numpy as np
import pytest

from q4kdistill import cli
from q4kdistill.errors import Q4KError
from q4kdistill.formats import synthetic
from q4kdistill.memory import planner
from q4kdistill.student.spec import PRESETS, count_params, parse_student_shape, parse_student_spec, student_config
from q4kdistill.train import loop as D

QWEN2_05B = dict(n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864)


def test_shape_of_the_issue_and_its_preset():
    got = parse_student_shape("layers=24,d_model=896,heads=14,kv_heads=2,head_dim=64,d_ff=4864")
    assert got == QWEN2_05B                                   # layers= is a count here
    assert parse_student_shape("qwen2-0.5b") == dict(QWEN2_05B, tied=1)
    assert parse_student_shape(" Qwen2-0.5B , layers=12 ,n_kv_heads=7") == dict(QWEN2_05B, tied=1, n_layers=12, n_kv_heads=7)
    assert parse_student_spec("qwen2-0.5b,layers=12")["n_layers"] == 12      # --student takes presets too
    assert parse_student_spec("layers=12") == {"layers": [12]}               # ... where layers= stays block numbers


@pytest.mark.parametrize("text, message", [
    ("qwen9-7b", "unknown preset 'qwen9-7b'"), ("layers=2,width=8", "unknown key 'width'"),
    ("d_model=8.5", "d_model must be a whole number"), ("", "give a preset"), (" , ", "give a preset")])
def test_bad_shapes_are_one_line_errors(text, message):
    with pytest.raises(Q4KError, match=message):
        parse_student_shape(text)


def test_presets_from_the_7b_teacher_keep_its_family_and_vocabulary(manifest_7b_path):
    teacher = planner.open_teacher(manifest_7b_path).config
    cfg = student_config(teacher, parse_student_shape("qwen2-0.5b"))
    assert (cfg.architecture, cfg.vocab_size, cfg.qkv_bias, cfg.rope_base) == ("qwen2", teacher.vocab_size, True,
                                                                                 teacher.rope_base)
    assert cfg.tied_output and not teacher.tied_output
    # Qwen2-0.5B's published count (494,032,768 at vocab 151,936) + 128 more embedding rows of 896
    assert count_params(cfg) == 494_032_768 + (teacher.vocab_size - 151_936) * 896
    for name in PRESETS:
        c = student_config(teacher, parse_student_shape(name))
        assert c.n_heads % c.n_kv_heads == 0 and c.vocab_size == teacher.vocab_size
    with pytest.raises(Q4KError, match="not a multiple"):
        student_config(teacher, parse_student_shape("qwen2-0.5b,kv_heads=3"))


def test_a_gemma3_student_of_another_width_rescales_its_embeddings():
    teacher = synthetic.tiny_config("gemma3")
    cfg = student_config(teacher, parse_student_shape("layers=2,d_model=48,heads=2,kv_heads=1,head_dim=24,d_ff=96"))
    assert cfg.embed_scale == pytest.approx(math.sqrt(48)) and cfg.qk_norm and cfg.post_norms
    assert all(i < 2 for i in cfg.swa_layers)


def test_plan_accepts_the_shape(manifest_7b_path, capsys):
    args = ["plan", "--teacher", manifest_7b_path, "--batch", "8", "--seq", "512", "--json"]
    assert cli.main(args + ["--student-shape", "qwen2-0.5b", "--precision", "fp32"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert cli.main(args + ["--student-shape", "layers=24,d_model=896,heads=14,kv_heads=2,head_dim=64,d_ff=4864,tied=1"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert fp32["student"]["n_params"] == bf16["student"]["n_params"] == 494_147_456
    rows = {r["name"]: r["predicted_bytes"] for r in bf16["rows"]}
    n_matrix = 494_147_456 - sum(24 * n for n in (896 * 2, 896 + 2 * 128)) - 896   # minus norms and biases
    assert rows["student bf16 weight copy"] == 2 * n_matrix
    assert {r["name"]: r["predicted_bytes"] for r in fp32["rows"]}["student bf16 weight copy"] == 0
    assert cli.main(args + ["--student-shape", "tiny", "--student", "n_layers=2"]) == 2
    assert "give one of --student, --student-shape" in capsys.readouterr().err


def test_reproduce_memory_tiny_takes_the_shape(capsys):
    assert cli.main(["reproduce-memory", "--tiny", "--student-shape", "tiny,layers=1", "--backends", "native",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["student"]["config"]["n_layers"] == 1 and report["student"]["precision"] == "fp32"   # CPU: auto is fp32


@pytest.fixture(scope="module")
def teacher_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shape")
    teacher = synthetic.write_gguf(root / "t.gguf", synthetic.tiny_config("qwen2", n_layers=2), seed=2)
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(synthetic._WORDS, 9)) + "." for _ in range(30)))
    return teacher, str(root)


def test_distill_a_fresh_student_of_a_given_shape(teacher_and_corpus, tmp_path, capsys):
    teacher, corpus = teacher_and_corpus
    shape = "layers=3,d_model=32,heads=4,kv_heads=2,head_dim=8,d_ff=48"
    argv = ["distill", "--teacher", teacher, "--data", corpus, "--out", str(tmp_path / "run"), "--student-shape", shape,
            "--precision", "bf16", "--steps", "3", "--batch", "2", "--seq", "16", "--eval-every", "3",
            "--eval-batches", "1", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "student: 3 blocks" in out and "bf16" in out
    run = D.setup(D.DistillConfig(teacher=teacher, data=corpus, student_shape=shape, precision="bf16"), log=lambda s: None)
    cfg = run.student.config
    assert (cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size) == (3, 32, 48, run.teacher.vocab_size)
    assert run.student.prec.name == "bf16"


@pytest.mark.parametrize("extra, message", [
    (["--student-shape", "tiny", "--student-layers", "0"], "give --student-layers or --student-shape, not both"),
    (["--student-shape", "tiny,depth=3"], "unknown key 'depth'"),
    (["--precision", "fp16"], "--precision = 'fp16': expected one of auto, bf16, fp32")])
def test_distill_flag_errors_exit_2(teacher_and_corpus, tmp_path, capsys, extra, message):
    teacher, corpus = teacher_and_corpus
    argv = ["distill", "--teacher", teacher, "--data", corpus, "--out", str(tmp_path / "x"), "--no-progress", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
