"""Fit the GPU you have: the distillation settings that put the most tokens in one step under a budget.

The planner predicts a step's peak from the teacher's header alone (``planner.make_plan``); this
module searches the settings that planner knows and that change memory but not what is learned per
token:

    batch                    B sequences of the given T tokens (tokens per step = B * T)
    chunk_tokens             the [chunk, V] logits slab of the student's LM head and loss
    checkpoint_activations   keep each block's activations, or recompute them in the backward

and picks, for the largest B whose leanest setting fits, the fastest setting that still fits
(checkpointing off before on, larger chunks before smaller). "Fits" means

    predicted step peak x (1 + margin) <= budget

with ``margin`` = 10 % by default: every planner row is held within 10 % of its measurement by
``reproduce-memory``. The teacher's own LM-head slab (``teacher.forward.HEAD_ROWS``) is a fixed
constant of the forward, not a setting, so it is not searched.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import Q4KError

MARGIN = 0.10
CHUNKS = (1024, 512, 256, 128, 64, 32)          # fastest first
MAX_BATCH = 4096

_UNITS = {"": 1, "B": 1, "K": 10 ** 3, "KB": 10 ** 3, "M": 10 ** 6, "MB": 10 ** 6, "G": 10 ** 9, "GB": 10 ** 9,
          "T": 10 ** 12, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_bytes(text) -> int:
    """'24GB' (10^9), '24GiB' (2^30), '2.5e10', '512MB' -> bytes; anything else -> Q4KError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise Q4KError(f"memory budget {text!r}: expected a size such as 24GB, 24GiB, 512MB or 2.5e10")
        value, unit = float(m.group(1)), m.group(2).upper()
    n = value * _UNITS[unit]
    if not 2 ** 20 <= n <= 2 ** 50:
        raise Q4KError(f"memory budget {text!r}: expected between 1 MiB and 1 PiB")
    return int(n)


def free_gpu_bytes() -> int:
    """The current GPU's free memory plus what this process's CuPy pool holds but does not use."""
    from .. import backend

    if not backend.on_gpu():
        raise Q4KError("--gpu-memory auto needs a GPU (this run is on the CPU); give a size such as 24GB")
    import cupy

    free, _total = cupy.cuda.runtime.memGetInfo()
    pool = cupy.get_default_memory_pool()
    return int(free + pool.free_bytes())


@dataclass
class Choice:
    batch: int
    seq: int
    chunk_tokens: int
    checkpoint_activations: bool
    predicted_peak_bytes: int
    budget_bytes: int
    margin: float
    next_larger: dict | None        # the next setting (batch + 1, leanest) and its peak, which does not fit

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        n = self.next_larger
        nxt = ("" if n is None else f"; batch {n['batch']} would not fit: {n['predicted_peak_bytes'] / 1e9:.2f} GB, "
               f"{n['predicted_peak_bytes'] * (1 + self.margin) / 1e9:.2f} GB with the margin")
        return (f"batch {self.batch} x seq {self.seq}, chunk {self.chunk_tokens} tokens, checkpointing "
                f"{'on' if self.checkpoint_activations else 'off'}: predicted peak "
                f"{self.predicted_peak_bytes / 1e9:.2f} GB (+{self.margin:.0%} margin) within "
                f"{self.budget_bytes / 1e9:.2f} GB{nxt}")


def _settings(fixed: dict):
    """(checkpoint, chunk) pairs, fastest first, with the user's explicit ones held fixed."""
    cks = [fixed["checkpoint_activations"]] if "checkpoint_activations" in fixed else [False, True]
    chunks = [fixed["chunk_tokens"]] if "chunk_tokens" in fixed else list(CHUNKS)
    return [(ck, c) for ck in cks for c in chunks]


def fit(teacher, budget_bytes: int, seq: int = 512, student=None, *, margin: float = MARGIN,
        teacher_backend: str = "native", fixed: dict | None = None, max_batch: int = MAX_BATCH) -> Choice:
    """The most tokens per step that fit ``budget_bytes`` (see the module docstring).

    teacher: path, manifest dict or ModelFile; student: a spec (see ``student.spec``); fixed: settings
    the user gave explicitly (``batch``, ``chunk_tokens``, ``checkpoint_activations``) that the search
    keeps. Raises Q4KError when not even one sequence fits."""
    from .planner import make_plan, open_teacher

    if seq < 1:
        raise Q4KError(f"seq must be >= 1, got {seq}")
    fixed = dict(fixed or {})
    info = open_teacher(teacher)
    settings = _settings(fixed)
    leanest = min(settings, key=lambda s: (not s[0], s[1]))          # checkpointing on, smallest chunk
    cache = {}

    def peak(batch, ck, chunk) -> int:
        key = (batch, ck, chunk)
        if key not in cache:
            cache[key] = make_plan(info, batch, seq, student, chunk_tokens=min(chunk, batch * seq), checkpoint=ck,
                                   teacher_backend=teacher_backend).distill_step_peak_bytes
        return cache[key]

    def fits(batch, ck, chunk) -> bool:
        return peak(batch, ck, chunk) * (1 + margin) <= budget_bytes

    if "batch" in fixed:
        best = int(fixed["batch"])
        if not fits(best, *leanest):
            raise Q4KError(f"--batch {best} x --seq {seq} does not fit {budget_bytes / 1e9:.2f} GB: the planner "
                           f"predicts {peak(best, *leanest) / 1e9:.2f} GB (+{margin:.0%} margin) even with its "
                           "leanest settings")
    else:
        if not fits(1, *leanest):
            raise Q4KError(f"not even one sequence of {seq} tokens fits {budget_bytes / 1e9:.2f} GB: the planner "
                           f"predicts {peak(1, *leanest) / 1e9:.2f} GB (+{margin:.0%} margin) at batch 1 with "
                           "checkpointing on; lower --seq or use a smaller student")
        lo, hi = 1, 2                                                 # lo fits; find the first hi that does not
        while hi <= max_batch and fits(hi, *leanest):
            lo, hi = hi, hi * 2
        hi = min(hi, max_batch + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, *leanest) else (lo, mid)
        best = lo
    ck, chunk = next(s for s in settings if fits(best, *s))
    nxt = None
    if best < max_batch and "batch" not in fixed:
        nxt = {"batch": best + 1, "chunk_tokens": min(leanest[1], (best + 1) * seq),
               "checkpoint_activations": leanest[0], "predicted_peak_bytes": peak(best + 1, *leanest)}
    return Choice(batch=best, seq=seq, chunk_tokens=min(chunk, best * seq), checkpoint_activations=ck,
                  predicted_peak_bytes=peak(best, ck, chunk), budget_bytes=int(budget_bytes), margin=margin,
                  next_larger=nxt)


def student_spec_of_run(cfg, teacher_config) -> dict:
    """The student a DistillConfig builds, as a planner spec (teacher blocks, or another file's widths)."""
    if cfg.student_init:
        from ..formats.model_file import ModelFile

        s = ModelFile.open(cfg.student_init).config
        return {"n_layers": s.n_layers, "d_model": s.d_model, "d_ff": s.d_ff, "n_heads": s.n_heads,
                "n_kv_heads": s.n_kv_heads, "head_dim": s.head_dim, "tied": int(s.tied_output)}
    from ..train.loop import spread_layers

    return {"layers": list(cfg.student_layers or spread_layers(teacher_config.n_layers, 4))}


def apply_budget(cfg, explicit=None, log=print):
    """``cfg`` with batch, chunk_tokens and checkpoint_activations chosen for ``cfg.gpu_memory``.

    explicit: the settings the user gave (they win); None: every field still at its default is free."""
    import dataclasses

    from .planner import open_teacher

    if not cfg.gpu_memory:
        return cfg
    budget = free_gpu_bytes() if str(cfg.gpu_memory).strip().lower() == "auto" else parse_bytes(cfg.gpu_memory)
    if explicit is None:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        explicit = {k for k in ("batch", "chunk_tokens", "checkpoint_activations") if getattr(cfg, k) != defaults[k]}
    fixed = {k: getattr(cfg, k) for k in ("batch", "chunk_tokens", "checkpoint_activations") if k in explicit}
    info = open_teacher(cfg.teacher)
    backend = cfg.teacher_backend if cfg.teacher_backend in ("native", "dequant-f32", "dequant-bf16") else "native"
    choice = fit(info, budget, seq=cfg.seq, student=student_spec_of_run(cfg, info.config), fixed=fixed,
                 teacher_backend=backend)
    log(f"--gpu-memory {cfg.gpu_memory}: {choice.line()}")
    return dataclasses.replace(cfg, batch=choice.batch, chunk_tokens=choice.chunk_tokens,
                               checkpoint_activations=choice.checkpoint_activations)
