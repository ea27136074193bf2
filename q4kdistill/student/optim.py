"""AdamW over one flat parameter buffer, with fp32 moments, global-norm clipping and a
linear warm-up + cosine schedule.

One step (t = steps taken so far + 1, g = grad * clip_scale, wd = weight_decay on the matrix
prefix flat[:decay_stop] and 0 on norms and biases, see params.py):

    m = b1 m + (1 - b1) g
    v = b2 v + (1 - b2) g^2
    p = p - lr * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd p )     (decoupled decay)

On CuPy the whole update is one fused elementwise kernel per region; on NumPy a few in-place passes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from ..backend import array_module
from ..errors import Q4KError


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    total_steps: int = 1000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0     # max global grad norm; None or 0: no clipping

    def __post_init__(self):
        if self.lr < 0 or self.min_lr < 0:
            raise Q4KError(f"learning rates must be >= 0 (lr={self.lr}, min_lr={self.min_lr})")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise Q4KError(f"need warmup_steps >= 0 and total_steps >= 1 (got {self.warmup_steps}, {self.total_steps})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise Q4KError(f"betas must be in [0, 1) (got {self.beta1}, {self.beta2})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to lr over warmup_steps, then a
    cosine from lr down to min_lr at total_steps, and min_lr after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.total_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


@functools.lru_cache(maxsize=None)
def _fused_kernel():
    import cupy

    return cupy.ElementwiseKernel(
        "T g, float32 scale, float32 lr, float32 wd, float32 b1, float32 b2, float32 c1, float32 c2, float32 eps",
        "T p, float32 m, float32 v",
        """
        float gs = (float)g * scale;
        m = b1 * m + (1.0f - b1) * gs;
        v = b2 * v + (1.0f - b2) * gs * gs;
        p = p - (T)(lr * ((m / c1) / (sqrtf(v / c2) + eps) + wd * (float)p));
        """,
        "q4kdistill_adamw")


@functools.lru_cache(maxsize=None)
def _square_sum_kernel():
    """sum(x * x) in float64 over a whole array in one pass (CUB's reduction: no copy, no temporary)."""
    import cupy

    return cupy.ReductionKernel("T x", "float64 y", "(double)x * (double)x", "a + b", "y = a", "0",
                                "q4kdistill_square_sum", reduce_type="double")


_NORM_SLICE = 1 << 24          # elements per slice of the grad-norm sum on the host (64 MB of float32)
_HOST_SLICE = 1 << 16          # elements per slice of the NumPy update (256 KB of float32: in cache)


class AdamW:
    def __init__(self, params, grads, cfg: OptimConfig = None, rows=None):
        """params, grads: FlatBuffers of one layout (params.py). ``rows``: a RowGrad, the grad of the
        params' first tensor when ``grads`` leaves it out (grads.start > 0): that tensor's rows are
        updated as if its dense grad were zero outside the rows the step gathered (so exactly as a
        dense grad would update them: m and v decay, weight decay applies, every row moves)."""
        if bool(grads.start) != (rows is not None):
            raise Q4KError("AdamW: a grad buffer without its first tensor needs that tensor's RowGrad, and only then")
        self.params, self.grads, self.rows = params, grads, rows
        self.cfg = cfg or OptimConfig()
        xp = array_module(params.flat)
        self.m = xp.zeros(params.size, dtype=xp.float32)
        self.v = xp.zeros(params.size, dtype=xp.float32)
        self.steps = 0                                    # steps taken

    @classmethod
    def for_student(cls, student, cfg: OptimConfig = None) -> "AdamW":
        return cls(student.param_buffer, student.grad_buffer, cfg, rows=student.embedding_rows)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.cfg)

    def grad_norm(self) -> float:
        """Global L2 norm of the grads. CuPy: one float64 reduction over the flat buffer (CUB; no
        copy: CuPy's dot copies its operands, +1.98 GB at 0.5B; and 30 cuBLAS dots over 64 MB slices
        took 3.3 ms where one pass over the 2 GB takes ~0.6: H200, docs/perf.md ninth stop). NumPy:
        dots over slices (a float32 dot of each, summed in float64)."""
        xp = array_module(self.grads.flat)
        g = self.grads.flat
        if xp.__name__ == "cupy":
            kernel = _square_sum_kernel()
            parts = [kernel(g)] if g.size else []
            if self.rows is not None:                  # + the gathered rows, summed per id
                parts.append(kernel(self.rows.summed()[1]))
            return math.sqrt(sum(float(p) for p in (xp.stack(parts).get() if parts else [])))   # one read
        step = _NORM_SLICE
        parts = [xp.dot(g[i:i + step], g[i:i + step]) for i in range(0, g.size, step)]
        if self.rows is not None:
            r = self.rows.summed()[1].reshape(-1)
            parts.append(xp.dot(r, r))
        return math.sqrt(sum(float(p) for p in parts))

    def step(self, grad_norm: float | None = None) -> dict:
        """One update from the current grads -> dict(lr, grad_norm, clip_scale). ``grad_norm``: the
        caller's grad_norm() of these grads (distill reads it first to skip non-finite steps), so
        they are not read again."""
        cfg = self.cfg
        norm = self.grad_norm() if grad_norm is None else float(grad_norm)
        scale = min(1.0, cfg.grad_clip / (norm + 1e-6)) if cfg.grad_clip else 1.0
        lr = self.lr_at(self.steps)
        t = self.steps + 1
        c1, c2 = 1.0 - cfg.beta1 ** t, 1.0 - cfg.beta2 ** t
        cut, start = self.params.decay_stop, self.grads.start
        if start:                                      # the first tensor (a matrix: weight-decayed), by rows
            self._update_rows(start, scale, lr, cfg.weight_decay if start <= cut else 0.0, c1, c2)
        for region, wd in ((slice(start, max(start, cut)), cfg.weight_decay), (slice(max(start, cut), None), 0.0)):
            self._update(region, scale, lr, wd, c1, c2)
        self.steps = t
        return dict(lr=lr, grad_norm=norm, clip_scale=scale)

    def _update(self, region, scale, lr, wd, c1, c2):
        s = self.grads.start                           # where the grad buffer's flat begins in the layout
        g = self.grads.flat[slice(region.start - s, None if region.stop is None else region.stop - s)]
        self._apply(self.params.flat[region], g, self.m[region], self.v[region], scale, lr, wd, c1, c2)

    def _update_rows(self, start, scale, lr, wd, c1, c2):
        """flat[:start], a [V, D] table whose grad is self.rows: every row updated with a zero grad,
        then the gathered rows again from their state before, with their summed grad (the same
        arithmetic as a dense grad's update, element by element)."""
        V, D = self.rows.shape
        p, m, v = (a[:start].reshape(V, D) for a in (self.params.flat, self.m, self.v))
        ids, g = self.rows.summed()
        before = p[ids], m[ids], v[ids]                # copies (fancy indexing)
        self._apply(p, None, m, v, scale, lr, wd, c1, c2)
        pu, mu, vu = before
        self._apply(pu, g, mu, vu, scale, lr, wd, c1, c2)
        p[ids], m[ids], v[ids] = pu, mu, vu

    def _apply(self, p, g, m, v, scale, lr, wd, c1, c2):
        """AdamW on arrays p, m, v (in place) with grad g of their shape, or None: zero."""
        cfg = self.cfg
        if p.size == 0:
            return
        xp = array_module(p)
        if xp.__name__ == "cupy":
            g = xp.zeros((), dtype=p.dtype) if g is None else g        # broadcast: a zero grad, no [V, D] array
            _fused_kernel()(g, scale, lr, wd, cfg.beta1, cfg.beta2, c1, c2, cfg.eps, p, m, v)
            return
        # NumPy: the same element-wise arithmetic over slices of _HOST_SLICE, so the temporaries stay in
        # cache instead of ten fresh params-sized arrays per step (6.5 s -> ~1 s at 179 M parameters)
        p, m, v = p.reshape(-1), m.reshape(-1), v.reshape(-1)
        g = None if g is None else g.reshape(-1)
        zero = xp.zeros(1, dtype=p.dtype)
        for i in range(0, p.size, _HOST_SLICE):
            sl = slice(i, i + _HOST_SLICE)
            ps, gs, ms, vs = p[sl], (zero if g is None else g[sl]) * scale, m[sl], v[sl]
            ms *= cfg.beta1
            ms += (1.0 - cfg.beta1) * gs
            vs *= cfg.beta2
            vs += (1.0 - cfg.beta2) * gs * gs
            upd = (ms / c1) / (xp.sqrt(vs / c2) + cfg.eps)
            if wd:
                upd += wd * ps
            ps -= lr * upd

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{'steps', 'm', 'v', 'config'}; m and v are the live fp32 buffers (to_host them to save)."""
        return dict(steps=self.steps, m=self.m, v=self.v, config=self.cfg.to_dict())

    def load_state_dict(self, state: dict) -> None:
        xp = array_module(self.m)
        for key in ("m", "v"):
            if tuple(state[key].shape) != tuple(self.m.shape):
                raise Q4KError(f"optimizer state {key!r} has shape {tuple(state[key].shape)}, "
                               f"this model needs {tuple(self.m.shape)} (another student layout?)")
        self.m[...] = xp.asarray(state["m"])
        self.v[...] = xp.asarray(state["v"])
        self.steps = int(state["steps"])
        if "config" in state:
            self.cfg = OptimConfig(**state["config"])
