"""Offline teacher cache: id packing, the teacher's top-k and rest mass against float64, the sparse
(k + 1 class) loss against finite differences and direct formulas, cache-teacher (resumable, atomic
shards, --json), and distill --teacher-cache (no teacher loaded, bit-identical resume)."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from q4kdistill import cli
from q4kdistill.errors import Q4KError
from q4kdistill.formats import synthetic
from q4kdistill.student.losses import LossConfig, SparseTargets, chunk_loss, kd_rows, log_softmax, sparse_kd_rows
from q4kdistill.student.ops.gradcheck import numeric_grad, rel_error
from q4kdistill.train import checkpoint
from q4kdistill.train import loop as D
from q4kdistill.train import teacher_cache as TC


@pytest.mark.parametrize("bits", [1, 5, 8, 13, 16, 18, 20])
def test_pack_ids_round_trip(bits):
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 2 ** bits, 1001).astype(np.uint32)
    ids[:2] = [0, 2 ** bits - 1]
    packed = TC.pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-1001 * bits // 8)
    assert np.array_equal(TC.unpack_ids(packed, bits, 1001), ids)
    assert TC.id_bits(262144) == 18 and TC.id_bits(65536) == 16 and TC.id_bits(151936) == 18


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_logprobs_against_float64(temperature):
    rng = np.random.default_rng(0)
    t = (rng.standard_normal((7, 50)) * 3).astype(np.float32)
    ids, logp, rest = TC.top_k_logprobs(t, 5, temperature)
    lp = log_softmax(t.astype(np.float64) / temperature)
    want = np.argsort(-lp, axis=-1)[:, :5]
    assert np.array_equal(ids, want)
    assert np.allclose(logp, np.take_along_axis(lp, want, -1), atol=1e-5)
    assert np.allclose(rest, np.log1p(-np.exp(np.take_along_axis(lp, want, -1)).sum(-1)), atol=1e-5)


def sparse_sample(seed, n=5, V=13, k=4, scale=2.0):
    rng = np.random.default_rng(seed)
    s, t = rng.standard_normal((n, V)) * scale, rng.standard_normal((n, V)) * scale
    ids, logp, rest = TC.top_k_logprobs(t, k)
    return s, t, SparseTargets(ids, np.concatenate([logp, rest[:, None]], -1).astype(np.float64))


@pytest.mark.parametrize("cfg", [LossConfig("kl"), LossConfig("rkl", temperature=1.0), LossConfig("jsd", beta=0.3),
                                 LossConfig("skl", skew_alpha=0.2), LossConfig("srkl", skew_alpha=0.2), LossConfig("tvd")],
                         ids=lambda c: c.kind)
def test_sparse_loss_gradient(cfg):
    s, _, sp = sparse_sample(1)
    rows, ds = sparse_kd_rows(s, sp, cfg)
    assert np.all(rows > 0)
    num = numeric_grad(lambda: sparse_kd_rows(s, sp, cfg)[0].sum(), s)
    assert rel_error(ds, num) <= 1e-6


def test_sparse_kl_is_the_kl_of_the_grouped_distributions():
    s, t, sp = sparse_sample(2)
    rows, _ = sparse_kd_rows(s, sp, LossConfig("kl"))
    lq, lp = log_softmax(s), log_softmax(t)
    for i in range(len(s)):
        K = sp.ids[i]
        outside = np.setdiff1d(np.arange(s.shape[1]), K)
        p = np.append(np.exp(lp[i, K]), np.exp(lp[i, outside]).sum())
        q = np.append(np.exp(lq[i, K]), np.exp(lq[i, outside]).sum())
        assert rows[i] == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-6)
    full, _ = kd_rows(s, t, LossConfig("kl"))
    assert np.all(rows <= full + 1e-12)                       # grouping never increases a KL
    all_ids = SparseTargets(np.argsort(-t, -1), np.concatenate([np.sort(lp, -1)[:, ::-1], np.full((5, 1), -np.inf)], -1))
    assert np.allclose(sparse_kd_rows(s, all_ids, LossConfig("kl"))[0], full, rtol=1e-12)   # k = V: the full KL


def test_chunk_loss_dispatches_sparse_targets():
    s, _, sp = sparse_sample(3)
    kd, _, ds = chunk_loss(s, sp, np.full(5, -1), np.full(5, 0.2), np.zeros(5), LossConfig("kl"))
    rows, d = sparse_kd_rows(s, sp, LossConfig("kl"))
    assert np.array_equal(kd, rows) and np.allclose(ds, 0.2 * d)


# -- the command and training from the cache ------------------------------------------------------

SMALL = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "t.gguf"
    return synthetic.write_gguf(path, synthetic.tiny_config("gemma3", **SMALL), qtypes={"*": "F32"}, seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    for i in range(5):
        (root / f"d{i}.txt").write_text(" ".join(rng.choice(synthetic._WORDS, 300)))
    return str(root)


def cache_args(teacher, corpus, out, k=8):
    return ["cache-teacher", "--teacher", teacher, "--data", corpus, "--out", str(out), "--top-k", str(k),
            "--seq", "16", "--heldout", "0.2", "--json", "--no-progress"]


@pytest.fixture(scope="module")
def cache(teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    assert cli.main(cache_args(teacher, corpus, out)) == 0
    return out


def test_cache_teacher_writes_resumes_and_refuses_other_settings(teacher, corpus, cache, tmp_path, capsys):
    assert cli.main(cache_args(teacher, corpus, cache)) == 0                   # nothing left to do
    summary = json.loads(capsys.readouterr().out)
    assert summary["new_shards"] == 0 and summary["id_bits"] == 9
    assert 0 < summary["bytes_per_token"] < 8 * (9 / 8 + 2) + 2 + 1            # zlib only shrinks (+ npz headers)
    shard = cache / "train-00000.npz"
    before = shard.read_bytes()
    shard.unlink()                                                               # as if interrupted
    assert cli.main(cache_args(teacher, corpus, cache)) == 0
    assert json.loads(capsys.readouterr().out)["new_shards"] == 1
    c = TC.TeacherCache.open(cache)
    with np.load(shard) as a, np.load(__import__("io").BytesIO(before)) as b:
        for key in ("ids", "logp", "rest"):
            assert np.array_equal(a[key], b[key])                                 # deterministic shards
    assert not list(cache.glob("*.tmp*"))
    assert cli.main(cache_args(teacher, corpus, cache, k=4)) == 2
    assert "other settings" in capsys.readouterr().err
    (cache / "heldout-00000.npz").rename(tmp_path / "away.npz")
    with pytest.raises(Q4KError, match="shards missing"):
        TC.TeacherCache.open(cache)
    (tmp_path / "away.npz").rename(cache / "heldout-00000.npz")
    assert c.meta["splits"]["train"]["shards"] >= 2                              # batches read across shards


def test_cached_targets_match_the_teacher(teacher, cache):
    from q4kdistill.teacher.model import Teacher

    c = TC.TeacherCache.open(cache)
    d = c.dataset("train")
    b = d.batch([0, 5])
    sp = c.targets(b, "train")(0, 32)
    full = Teacher.load(teacher, log=None).logits_for_batch(b.ids).reshape(32, -1).astype(np.float64)
    lp = log_softmax(full)
    assert np.array_equal(sp.ids, np.argsort(-lp, -1)[:, :8])
    assert np.allclose(sp.logp[:, :8], np.take_along_axis(lp, sp.ids, -1), atol=2e-3)   # fp16
    assert np.allclose(np.exp(sp.logp).sum(-1), 1.0, atol=2e-3)                       # k ids + the rest


def distill_args(teacher, cache, out, *extra):
    return ["distill", "--teacher", teacher, "--teacher-cache", str(cache), "--out", str(out), "--student-layers", "1",
            "--steps", "6", "--batch", "2", "--seq", "16", "--lr", "3e-3", "--warmup", "2", "--eval-every", "3",
            "--eval-batches", "1", "--save-every", "100", "--no-progress", *extra]


def test_distill_from_cache_without_the_teacher_resumes_bit_identically(teacher, cache, tmp_path, monkeypatch, capsys):
    from q4kdistill.teacher import model as teacher_model

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not be loaded when training from a cache")

    monkeypatch.setattr(teacher_model.Teacher, "load", no_teacher)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert cli.main(distill_args(teacher, cache, straight)) == 0
    real_step = D.train_step

    def ctrl_c_after_step_2(run, batches):
        record = real_step(run, batches)
        if run.opt.steps == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(D, "train_step", ctrl_c_after_step_2)
    assert cli.main(distill_args(teacher, cache, parts)) == 130
    monkeypatch.setattr(D, "train_step", real_step)
    assert cli.main(distill_args(teacher, cache, parts, "--resume")) == 0
    a, b = checkpoint.load(straight), checkpoint.load(parts)
    for name, value in a.state["params"].items():
        assert np.array_equal(value, b.state["params"][name]), name
    assert a.state["evals"] == b.state["evals"] and a.fingerprint["teacher_cache"] == TC.TeacherCache.open(cache).identity
    assert a.state["evals"]["6"]["teacher_kl"] < a.state["evals"]["0"]["teacher_kl"]
    capsys.readouterr()
    assert cli.main(distill_args(teacher, cache, tmp_path / "t2", "--temperature", "2")) == 2
    assert "temperature" in capsys.readouterr().err
    assert cli.main(distill_args(teacher, cache, tmp_path / "s2", "--seq", "8")) == 2
    assert cli.main(distill_args(teacher, tmp_path / "nothing", tmp_path / "n")) == 2
    assert "not a teacher cache" in capsys.readouterr().err


def test_cache_loss_approaches_online_loss_as_k_grows(teacher, corpus, tmp_path):
    """With k = V - 1 the k + 1 classes are the whole vocabulary: the cached loss is the online one (fp16)."""
    from q4kdistill.teacher.model import Teacher
    from q4kdistill.train.loop import DistillConfig, build_student

    V = synthetic.tiny_config("gemma3", **SMALL).vocab_size
    out = tmp_path / "full"
    assert cli.main(cache_args(teacher, corpus, out, k=V - 1)) == 0
    c = TC.TeacherCache.open(out)
    t = Teacher.load(teacher, log=None)
    student = build_student(DistillConfig(teacher=teacher, data="x", student_layers=[1]), t)
    b = c.dataset("train").batch([1, 2])
    online = student.loss_and_grads(b.ids, t.logits_fn(b.ids), LossConfig("kl"))[0]
    cached = student.loss_and_grads(b.ids, c.targets(b, "train"), LossConfig("kl"))[0]
    assert cached == pytest.approx(online, rel=2e-3)


def test_shrink_cache_equals_a_smaller_cache(teacher, corpus, cache, tmp_path):
    small = tmp_path / "k3"
    assert cli.main(cache_args(teacher, corpus, small, k=3)) == 0
    shrunk = tmp_path / "shrunk"
    info = TC.shrink_cache(cache, shrunk, 3)
    a, b = TC.TeacherCache.open(small), TC.TeacherCache.open(shrunk)
    assert a.identity == b.identity == info["identity"]
    x, y = a.sparse("train", [0, 70]), b.sparse("train", [0, 70])
    assert np.array_equal(x.ids, y.ids) and np.array_equal(x.logp[:, :3], y.logp[:, :3])
    assert np.allclose(x.logp[:, 3], y.logp[:, 3], atol=2e-3)               # the rest mass, via fp16 terms
    with pytest.raises(Q4KError):
        TC.shrink_cache(cache, tmp_path / "big", 9)


def test_cache_vs_online_script_tiny(tmp_path):
    """scripts/cache_vs_online.py --tiny: the measurement's code path on a tiny synthetic teacher."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "cache_vs_online.py")
    done = subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "cache_vs_online.json").read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"online KD", "cache, k = 4", "cache, k = 16", "cache, k = 64"}
    sizes = [rows[f"cache, k = {k}"]["bytes_per_token"] for k in (4, 16, 64)]
    assert sizes == sorted(sizes) and sizes[0] > 0
    for r in rows.values():                                   # every signal taught the student something
        assert r["heldout_teacher_kl"] < result["start"]["teacher_kl"]
    assert "| online KD |" in done.stdout


@pytest.mark.gpu
def test_top_k_and_sparse_loss_on_gpu_match_numpy():
    """At gemma-3's vocabulary: the cache's top-k and the sparse loss, CuPy against NumPy."""
    import cupy

    rng = np.random.default_rng(7)
    t = (rng.standard_normal((64, 262144)) * 4).astype(np.float32)
    s = (rng.standard_normal((64, 262144)) * 4).astype(np.float32)
    ids, logp, rest = TC.top_k_logprobs(t, 64)
    gids, glogp, grest = (cupy.asnumpy(x) for x in TC.top_k_logprobs(cupy.asarray(t), 64))
    assert np.array_equal(ids, gids)
    assert np.allclose(logp, glogp, atol=1e-4) and np.allclose(rest, grest, atol=1e-4)
    sp = SparseTargets(ids, np.concatenate([logp, rest[:, None]], -1))
    for cfg in (LossConfig("kl"), LossConfig("skl", skew_alpha=0.1), LossConfig("tvd")):
        rows, ds = sparse_kd_rows(s, sp, cfg)
        grows, gds = sparse_kd_rows(cupy.asarray(s), sp.to(cupy), cfg)
        assert np.allclose(rows, cupy.asnumpy(grows), rtol=1e-4, atol=1e-6)
        assert np.allclose(ds, cupy.asnumpy(gds), rtol=1e-3, atol=1e-7)


@pytest.mark.gpu
def test_chat_data_cache_and_distill_on_gpu(gemma_path, tmp_path):
    """Real sizes on the GPU: JSONL chat data through the shipped template, a k = 64 cache of the real
    teacher, and 20 steps from it (masks on CuPy, sparse loss); the held-out KL falls."""
    import sysconfig

    from q4kdistill.train.chat import GEMMA_TEMPLATE
    from q4kdistill.train.loop import DistillConfig, distill

    topics = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_text()
    for f in range(4):
        with open(tmp_path / f"chat{f}.jsonl", "w") as out:
            for i in range(40):
                at = 50000 + (f * 40 + i) * 900
                out.write(json.dumps({"prompt": "Explain this: " + topics[at:at + 300],
                                      "completion": topics[at + 300:at + 900]}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    for f in tmp_path.glob("chat*.jsonl"):
        f.rename(data / f.name)
    info = TC.cache_teacher(gemma_path, str(data), tmp_path / "cache", top_k=64, seq=256, batch=4, heldout=0.25,
                            chat_template=str(GEMMA_TEMPLATE), progress=False)
    assert info["bytes_per_token"] < 64 * (18 / 8 + 2) + 2
    cfg = DistillConfig(teacher=gemma_path, teacher_cache=str(tmp_path / "cache"), out=str(tmp_path / "run"),
                        student_layers=[0, 4, 8, 12, 17], steps=20, batch=4, seq=256, lr=2e-4, warmup=2,
                        eval_every=20, eval_batches=2, save_every=20, heldout=0.25)
    summary = distill(cfg, progress=False)
    assert summary["evals"]["20"]["teacher_kl"] < summary["evals"]["0"]["teacher_kl"]
