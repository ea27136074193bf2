"""Data-parallel distillation on the CPU: W ranks as threads of one process (distributed.LocalGroup,
NCCL's interface over NumPy) against the 1-rank run at the same global batch; faults on one rank
stop every rank; resume on the same and on another rank count; the CLI's --gpus."""
import json
import os
import threading
import traceback

import numpy as np
import pytest

from q4kdistill import cli
from q4kdistill.errors import Q4KError
from q4kdistill.formats import synthetic
from q4kdistill.student.model import Student
from q4kdistill.train import checkpoint
from q4kdistill.train import distributed as dist
from q4kdistill.train import loop as D

from _helpers_distill import write_corpus, write_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory)


def config(teacher, corpus, out, steps=20, **kw):
    return D.DistillConfig(**{**dict(teacher=str(teacher), data=corpus, out=str(out), student_layers=[0, 2],
                                     steps=steps, batch=6, seq=16, lr=3e-3, warmup=2, eval_every=10,
                                     eval_batches=1, save_every=100, precision="fp32"), **kw})


def run_ranks(world, cfg, resume=False):
    """distill(cfg) on ``world`` thread ranks -> (summaries or exceptions, one per rank)."""
    group, out = dist.LocalGroup(world, timeout=300), [None] * world

    def body(r):
        try:
            out[r] = D.distill(cfg, resume=resume, progress=False, log=lambda *a: None, comm=group.communicator(r))
        except BaseException as exc:        # a rank's error is the test's to check
            out[r] = exc

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return out


def steps_of(got):
    """Each rank's last step; a rank's exception fails the test with that rank's traceback."""
    for rank, g in enumerate(got):
        if isinstance(g, BaseException):
            raise AssertionError(f"rank {rank} raised:\n" + "".join(traceback.format_exception(g)))
    return [g["step"] for g in got]


def step_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_state(a, b, exact):
    for name, value in a.state["params"].items():
        if exact:
            assert np.array_equal(value, b.state["params"][name]), name
        else:
            np.testing.assert_allclose(b.state["params"][name], value, rtol=1e-3, atol=1e-4, err_msg=name)  # AdamW amplifies rounding
    assert a.state["data"] == b.state["data"]                    # the sampler's position: same data order


@pytest.fixture(scope="module")
def one_rank(teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    summary = D.distill(config(teacher, corpus, out), progress=False, log=lambda *a: None)
    return out, summary


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_one_rank_after_20_steps(teacher, corpus, tmp_path, one_rank, world):
    ref_out, ref = one_rank
    got = run_ranks(world, config(teacher, corpus, tmp_path))
    assert steps_of(got) == [20] * world
    a, b = step_losses(ref_out), step_losses(tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert abs(b[step] - a[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    assert_same_state(checkpoint.load(ref_out), checkpoint.load(tmp_path), exact=False)
    for key in ("teacher_kl", "top1_agreement"):                 # rank 0's held-out evaluation
        assert got[0]["evals"]["20"][key] == pytest.approx(ref["evals"]["20"][key], rel=1e-4)
    assert [g["evals"] for g in got[1:]] == [{}] * (world - 1)  # the others neither evaluate nor write
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(ref_out))


def test_local_share_of_the_loss_sums_to_the_batch_loss(teacher):
    """token_counts: each half of a batch normalised by the whole batch's counts -> the halves'
    losses and grads sum to the whole batch's (with a loss mask, so rows hold unequal counts)."""
    t = __import__("q4kdistill.teacher.model", fromlist=["Teacher"]).Teacher.load(str(teacher))
    s = Student.from_teacher(t, [0, 2], precision="fp32")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, s.config.vocab_size, (4, 8)).astype(np.int32)
    mask = rng.random((4, 8)) < 0.6
    logits = rng.standard_normal((4, 8, s.config.vocab_size)).astype(np.float32)
    from q4kdistill.student.losses import LossConfig, token_weights

    cfg = LossConfig(alpha=0.3)
    whole, _, _ = s.loss_and_grads(ids, logits, cfg, loss_mask=mask)
    g_whole = s.grad_buffer.flat.copy()
    w = token_weights(ids, None, cfg, mask)
    total, g_sum = 0.0, np.zeros_like(g_whole)
    for rows in (slice(0, 1), slice(1, 4)):
        part, _, _ = s.loss_and_grads(ids[rows], logits[rows], cfg, loss_mask=mask[rows],
                                      token_counts=(w["n_kd"], w["n_ce"]))
        total += part
        g_sum += s.grad_buffer.flat
    assert total == pytest.approx(whole, rel=1e-5)
    np.testing.assert_allclose(g_sum, g_whole, rtol=1e-4, atol=1e-7)


def _fail_on(monkeypatch, rank_name, at_step, make):
    """Student.loss_and_grads on thread ``rank_name`` at its ``at_step``-th call: ``make()``'s result."""
    real, calls = Student.loss_and_grads, {}

    def patched(self, *a, **k):
        me = threading.current_thread().name
        calls[me] = calls.get(me, 0) + 1
        result = real(self, *a, **k)
        if me == rank_name and calls[me] == at_step:
            return make(result)
        return result

    monkeypatch.setattr(Student, "loss_and_grads", patched)


def test_non_finite_loss_on_one_rank_stops_all(teacher, corpus, tmp_path, monkeypatch):
    _fail_on(monkeypatch, "rank1", 5, lambda r: (float("nan"), r[1], r[2]))
    got = run_ranks(2, config(teacher, corpus, tmp_path, steps=8, save_every=3))
    assert isinstance(got[0], D.NonFiniteLoss) and "step 5" in str(got[0]) and "step 3" in str(got[0])
    assert isinstance(got[1], dist.StoppedByPeer)                 # quiet: the CLI prints rank 0's line only
    assert checkpoint.load(tmp_path).step == 3                     # the last good checkpoint is kept
    assert max(step_losses(tmp_path)) == 4


def test_exception_on_one_rank_stops_all(teacher, corpus, tmp_path, monkeypatch):
    def oom(result):
        raise MemoryError("simulated: cannot allocate 2 GB")

    _fail_on(monkeypatch, "rank2", 4, oom)
    got = run_ranks(3, config(teacher, corpus, tmp_path, steps=8, save_every=2))
    assert isinstance(got[2], Q4KError) and "out of host memory at step 4" in str(got[2])
    assert all(isinstance(g, dist.StoppedByPeer) for g in got[:2]), got
    assert checkpoint.load(tmp_path).step == 2


def ctrl_c_on_rank0(monkeypatch, after_step):
    """Rank 0's Ctrl-C flag set once its step ``after_step`` is done (what the SIGINT handler sets); the
    ranks agree on it in the next step, which every rank finishes before they all stop."""
    real = D.train_step

    def step(run, batches):
        record = real(run, batches)
        if run.comm.rank == 0 and run.opt.steps == after_step:
            run.interrupt.requested = True
        return record

    monkeypatch.setattr(D, "train_step", step)
    return real


def test_ctrl_c_on_rank_0_stops_all_after_the_step_with_a_checkpoint(teacher, corpus, tmp_path, monkeypatch):
    ctrl_c_on_rank0(monkeypatch, 3)
    got = run_ranks(2, config(teacher, corpus, tmp_path, steps=10))
    assert steps_of(got) == [4, 4] and all(g["interrupted"] for g in got)
    assert checkpoint.load(tmp_path).step == 4


def test_resume_on_the_same_count_is_bit_identical_and_on_another_equal_to_rounding(teacher, corpus, tmp_path,
                                                                                     monkeypatch):
    straight, parts, other = tmp_path / "straight", tmp_path / "parts", tmp_path / "other"
    assert steps_of(run_ranks(2, config(teacher, corpus, straight, steps=8))) == [8, 8]
    real = ctrl_c_on_rank0(monkeypatch, 3)                        # stopped after step 4 (same schedule: 8 steps)
    assert steps_of(run_ranks(2, config(teacher, corpus, parts, steps=8))) == [4, 4]
    assert steps_of(run_ranks(2, config(teacher, corpus, other, steps=8))) == [4, 4]   # also stopped after 4
    monkeypatch.setattr(D, "train_step", real)
    got = run_ranks(2, config(teacher, corpus, parts, steps=8), resume=True)
    assert steps_of(got) == [8, 8]
    assert_same_state(checkpoint.load(straight), checkpoint.load(parts), exact=True)
    a, b = checkpoint.load(straight), checkpoint.load(parts)
    for key in ("m", "v"):
        assert np.array_equal(a.state["optimizer"][key], b.state["optimizer"][key])

    got = run_ranks(3, config(teacher, corpus, other, steps=8), resume=True)   # 2 ranks -> 3
    assert steps_of(got) == [8, 8, 8]
    assert_same_state(a, checkpoint.load(other), exact=False)
    la, lb = step_losses(straight), step_losses(other)
    assert all(abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]) for s in range(1, 9))


CHAT = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}you say {{ m.content }}\n"
        "{% else %}model says {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}model says {% endif %}")


def test_chat_masks_through_a_teacher_cache_match_one_rank(tmp_path, capsys):
    """Instruction data (rows with unequal trained-token counts) from a teacher cache (targets looked up
    by each rank's sequence numbers): 2 ranks equal 1 at the same global batch."""
    small = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
    tok = synthetic.default_tokenizer("gemma3", synthetic.tiny_config("gemma3", **small).vocab_size)
    tok["tokenizer.chat_template"] = CHAT
    teacher = synthetic.write_gguf(tmp_path / "t.gguf", synthetic.tiny_config("gemma3", **small), qtypes={"*": "F32"},
                                   seed=2, tokenizer=tok)
    rng = np.random.default_rng(0)
    data = tmp_path / "chat"
    data.mkdir()
    for i in range(4):
        with open(data / f"c{i}.jsonl", "w") as f:
            for _ in range(12):
                say = lambda n: " ".join(rng.choice(synthetic._WORDS, n))   # noqa: E731
                f.write(json.dumps({"prompt": say(int(rng.integers(2, 9))), "completion": say(int(rng.integers(2, 6)))}) + "\n")
    cache = tmp_path / "cache"
    assert cli.main(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(cache),
                     "--top-k", "8", "--seq", "12", "--heldout", "0.4", "--no-progress"]) == 0
    capsys.readouterr()
    cfg = lambda out: D.DistillConfig(teacher=str(teacher), teacher_cache=str(cache), out=str(out),   # noqa: E731
                                      student_layers=[1], steps=6, batch=4, seq=12, lr=3e-3, eval_every=6,
                                      eval_batches=1, precision="fp32")
    D.distill(cfg(tmp_path / "one"), progress=False, log=lambda *a: None)
    got = run_ranks(2, cfg(tmp_path / "two"))
    assert steps_of(got) == [6, 6]
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a), (a, b)


def test_batch_must_split_evenly(teacher, corpus, tmp_path):
    got = run_ranks(4, config(teacher, corpus, tmp_path))         # 6 sequences over 4 ranks
    assert all(isinstance(g, Q4KError) and "--batch 6 does not split evenly over 4" in str(g) for g in got)


def test_cli_gpus_without_gpus_refuses_with_one_line(teacher, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["distill", "--teacher", str(teacher), "--data", corpus, "--out", str(tmp_path), "--batch", "4",
            "--no-progress"]
    assert cli.main(base + ["--gpus", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "--gpus 2: this machine has" in err[0]
    assert cli.main(base + ["--gpus", "3"]) == 2
    assert "--batch 4 does not split evenly over 3" in capsys.readouterr().err
    assert cli.main(base + ["--gpus", "0"]) == 2
    assert "gpus" in capsys.readouterr().err
    assert cli.main(base + ["--gpus", "2", "--gpu-memory", "24GB"]) == 2
    assert "--gpu-memory does not apply to 2 GPUs" in capsys.readouterr().err
    with pytest.raises(Q4KError, match="one process per GPU"):       # the Python API without ranks
        D.distill(config(teacher, corpus, tmp_path / "api", gpus=2), progress=False)


@pytest.mark.gpu
def test_nccl_world_of_one_equals_the_plain_run(teacher, corpus, tmp_path, monkeypatch):
    """The NCCL communicator (world of 1, forced) through the data-parallel step equals the plain run."""
    pytest.importorskip("cupy")
    from q4kdistill import backend

    if not backend.on_gpu():
        pytest.skip("needs a GPU")
    plain = D.distill(config(teacher, corpus, tmp_path / "plain", steps=5), progress=False, log=lambda *a: None)
    monkeypatch.setenv("Q4KDISTILL_FORCE_NCCL", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", str(dist.free_port()))
    comm = dist.from_environment()
    assert isinstance(comm, dist.NcclCommunicator)
    monkeypatch.setattr(comm, "world_size", 2)          # take the data-parallel branch ...
    monkeypatch.setattr(dist, "local_rows", lambda batch, c: slice(0, batch))   # ... over the whole batch
    nccl = D.distill(config(teacher, corpus, tmp_path / "nccl", steps=5), progress=False, log=lambda *a: None,
                     comm=comm)
    comm.close()
    a, b = step_losses(tmp_path / "plain"), step_losses(tmp_path / "nccl")
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), step
    assert plain["step"] == nccl["step"] == 5


def test_plan_per_gpu_is_the_one_gpu_plan_of_the_share(capsys):
    """plan --gpus N: one GPU's bytes, the whole teacher and student state with B/N sequences."""
    from q4kdistill.memory import planner

    manifest = os.path.join(os.path.dirname(planner.__file__), "..", "data",
                            "deepseek-r1-distill-qwen-7b-q4_k_m.manifest.json")
    whole = planner.make_plan(manifest, 16, 512, "params=0.5e9", checkpoint=False)
    one_of_two = planner.make_plan(manifest, 16, 512, "params=0.5e9", checkpoint=False, gpus=2)
    share = planner.make_plan(manifest, 8, 512, "params=0.5e9", checkpoint=False)
    assert one_of_two.distill_step_peak_bytes == share.distill_step_peak_bytes < whole.distill_step_peak_bytes
    assert one_of_two.row("student state").predicted_bytes == whole.row("student state").predicted_bytes
    assert one_of_two.to_json()["global_batch"] == 16 and one_of_two.to_json()["gpus"] == 2
    assert cli.main(["plan", "--teacher", manifest, "--batch", "16", "--gpus", "2", "--student-params", "0.5e9"]) == 0
    assert "per GPU of 2 (global batch 16): batch 8" in capsys.readouterr().out
    assert cli.main(["plan", "--teacher", manifest, "--batch", "6", "--gpus", "4"]) == 2
    assert capsys.readouterr().err.strip() == ("q4kdistill: error: --batch 6 does not split evenly over 4 GPUs: "
                                               "give a multiple of 4")


@pytest.mark.gpu
def test_cli_gpus_2_matches_one_gpu_after_20_steps(teacher, corpus, tmp_path):
    """The issue's target on a machine with 2+ GPUs: `distill --gpus 2` (launched ranks, NCCL) against
    one GPU at the same global batch, fp32 student: every loss within 1e-5 relative."""
    import subprocess
    import sys

    if dist.gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    base = [sys.executable, "-m", "q4kdistill", "distill", "--teacher", str(teacher), "--data", corpus,
            "--student-layers", "0,2", "--steps", "20", "--batch", "8", "--seq", "64", "--lr", "3e-3",
            "--eval-every", "10", "--eval-batches", "1", "--precision", "fp32", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    for out, extra in ((tmp_path / "one", []), (tmp_path / "two", ["--gpus", "2"])):
        proc = subprocess.run(base + ["--out", str(out)] + extra, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a), (a, b)
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))
