"""The frozen teacher: a GGUF/APR/manifest model whose weights stay as the file stores them.

    teacher = Teacher.load("gemma-3-270m-q4_k_m.gguf")     # "uploaded 247 MB, kept quantized"
    logits = teacher.logits_for_batch(ids, mask)            # [B, T, V] float32, every position
    for start, stop, chunk in teacher.iter_logits(ids, mask, chunk_tokens=1024):
        ...                                                 # [stop-start, V] over the B*T tokens

Backends (how the weights sit in memory; the forward in teacher_forward.py is the same):

  native        every tensor's bytes as stored: quantized blocks stay blocks and go through
                kernels.matmul; norms/biases float32. Resident bytes = the file's tensor bytes.
  dense         the same for a file with no quantized tensor (F32/F16/BF16 kept as stored).
  dequant-f32   decode every matrix at upload to float32 (the legacy teacher: ~7x the bytes)
  dequant-bf16  ... to bfloat16, kept as uint16 bits; each product upcasts its one matrix to
                float32 (NumPy and CuPy have no bfloat16 matmul)
  dequant-f16   ... to float16; on the GPU every product is a cuBLAS fp16 GEMM (the speed baseline)
  auto          native if any tensor is quantized, else dense

No gradients and no optimizer state: the teacher only answers forward passes.
Inputs: input_ids int [B, T]; attention_mask [B, T] bool, True = real token, right padding
(positions are 0..T-1 in every row).
"""
from __future__ import annotations

import os
import sys
import time

import kernels
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import forward as teacher_forward
from ..backend import array_module, capturing, device as process_device, on_gpu, synchronize
from ..errors import Q4KError
from ..formats.validate import check_fits
from .forward import Weight

BACKENDS = ("auto", "native", "dense", "dequant-f32", "dequant-bf16", "dequant-f16")
DEFAULT_CHUNK_TOKENS = 1024
HEAD_SPAN_TOKENS = 512         # logits_fn on a GPU: the LM head's tokens per product (head_span)


def head_span(on_gpu: bool, tokens: int | None = None):
    """(tokens, numpy dtype) of logits_fn's spans, or None (each call multiplies its own tokens).

    A quantized LM head is decoded whole for every product (slab by slab into the decode scratch),
    so a step's 256-token loss chunks decoded the 7B's 152064 x 3584 head 16 times: 25.3 ms of a
    206 ms step on an H200, against 12.5 ms in 1024-token products. On a GPU logits_fn multiplies
    ``tokens`` (default HEAD_SPAN_TOKENS) at once and keeps them in float16 (the KD loss kernel reads
    16-bit logits, and writes the student's gradient over a span's rows once it has read them:
    student/ops/fused_linear_loss.py; float16 holds a logit to 2^-11 of itself, bf16 teachers to 2^-8).
    Measured on an H200 at 8 x 512 (fresh 0.5B student, docs/perf.md ninth stop), tokens/s and step peak:
    per call (0) 19,941 and 17.20 GB, 512 20,328 and 17.39 GB, 1024 20,609 and 17.58 GB, the peer 20,285
    and 43.83 GB: 512 keeps that student under 0.4x of the peer's memory. A student whose step peak
    lies elsewhere (blocks cut from the 7B: their block backward) takes a wider span at no memory
    (memory.planner.step_head_span, Teacher.span_tokens; tenth stop: 2048). The CPU keeps float32 per
    call. $Q4KDISTILL_HEAD_SPAN sets the tokens (0: off) and wins over ``tokens``, trading the span's
    memory (tokens x V x 2 bytes) for the head's passes."""
    env = span_from_env()
    tokens = env if env is not None else HEAD_SPAN_TOKENS if tokens is None else int(tokens)
    return (tokens, np.float16) if on_gpu and tokens else None


SPAN_ENV = "Q4KDISTILL_HEAD_SPAN"      # tokens per span of logits_fn on a GPU; 0: float32 per call


def span_from_env() -> int | None:
    """$Q4KDISTILL_HEAD_SPAN as tokens, None when unset."""
    raw = os.environ.get(SPAN_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise Q4KError(f"{SPAN_ENV}={raw!r}: expected a number of tokens (0: one float32 product per call)")
    return int(raw)


class Teacher:
    """A frozen forward pass over weights held by ``backend``; build it with ``Teacher.load``."""

    def __init__(self, config, weights: dict, backend_name: str, xp, source: str = ""):
        self.config = config
        self.weights = weights                   # GGUF name -> Weight
        self.backend = backend_name
        self.xp = xp
        self.source = source
        self.layers = [_layer_weights(weights, i) for i in range(config.n_layers)]
        self._head = weights["token_embd.weight" if config.tied_output else "output.weight"]
        self._trunk_graphs = None                # train.cuda_graph.GraphedTrunk (use_cuda_graphs)
        self.span_tokens = None                  # logits_fn's span for a step (None: HEAD_SPAN_TOKENS); set
                                                 # by distill / bench step from memory.planner.step_head_span

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, source, backend="auto", device=None, log=print) -> "Teacher":
        """source: path of a .gguf/.apr file or manifest .json, or a ModelFile.

        device: "cpu" (NumPy) or "cuda" (CuPy); default: the process's backend.
        log: callable for the one-line load summary (None: silent)."""
        model = _open(source)
        name = choose_backend(backend, model.dtype_histogram())
        missing = [n for n in teacher_forward.required_tensors(model.config) if n not in model.tensors]
        if missing:
            raise Q4KError(f"{model.path}: not a complete {model.config.architecture} model, missing "
                           f"{len(missing)} tensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        xp = _array_module(device)
        check_fits(model, name, xp)                 # the load's bytes against free memory, before any
        t0 = time.perf_counter()
        weights = {}
        for info in model.tensors.values():
            weights[info.name] = decode_weight(upload(model.tensor_data(info.name), info, xp), name)
        synchronize()
        teacher = cls(model.config, weights, name, xp, source=str(model.path))
        if log:
            log(f"teacher: uploaded {teacher.resident_bytes / 1e6:.0f} MB, {_how_kept(name)} "
                f"({len(weights)} tensors, {teacher.config.architecture}, {'GPU' if xp is not np else 'CPU'}, "
                f"{time.perf_counter() - t0:.1f} s)")
        return teacher

    def with_backend(self, backend_name: str) -> "Teacher":
        """A second teacher whose matrices are this one's, decoded as ``backend_name`` says
        (e.g. "dequant-f16" for the cuBLAS baseline of the benchmark)."""
        if self.backend not in ("native", "dense"):
            raise Q4KError(f"with_backend needs a native or dense teacher, this one is {self.backend}")
        if backend_name not in BACKENDS[1:]:
            raise Q4KError(f"unknown teacher backend {backend_name!r} (expected one of {', '.join(BACKENDS)})")
        weights = {n: decode_weight(w, backend_name) for n, w in self.weights.items()}
        return Teacher(self.config, weights, backend_name, self.xp, self.source)

    # -- what consumers ask ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the file's vocabulary, or less after check_vocab(..., truncate=True))."""
        return self._head.shape[0]

    @property
    def resident_bytes(self) -> int:
        """Bytes of every weight array this teacher holds."""
        return sum(w.nbytes for w in self.weights.values())

    def check_vocab(self, other_size: int, truncate: bool = False) -> int:
        """Check a consumer's vocabulary against the teacher's; returns the shared size.

        With ``truncate`` the logits are cut to the first min(sizes) ids from now on (as other
        KD tools do when tokenizers share a prefix); otherwise a mismatch is a Q4KError."""
        other_size = int(other_size)
        if other_size == self.vocab_size:
            return other_size
        if not truncate:
            raise Q4KError(f"vocabulary mismatch: teacher has {self.vocab_size} tokens, the student/consumer "
                           f"has {other_size}; use the teacher's vocabulary or truncate both to the first "
                           f"{min(other_size, self.vocab_size)} ids (truncate=True, --truncate-vocab)")
        if other_size < 1:
            raise Q4KError(f"cannot truncate the teacher's vocabulary to {other_size} tokens")
        self._head = self._head.rows(0, min(other_size, self.vocab_size))
        return self.vocab_size

    def use_cuda_graphs(self, on: bool = True, log=None) -> bool:
        """Replay the trunk as a CUDA graph per [B, T] shape from the third forward of a shape on
        (train.cuda_graph.GraphedTrunk), for loops that run the teacher alone; batches with an
        attention mask and forwards inside another capture stay eager. The graph keeps the trunk's
        working set allocated until ``use_cuda_graphs(False)``. Returns whether graphs are on (a GPU,
        and Q4KDISTILL_CUDA_GRAPH not 0)."""
        from ..train import cuda_graph

        if self._trunk_graphs is not None:
            self._trunk_graphs.close()
            self._trunk_graphs = None
        if on and cuda_graph.enabled() and self.xp is not np:
            self._trunk_graphs = cuda_graph.GraphedTrunk(self, log=log)
        return self._trunk_graphs is not None

    @property
    def trunk_replays(self) -> int:
        """Forwards whose trunk replayed a CUDA graph since use_cuda_graphs(True) (0 when off)."""
        return self._trunk_graphs.replays if self._trunk_graphs is not None else 0

    def hidden_states(self, input_ids, attention_mask=None):
        """[B, T] ids -> float32 [B, T, D] after the final norm."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return self._trunk(ids, mask)

    def _trunk(self, ids, mask=None):
        """hidden_states on ids already checked (a device array of this teacher's xp)."""
        return teacher_forward.hidden_states(self.weights, self.layers, self.config, ids, mask)

    def logits_fn(self, input_ids, attention_mask=None, spans: bool = True, span_tokens: int | None = None):
        """Run the trunk once; return fn(start, stop) -> [stop-start, V], the logits of tokens
        start..stop-1 of the B*T positions flattened row-major (token b*T + t): float32, or on a GPU
        (``spans``: a training step's loss) float16 slices of head_span()'s spans (ask in increasing
        order: one span at a time is kept; ``span_tokens`` rows a span, default self.span_tokens, else
        HEAD_SPAN_TOKENS).
        spans=False: float32 per call (evaluation, audit, generate)."""
        h = self._flat_hidden(input_ids, attention_mask)       # [B*T, D]
        span = head_span(self.xp is not np, span_tokens or self.span_tokens) if spans else None
        if span is None:
            return lambda start, stop: teacher_forward.lm_head(h[start:stop], self._head)
        return SpanLogits(h, self._head, *span)

    def logits_for_batch(self, input_ids, attention_mask=None):
        """float32 [B, T, V]: the logits of every position."""
        return teacher_forward.lm_head(self.hidden_states(input_ids, attention_mask), self._head)

    def iter_logits(self, input_ids, attention_mask=None, chunk_tokens=DEFAULT_CHUNK_TOKENS):
        """Yield (start, stop, float32 [stop-start, V]) over the flattened B*T tokens, so that
        a 262k vocabulary never needs B*T*V floats at once."""
        chunk = int(chunk_tokens)
        if chunk < 1:
            raise Q4KError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        h = self._flat_hidden(input_ids, attention_mask)       # [B*T, D]
        for start in range(0, h.shape[0], chunk):
            stop = min(start + chunk, h.shape[0])
            yield start, stop, teacher_forward.lm_head(h[start:stop], self._head)

    def weight_f32(self, name: str):
        """Tensor ``name`` decoded to float32 of its logical shape (a new array; for student init)."""
        if name not in self.weights:
            raise Q4KError(f"the teacher has no tensor {name!r}")
        return weight_to_f32(self.weights[name])

    def _flat_hidden(self, input_ids, attention_mask):
        graphs = self._trunk_graphs
        if graphs is not None and attention_mask is None and not capturing():
            h = graphs(self._inputs(input_ids, None)[0])       # ids checked here, once
        else:
            h = self.hidden_states(input_ids, attention_mask)
        return h.reshape(-1, h.shape[-1])                       # [B*T, D]

    def _inputs(self, input_ids, attention_mask):
        xp = self.xp
        ids = xp.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
            raise Q4KError(f"input_ids must be a non-empty integer array [batch, tokens], got {ids.dtype} {tuple(ids.shape)}")
        if not capturing(ids):            # a CUDA graph's ids were checked before the capture (check_ids)
            self.check_ids(ids)
        if attention_mask is None:
            return ids, None
        mask = xp.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise Q4KError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        return ids, mask.astype(bool)

    def check_ids(self, ids) -> None:
        """Every id inside the teacher's vocabulary (reads the ids: a device sync for CuPy ids)."""
        lo, hi = int(ids.min()), int(ids.max())
        n_vocab = self.weights["token_embd.weight"].shape[0]
        if lo < 0 or hi >= n_vocab:
            raise Q4KError(f"token id {lo if lo < 0 else hi} is outside the teacher's vocabulary (0..{n_vocab - 1})")


# -- loading pieces ------------------------------------------------------------------------

class SpanLogits:
    """fn(start, stop) -> logits [stop-start, V]: views of one span of ``tokens`` rows' logits
    (teacher_forward.lm_head in ``dtype``), made when a call asks for a row outside the span at hand.
    One buffer serves the batch's spans, written again for the next span once no view of it is left
    (a caller still holding one gets a fresh buffer instead, so no view changes under it), so a CUDA
    graph's pool sees one allocation; it is let go with the batch's last row."""

    def __init__(self, h, head, tokens: int, dtype):
        self.h, self.head, self.tokens, self.dtype = h, head, int(tokens), dtype
        self.buffer, self.first, self.stop = None, 0, -1

    def covers(self, start, stop) -> bool:
        """Whether rows start..stop-1 are in the span at hand (a call for them computes nothing)."""
        return self.first <= start and stop <= self.stop

    def __call__(self, start, stop):
        N = self.h.shape[0]
        if not self.covers(start, stop):
            end = min(max(stop, start + self.tokens), N)
            buf, self.buffer = self.buffer, None
            if buf is None or buf.shape[0] < end - start or sys.getrefcount(buf) > 2:   # (buf and the call's own)
                buf = None                                   # the old one goes before the new one is made
                buf = array_module(self.h).empty((max(end - start, min(self.tokens, N)), self.head.shape[0]),
                                                 dtype=self.dtype)
            self.buffer, self.first, self.stop = buf, start, end
            teacher_forward.lm_head(self.h[start:end], self.head, self.dtype, out=buf[:end - start])
        out = self.buffer[start - self.first:stop - self.first]
        if stop >= N:                                        # the batch's last row: nothing more to serve
            self.buffer, self.stop = None, -1
        return out


def choose_backend(requested: str, histogram: dict) -> str:
    """"auto" -> "native" if the dtype histogram ({type name: ...}) has a quantized type, else
    "dense"; explicit names pass."""
    if requested not in BACKENDS:
        raise Q4KError(f"unknown teacher backend {requested!r} (expected one of {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested
    floats = {t.name for t in teacher_forward.FLOAT_TYPES}
    return "native" if any(name not in floats for name in histogram) else "dense"


def upload(data, info, xp) -> Weight:
    """Host tensor data -> a Weight on ``xp``'s device, bytes as stored; vectors become float32."""
    if len(info.shape) == 1:                                   # norms and biases
        host = Weight(np.asarray(data), info.qtype, tuple(info.shape))
        return Weight(xp.asarray(teacher_forward.dense_f32(host)), QT.F32, tuple(info.shape))
    return Weight(xp.asarray(data), info.qtype, tuple(info.shape))


def decode_weight(w: Weight, backend_name: str) -> Weight:
    """The matrix ``w`` as the backend keeps it (native/dense: unchanged; dequant-*: decoded)."""
    if backend_name in ("auto", "native", "dense") or len(w.shape) == 1:
        return w
    qtype, dtype = {"dequant-f32": (QT.F32, "float32"), "dequant-f16": (QT.F16, "float16"),
                    "dequant-bf16": (QT.BF16, "bfloat16")}[backend_name]
    if w.quantized:
        return Weight(kernels.dequantize_to(w.data, w.qtype, w.shape[0], dtype), qtype, w.shape)
    f32 = teacher_forward.dense_f32(w)
    data = teacher_forward.f32_to_bf16(f32) if qtype == QT.BF16 else f32.astype(dtype)
    return Weight(data, qtype, w.shape)


def weight_to_f32(w: Weight):
    """Any Weight -> a new float32 array of its logical shape (quantized: decoded on its device)."""
    if not w.quantized:
        return teacher_forward.dense_f32(w).copy()
    return kernels.dequantize_to(w.data, w.qtype, w.shape[0], "float32")


def _open(source):
    from ..formats.model_file import ModelFile

    return source if isinstance(source, ModelFile) else ModelFile.open(source)


def _array_module(device):
    device = device or process_device()
    if device == "cpu":
        return np
    if device in ("cuda", "gpu"):
        if not on_gpu():
            raise Q4KError("device='cuda' asked for, but this process runs on the CPU (no usable GPU)")
        import cupy

        return cupy
    raise Q4KError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _layer_weights(weights: dict, i: int) -> dict:
    """Block i's tensors without the "blk.i." prefix: {"attn_q.weight": Weight, ...}."""
    prefix = f"blk.{i}."
    return {n[len(prefix):]: w for n, w in weights.items() if n.startswith(prefix)}


def _how_kept(backend_name: str) -> str:
    return {"native": "kept quantized", "dense": "kept as stored (dense)",
            "dequant-f32": "decoded to float32", "dequant-bf16": "decoded to bfloat16",
            "dequant-f16": "decoded to float16"}[backend_name]
