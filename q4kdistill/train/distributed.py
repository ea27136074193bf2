"""Data parallelism: one process per GPU, gradients averaged through NCCL (CuPy's ``cupy.cuda.nccl``).

Every rank holds its own quantized teacher and a student replica. The global batch [B, T] is drawn
identically on every rank (same data sampler, same seed) and rank r trains on rows
r*B/W .. (r+1)*B/W - 1. After the backward the ranks sum their gradients, each already scaled by its
share of the global token count, so the summed gradient is the 1-GPU gradient of the global batch;
the optimizer step is then identical everywhere.

Communicators follow NCCL's interface (``allreduce`` in place, ``broadcast``, ``barrier``):

    SingleProcess      world of 1 (the default; no NCCL needed)
    NcclCommunicator   cupy.cuda.nccl.NcclCommunicator, one per process and GPU
    LocalGroup         W communicators in one process (threads), NumPy: the CPU tests' stand-in

Rendezvous is torchrun's: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
Rank 0 creates NCCL's unique id and hands it to the others over a small TCP store at
MASTER_ADDR:MASTER_PORT (or through a shared file: ``Q4KDISTILL_RENDEZVOUS_FILE``). ``launch`` starts
the W processes of one host itself (``distill --gpus N``). The machine's NCCL environment is kept as
it is (NVLink multicast stays off where ``NCCL_NVLS_ENABLE=0`` is set).
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from ..errors import Q4KError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STATUS_OK, STATUS_NONFINITE, STATUS_STOP, STATUS_FAILED = 0, 1, 2, 4


class StoppedByPeer(Q4KError):
    """This rank stopped because another rank's fault (reported by that rank) stopped every rank;
    the command line prints nothing for it, so a fault is one message, not one per rank."""


class SingleProcess:
    """World of one: every collective is the identity."""

    rank, world_size, local_rank = 0, 1, 0

    def allreduce(self, buf) -> None:
        pass

    def broadcast(self, buf, root: int = 0) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class LocalGroup:
    """W ranks in one process (one thread each), summing NumPy buffers in rank order."""

    def __init__(self, world_size: int, timeout: float | None = None):
        self.world_size = world_size
        self._slots = [None] * world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)   # timeout: a test's guard against hangs

    def abort(self) -> None:
        """Release every rank waiting in a collective (with threading.BrokenBarrierError)."""
        self._barrier.abort()

    def communicator(self, rank: int) -> "LocalCommunicator":
        return LocalCommunicator(self, rank)


class LocalCommunicator:
    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.world_size, self.local_rank = group, rank, group.world_size, rank

    def allreduce(self, buf) -> None:
        g = self.group
        g._slots[self.rank] = np.array(buf, copy=True)
        g._barrier.wait()
        total = g._slots[0].copy()
        for other in g._slots[1:]:
            total += other
        g._barrier.wait()                       # everyone has read every slot before any is reused
        buf[...] = total

    def broadcast(self, buf, root: int = 0) -> None:
        g = self.group
        if self.rank == root:
            g._slots[root] = np.array(buf, copy=True)
        g._barrier.wait()
        value = g._slots[root].copy()
        g._barrier.wait()
        buf[...] = value

    def barrier(self) -> None:
        self.group._barrier.wait()

    def close(self) -> None:
        pass


class NcclCommunicator:
    """One rank of an NCCL communicator over CuPy arrays (sum in place, on the current stream)."""

    def __init__(self, rank: int, world_size: int, unique_id: bytes, local_rank: int):
        import cupy
        from cupy.cuda import nccl

        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self._cupy, self._nccl = cupy, nccl
        use_device(local_rank)
        try:                                            # CuPy 14 takes the id as bytes, older ones as ints
            self._comm = nccl.NcclCommunicator(world_size, bytes(unique_id), rank)
        except TypeError:
            ints = tuple(int(b) for b in np.frombuffer(bytes(unique_id), np.int8))
            self._comm = nccl.NcclCommunicator(world_size, ints, rank)

    def _dtype(self, a):
        nccl, dt = self._nccl, a.dtype
        table = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                 np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int32): nccl.NCCL_INT32,
                 np.dtype(np.int64): nccl.NCCL_INT64}
        if dt not in table:
            raise Q4KError(f"NCCL all-reduce of {dt} arrays is not supported here")
        return table[dt]

    def allreduce(self, buf) -> None:
        stream = self._cupy.cuda.get_current_stream().ptr
        self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf), self._nccl.NCCL_SUM, stream)

    def broadcast(self, buf, root: int = 0) -> None:
        stream = self._cupy.cuda.get_current_stream().ptr
        self._comm.broadcast(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf), root, stream)

    def barrier(self) -> None:
        one = self._cupy.zeros(1, dtype=self._cupy.float32)
        self.allreduce(one)
        self._cupy.cuda.get_current_stream().synchronize()

    def close(self) -> None:
        self._comm.destroy()


def use_device(local_rank: int) -> int:
    """Make this rank's GPU current for CuPy and Numba -> its index. ``launch`` gives each rank one
    visible GPU (CUDA_VISIBLE_DEVICES), which is then device 0; a rank that sees all of its host's
    GPUs (torchrun without CUDA_VISIBLE_DEVICES) takes device LOCAL_RANK."""
    import cupy

    dev = 0 if cupy.cuda.runtime.getDeviceCount() == 1 else local_rank
    cupy.cuda.Device(dev).use()
    if dev != 0:
        from numba import cuda

        cuda.select_device(dev)             # the kernels' context on the same GPU as CuPy's arrays
    return dev


# -- rendezvous ---------------------------------------------------------------------------------

def env_rank() -> dict | None:
    """torchrun-style variables -> {rank, world_size, local_rank, addr, port}; None when absent."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        port = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError:
        raise Q4KError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be whole numbers") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0 and 0 < port < 65536):
        raise Q4KError(f"rank {rank} of a world of {world} (LOCAL_RANK {local}, MASTER_PORT {port}) is not a valid place")
    return {"rank": rank, "world_size": world, "local_rank": local,
            "addr": os.environ.get("MASTER_ADDR", "127.0.0.1"), "port": port}


def _recv_exact(conn, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the store closed the connection")
        out += chunk
    return out


def share_bytes(payload: bytes | None, rank: int, world_size: int, addr: str, port: int, timeout: float = 300.0) -> bytes:
    """Rank 0 serves ``payload`` to the other ranks over TCP; every rank returns it."""
    if world_size == 1:
        return payload
    deadline = time.monotonic() + timeout
    if rank == 0:
        try:
            srv = socket.create_server((addr, port), reuse_port=False)
        except OSError as exc:
            raise Q4KError(f"rendezvous: rank 0 cannot listen on {addr}:{port} ({exc.strerror}); give a free "
                           "MASTER_PORT, or (under torchrun, whose agent holds MASTER_PORT) a shared file in "
                           "Q4KDISTILL_RENDEZVOUS_FILE") from None
        srv.settimeout(timeout)
        try:
            for _ in range(world_size - 1):
                conn, _ = srv.accept()
                with conn:
                    conn.sendall(struct.pack("<I", len(payload)) + payload)
        except socket.timeout:
            raise Q4KError(f"rendezvous: not every rank reached {addr}:{port} within {timeout:.0f} s") from None
        finally:
            srv.close()
        return payload
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5) as conn:
                n = struct.unpack("<I", _recv_exact(conn, 4))[0]
                return _recv_exact(conn, n)
        except (ConnectionRefusedError, ConnectionResetError, socket.timeout, OSError):
            if time.monotonic() > deadline:
                raise Q4KError(f"rendezvous: rank 0 did not answer at {addr}:{port} within {timeout:.0f} s") from None
            time.sleep(0.2)


def share_bytes_file(payload: bytes | None, rank: int, path: str, timeout: float = 300.0) -> bytes:
    """The same through a shared file (written atomically by rank 0)."""
    if rank == 0:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
        return payload
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise Q4KError(f"rendezvous: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)
    with open(path, "rb") as f:
        return f.read()


def from_environment():
    """The communicator this process should use: NCCL when WORLD_SIZE is set (and > 1), else a world of 1."""
    place = env_rank()
    if place is None or place["world_size"] == 1 and "Q4KDISTILL_FORCE_NCCL" not in os.environ:
        return SingleProcess()
    try:
        from cupy.cuda import nccl
    except Exception as exc:            # no CuPy, or a CuPy without NCCL
        raise Q4KError(f"a world of {place['world_size']} ranks needs CuPy with NCCL on a GPU ({exc})") from None
    uid = nccl.get_unique_id() if place["rank"] == 0 else None     # bytes (CuPy 14) or a tuple of ints
    payload = None if uid is None else (bytes(uid) if isinstance(uid, (bytes, bytearray))
                                        else np.asarray(uid, dtype=np.int8).tobytes())
    path = os.environ.get("Q4KDISTILL_RENDEZVOUS_FILE")
    if path:
        got = share_bytes_file(payload, place["rank"], path)
    else:
        got = share_bytes(payload, place["rank"], place["world_size"], place["addr"], place["port"])
    return NcclCommunicator(place["rank"], place["world_size"], got, place["local_rank"])


# -- launching the ranks of one host ------------------------------------------------------------

def gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, argv: list, available: int | None = None) -> int:
    """Run ``q4kdistill <argv>`` as ``n`` ranks on this host (one GPU each); -> the worst exit status.

    A rank that fails makes the launcher stop the others (SIGTERM after a grace period). The ranks
    run in their own session, so a Ctrl-C at the terminal reaches the launcher alone, which passes
    each one on to every rank exactly once: the first makes them finish the step, save and exit 130,
    a second stops them at once (as for one process)."""
    have = gpu_count() if available is None else available
    if n > have:
        raise Q4KError(f"--gpus {n}: this machine has {have} GPU{'s' if have != 1 else ''} that CuPy can see")
    env = dict(os.environ, WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n)))).split(",")
    procs = []
    for r in range(n):                      # one visible GPU per rank: CuPy, Numba and NCCL agree on it
        procs.append(subprocess.Popen([sys.executable, "-m", "q4kdistill"] + argv, start_new_session=True,
                                      env=dict(env, RANK=str(r), LOCAL_RANK=str(r), CUDA_VISIBLE_DEVICES=visible[r])))
    worst, previous = 0, None

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, forward)
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                worst = max(worst, rc) if rc >= 0 else max(worst, 128 - rc)
                if rc not in (0, 130):
                    _stop(procs)
            time.sleep(0.2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return worst


def _stop(procs, grace: float = 30.0) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if p.poll() is None:
            p.terminate()


# -- what the training loop calls -------------------------------------------------------------

def check_split(batch: int, world_size: int) -> int:
    """-> sequences per rank; a one-line Q4KError when ``batch`` does not split evenly."""
    if batch % world_size:
        raise Q4KError(f"--batch {batch} does not split evenly over {world_size} GPUs: give a multiple of {world_size}")
    return batch // world_size


def local_rows(batch: int, comm) -> slice:
    """This rank's rows of a global batch of ``batch`` sequences."""
    n = check_split(batch, comm.world_size)
    return slice(comm.rank * n, (comm.rank + 1) * n)


def agree_status(comm, status: int, xp=np) -> int:
    """Every rank's step status, OR-ed: one rank's fault (non-finite, Ctrl-C, failure) stops all."""
    flags = xp.asarray([float(status & b != 0) for b in (STATUS_NONFINITE, STATUS_STOP, STATUS_FAILED)],
                       dtype=xp.float32)
    comm.allreduce(flags)
    flags = [float(v) for v in (flags.get() if hasattr(flags, "get") else flags)]
    return sum(b for b, f in zip((STATUS_NONFINITE, STATUS_STOP, STATUS_FAILED), flags) if f > 0)


def allreduce_flat(comm, flat, bucket_elems: int = 1 << 24) -> None:
    """Sum a flat buffer across ranks in place, in buckets (64 MB of float32 at a time)."""
    if comm.world_size == 1:
        return
    for start in range(0, flat.size, bucket_elems):
        comm.allreduce(flat[start:start + bucket_elems])
