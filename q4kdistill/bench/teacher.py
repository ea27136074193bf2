"""Speed and memory of the Q4_K-native teacher against the same forward with dense fp16 weights.

On the GPU, with the 7B-shaped teacher from the shared manifest (random valid blocks):
  1. load it native (quantized blocks as stored): resident bytes vs the file's tensor bytes (<= 1.02x)
  2. forward peak of one 1 x 512 batch, all logits (<= 5.5 GB), counted by q4kdistill.memory.meter
  3. prefill of B x T tokens, every position's logits: native vs the same teacher decoded to
     dense fp16 (teacher.with_backend("dequant-f16"): cuBLAS fp16 GEMMs, FP32 out) in the same
     run; ratio native / dense (target <= 1.15), tokens/s
  4. one instrumented forward each: clock marks around every linear layer -> share of time in
     matmuls vs the rest

``q4kdistill bench teacher [--manifest M.json] [--batch 8 --seq 512] [--json]`` runs it; ``--tiny``
writes a tiny synthetic qwen2 teacher (vocabulary larger than one LM-head slab, so the head is
sliced as at full size) and runs the same steps on NumPy.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os

import numpy as np

from .. import backend
from ..errors import Q4KError
from ..memory import meter as memory
from ..teacher import forward as teacher_forward
from .clock import Clock

RATIO_TARGET = 1.15        # native prefill time / dense fp16 prefill time
RESIDENT_TARGET = 1.02     # resident bytes / tensor bytes
PEAK_TARGET = 5.5e9        # forward peak at 1 x 512, bytes
PEAK_SEQ = 512             # tokens of the forward-peak batch at full size
TINY_SIZE = dict(batch=2, seq=32, repeats=1)


def time_forward(teacher, ids, repeats, clock) -> float:
    """Best of ``repeats`` forwards (every position's logits), after one warm-up (kernel compiles)."""
    teacher.logits_for_batch(ids)
    best = float("inf")
    for _ in range(repeats):
        a = clock.mark()
        teacher.logits_for_batch(ids)
        best = min(best, clock.seconds(a, clock.mark()))
    return best


@contextlib.contextmanager
def timed_linears(clock, spans):
    """Bracket every teacher_forward.linear call (each linear layer, each LM-head slab) with clock marks."""
    fn = teacher_forward.linear

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        a = clock.mark()
        out = fn(*args, **kwargs)
        spans.append((a, clock.mark()))
        return out

    teacher_forward.linear = timed
    try:
        yield
    finally:
        teacher_forward.linear = fn


def matmul_share(teacher, ids, clock) -> float:
    """Share of one forward's time spent inside teacher_forward.linear."""
    spans = []
    with timed_linears(clock, spans):
        a = clock.mark()
        teacher.logits_for_batch(ids)
        total = clock.seconds(a, clock.mark())
    return sum(clock.seconds(s, e) for s, e in spans) / total


def tiny_teacher_file(directory) -> str:
    """A 2-layer synthetic qwen2 GGUF in ``directory``; its 20,000-token vocabulary exceeds one
    LM-head slab (teacher_forward.HEAD_ROWS), so the head runs sliced."""
    from ..formats import synthetic

    cfg = synthetic.tiny_config("qwen2", n_layers=2, vocab_size=20000)
    return synthetic.write_gguf(os.path.join(directory, "tiny.gguf"), cfg, seed=0)


def run(source, batch=8, seq=512, repeats=3, peak_seq=PEAK_SEQ, log=None) -> dict:
    """Load ``source`` (GGUF, APR or manifest) native and as dense fp16; the report as a dict."""
    from ..formats.model_file import ModelFile
    from ..teacher.model import Teacher

    if min(batch, seq, repeats, peak_seq) < 1:
        raise Q4KError("bench teacher: --batch, --seq and --repeats must be >= 1")
    memory.install()
    meter = memory.MemoryMeter()
    with meter.phase("load"):
        native = Teacher.load(source, log=log)
    xp, clock = native.xp, Clock(native.xp)
    rng = np.random.default_rng(0)
    tensor_bytes = ModelFile.open(source).total_tensor_bytes

    memory.release_cached()
    with meter.phase(f"forward 1x{peak_seq}"):
        native.logits_for_batch(rng.integers(0, native.vocab_size, (1, peak_seq)))
    memory.release_cached()
    ids = xp.asarray(rng.integers(0, native.vocab_size, (batch, seq)))
    t_native = time_forward(native, ids, repeats, clock)
    share_native = matmul_share(native, ids, clock)

    with meter.phase("decode dense fp16"):
        dense = native.with_backend("dequant-f16")
    t_dense = time_forward(dense, ids, repeats, clock)
    share_dense = matmul_share(dense, ids, clock)

    peak = meter.record(f"forward 1x{peak_seq}").peak_bytes
    return {
        "date": datetime.date.today().isoformat(), "device": backend.gpu_name(), "counter": meter.counter.name,
        "source": str(source), "architecture": native.config.architecture, "batch": batch, "seq": seq,
        "native_s": t_native, "dense_f16_s": t_dense, "ratio": t_native / t_dense, "ratio_target": RATIO_TARGET,
        "tokens_per_s_native": batch * seq / t_native, "tokens_per_s_dense_f16": batch * seq / t_dense,
        "matmul_share_native": share_native, "matmul_share_dense_f16": share_dense,
        "tensor_bytes": tensor_bytes, "resident_bytes": native.resident_bytes,
        "resident_ratio": native.resident_bytes / tensor_bytes, "resident_target": RESIDENT_TARGET,
        "dense_f16_resident_bytes": dense.resident_bytes,
        "forward_peak_seq": peak_seq, "forward_peak_bytes": peak, "forward_peak_target": PEAK_TARGET,
        "phases": [r.to_dict() for r in meter.records],
    }


def table(r: dict) -> str:
    ok = lambda good: "ok" if good else "MISSED"          # noqa: E731
    gb = lambda n: f"{n / 1e9:.3f} GB"                     # noqa: E731
    prefill = f"prefill {r['batch']}x{r['seq']}"
    rows = [
        ("device", r["device"], ""),
        ("teacher", f"{r['architecture']} from {os.path.basename(r['source'])}", ""),
        (f"{prefill} native", f"{r['native_s'] * 1e3:.1f} ms, {r['tokens_per_s_native']:,.0f} tok/s", ""),
        (f"{prefill} dense fp16", f"{r['dense_f16_s'] * 1e3:.1f} ms, {r['tokens_per_s_dense_f16']:,.0f} tok/s", ""),
        ("native / dense fp16", f"{r['ratio']:.3f}x", f"<= {RATIO_TARGET}: {ok(r['ratio'] <= RATIO_TARGET)}"),
        ("time in matmuls (native)", f"{100 * r['matmul_share_native']:.1f} %", "rest: norms, rope, attention, glu"),
        ("time in matmuls (dense fp16)", f"{100 * r['matmul_share_dense_f16']:.1f} %", ""),
        ("resident (native)", f"{gb(r['resident_bytes'])} = {r['resident_ratio']:.4f}x tensor bytes",
         f"<= {RESIDENT_TARGET}x: {ok(r['resident_ratio'] <= RESIDENT_TARGET)}"),
        ("resident (dense fp16)", gb(r["dense_f16_resident_bytes"]), ""),
        (f"forward peak 1x{r['forward_peak_seq']}", gb(r["forward_peak_bytes"]),
         f"<= {PEAK_TARGET / 1e9} GB: {ok(r['forward_peak_bytes'] <= PEAK_TARGET)} ({r['counter']})"),
    ]
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{w}}  {b:<40} {c}" for a, b, c in rows)
