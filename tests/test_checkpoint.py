"""Checkpoint files: exact round trip of a state tree, atomic replacement, refusal of a foreign one."""
import os

import numpy as np
import pytest

from q4kdistill.train import checkpoint
from q4kdistill.errors import Q4KError


def _state(rng):
    return {
        "params": {"token_embd.weight": rng.normal(size=(7, 5)).astype(np.float32),
                   "blk.0.attn_norm.weight": rng.normal(size=5).astype(np.float32)},
        "optimizer": {"m": rng.normal(size=40).astype(np.float32), "v": rng.random(40).astype(np.float32), "t": 3},
        "data": {"epoch": 1, "perm": rng.permutation(11), "pos": np.int64(4)},
        "rng": np.random.default_rng(5).bit_generator.state,      # holds 128-bit integers
        "history": [{"teacher_kl": 0.1 + 1e-17}, None],
    }


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    state = _state(rng)
    path = checkpoint.save(tmp_path, step=12, state=state, config={"lr": 3e-4}, fingerprint={"seq": 8})
    assert path == os.path.join(tmp_path, checkpoint.FILE_NAME)
    ck = checkpoint.load(tmp_path)
    assert ck.step == 12 and ck.config == {"lr": 3e-4} and ck.fingerprint == {"seq": 8}
    for name, a in state["params"].items():
        assert ck.state["params"][name].dtype == a.dtype and np.array_equal(ck.state["params"][name], a)
    assert np.array_equal(ck.state["optimizer"]["v"], state["optimizer"]["v"]) and ck.state["optimizer"]["t"] == 3
    assert np.array_equal(ck.state["data"]["perm"], state["data"]["perm"]) and ck.state["data"]["pos"] == 4
    assert ck.state["rng"] == state["rng"]
    g = np.random.default_rng()
    g.bit_generator.state = ck.state["rng"]
    assert g.integers(1 << 62) == np.random.default_rng(5).integers(1 << 62)
    assert ck.state["history"] == state["history"]


def test_save_replaces_atomically(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    checkpoint.save(tmp_path, step=1, state=_state(rng), config={}, fingerprint={})

    def torn_write(*args, **kwargs):
        raise KeyboardInterrupt                                   # Ctrl-C in the middle of writing

    monkeypatch.setattr(np, "savez", torn_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, step=2, state=_state(rng), config={}, fingerprint={})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path).step == 1                    # the old one is intact


def test_foreign_checkpoint_is_refused(tmp_path):
    checkpoint.save(tmp_path, step=3, state={}, config={}, fingerprint={"batch": 4, "seq": 64, "teacher": "a.gguf"})
    ck = checkpoint.load(tmp_path)
    checkpoint.check_fingerprint(ck, {"batch": 4, "seq": 64, "teacher": "a.gguf"})
    with pytest.raises(Q4KError, match=r"another configuration.*batch: checkpoint 4, now 8"):
        checkpoint.check_fingerprint(ck, {"batch": 8, "seq": 64, "teacher": "a.gguf"})


def test_unreadable_or_missing_checkpoint(tmp_path):
    with pytest.raises(Q4KError, match="no checkpoint"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.FILE_NAME).write_bytes(b"not a zip file")
    with pytest.raises(Q4KError, match="not a readable"):
        checkpoint.load(tmp_path)
