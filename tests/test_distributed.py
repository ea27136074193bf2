"""Data parallelism pieces on the CPU: the NumPy communicator, the rendezvous, the batch split."""
import threading

import numpy as np
import pytest

from q4kdistill.errors import Q4KError
from q4kdistill.train import distributed as dist


def _run_ranks(world, fn):
    group, out, errors = dist.LocalGroup(world), [None] * world, []

    def body(r):
        try:
            out[r] = fn(group.communicator(r))
        except Exception as exc:            # surface a rank's failure in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_local_allreduce_and_broadcast(world):
    rng = np.random.default_rng(world)
    inputs = [rng.standard_normal(1001).astype(np.float32) for _ in range(world)]

    def fn(comm):
        buf = inputs[comm.rank].copy()
        dist.allreduce_flat(comm, buf, bucket_elems=97)        # odd buckets: every element once
        b = np.full(5, comm.rank, dtype=np.float64)
        comm.broadcast(b, root=world - 1)
        return buf, b

    want = np.sum(inputs, axis=0, dtype=np.float32)
    for buf, b in _run_ranks(world, fn):
        np.testing.assert_allclose(buf, want, rtol=1e-6)
        assert (b == world - 1).all()


def test_agree_status_stops_every_rank():
    got = _run_ranks(3, lambda c: dist.agree_status(c, dist.STATUS_NONFINITE if c.rank == 1 else dist.STATUS_OK))
    assert got == [dist.STATUS_NONFINITE] * 3
    got = _run_ranks(2, lambda c: dist.agree_status(c, dist.STATUS_OK))
    assert got == [dist.STATUS_OK] * 2


def test_local_rows_split_and_refuse():
    group = dist.LocalGroup(4)
    rows = [dist.local_rows(8, group.communicator(r)) for r in range(4)]
    assert [(s.start, s.stop) for s in rows] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(Q4KError, match="does not split evenly"):
        dist.local_rows(6, group.communicator(0))


def test_tcp_rendezvous_shares_bytes():
    port = dist.free_port()
    payload = bytes(range(128))
    got = [None] * 3

    def rank(r):
        got[r] = dist.share_bytes(payload if r == 0 else None, r, 3, "127.0.0.1", port, timeout=30)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 2, 0)]   # clients first: they retry
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [payload] * 3


def test_file_rendezvous(tmp_path):
    path = str(tmp_path / "uid")
    assert dist.share_bytes_file(b"abc", 0, path) == b"abc"
    assert dist.share_bytes_file(None, 1, path, timeout=1) == b"abc"
    with pytest.raises(Q4KError, match="did not appear"):
        dist.share_bytes_file(None, 1, str(tmp_path / "never"), timeout=0.3)


def test_env_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.env_rank() is None and isinstance(dist.from_environment(), dist.SingleProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(Q4KError, match="not a valid place"):
        dist.env_rank()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(Q4KError, match="whole numbers"):
        dist.env_rank()


def test_launch_refuses_without_gpus():
    with pytest.raises(Q4KError, match="--gpus 2: this machine has 0 GPUs"):
        dist.launch(2, ["distill"], available=0)


def test_tcp_rendezvous_port_in_use_is_one_line():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(Q4KError, match="cannot listen on 127.0.0.1:.*Q4KDISTILL_RENDEZVOUS_FILE"):
            dist.share_bytes(b"x", 0, 2, "127.0.0.1", port, timeout=1)


def test_launch_runs_every_rank_and_returns_the_worst_status(tmp_path):
    """Two ranks of a command that fails (exit 2 with one line each): the launcher reports 2."""
    assert dist.launch(2, ["inspect", str(tmp_path / "missing.gguf")], available=2) == 2
