"""Distillation losses over [n, V] logit chunks: value per token and exact d/d(student logits).

Notation: s, t are student and teacher logits of one chunk [n, V]; T the temperature;
q = softmax(s/T) (student), p = softmax(t/T) (teacher); every log-probability comes from a
log-sum-exp, and terms with a zero probability are dropped (0 log 0 = 0), so huge logits and
-inf masks give no NaN. Soft losses are scaled by T^2 (Hinton), so their gradients keep their
size when T changes.

  kind "kl"   forward KL(p || q)      = sum p (log p - log q)      d/dz = q - p
  kind "rkl"  reverse KL(q || p)      = sum q (log q - log p)      d/dz = q (L - sum q L),  L = log q - log p
  kind "jsd"  generalised JSD, m = beta p + (1 - beta) q:
              beta KL(p || m) + (1 - beta) KL(q || m)               d/dz = (1-beta) q (L - sum q L),  L = log q - log m
              The mixture form vanishes at both ends, so (as TRL's GKD trainer does)
              beta = 0 is exactly forward KL(p || q) and beta = 1 exactly reverse KL(q || p).
  kind "skl"  skew KL (DistiLLM), a = skew_alpha, m = a p + (1 - a) q:
              KL(p || m) = sum p (log p - log m)                  d/dz = -(1-a) (r - q sum r),  r = q p / m
  kind "srkl" skew reverse KL (DistiLLM), m' = a q + (1 - a) p:
              KL(q || m') = sum q (log q - log m')                d/dz = q (G - sum q G),  G = L - a q / m'
                                                                    with L = log q - log m'
              (a = 0 gives the plain KL / reverse KL; a -> 1 makes the loss vanish, so a is in [0, 1).)
  kind "tvd"  total variation distance 0.5 sum |p - q|           d/dz = q (S - sum q S),  S = 0.5 sign(q - p)
              (not differentiable where some q_i = p_i exactly; the sign there is 0.)
  (z = s/T, so d/ds = T^2 * d/dz / T = T * d/dz.)
A teacher mask (-inf logit) where the student still has mass makes the reverse KL infinite in
exact math; here log 0 is LOG_FLOOR = -1e30, so the loss is huge but finite and never NaN.

Hard labels: CE of the next token (targets are input_ids shifted left; the last position and
padding have none), at temperature 1. The total is alpha * CE + (1 - alpha) * KD, each a mean
over its own tokens: KD over real tokens, CE over tokens that have a real next token.

Sparse teacher (a teacher cache, ``SparseTargets``): per token the teacher's top-k ids K and
log-probs log p_i (softmax at temperature T over the whole vocabulary) and the log of the rest
mass log p_rest = log(1 - sum_K p_i), stored as logsumexp over the ids outside K. The student is
grouped the same way: k + 1 classes with logits c = [z_K, logsumexp(z_rest)] (z = s/T), so
log q_i = z_i - logsumexp(z), log q_rest = logsumexp(z outside K) - logsumexp(z), both exact and
stable (never 1 - sum). The loss is ``kind`` between these two distributions over k + 1 classes,
a proper divergence (0 iff they agree). d/dz_i = dc_i for i in K and, outside K,
d/dz_j = dc_rest * softmax(z outside K)_j (the gradient of the log-sum-exp).

Top-k teacher (``top_k``): only the teacher's k largest logits are kept, renormalised over them.
The student then is either
  "restricted" (default): also renormalised over the same k tokens (works for every kind), or
  "full": its full softmax over V (kind "kl" only: KL(p_k || q) = cross-entropy to the sparse
          target minus its entropy; the other kinds would be infinite).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..backend import array_module
from ..errors import Q4KError

KINDS = ("kl", "rkl", "jsd", "skl", "srkl", "tvd")
LOG_FLOOR = -1e30     # log(0) as a finite number: two masked log-probs then differ by 0, not NaN


@dataclass
class LossConfig:
    kind: str = "kl"                  # "kl" | "rkl" | "jsd" | "skl" | "srkl" | "tvd"
    temperature: float = 1.0
    alpha: float = 0.0                # weight of the hard-label CE: alpha * CE + (1 - alpha) * KD
    beta: float = 0.5                 # JSD mixture weight (0: forward KL, 1: reverse KL)
    skew_alpha: float = 0.1           # skew of "skl" / "srkl" (DistiLLM's default), in [0, 1)
    top_k: int | None = None          # keep only the teacher's k largest logits
    top_k_student: str = "restricted"  # "restricted" | "full" (kind "kl" only)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise Q4KError(f"loss kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.temperature > 0:
            raise Q4KError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise Q4KError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise Q4KError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise Q4KError(f"skew_alpha must be in [0, 1), got {self.skew_alpha}")
        if self.top_k is not None and self.top_k < 1:
            raise Q4KError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_k_student not in ("restricted", "full"):
            raise Q4KError(f"top_k_student {self.top_k_student!r}: expected 'restricted' or 'full'")
        if self.top_k is not None and self.top_k_student == "full" and self.effective_kind() != "kl":
            raise Q4KError("top_k_student='full' needs the forward KL (kind 'kl', or 'jsd' with beta 0)")

    def effective_kind(self) -> str:
        """The kind actually computed ('jsd' with beta 0 or 1, 'skl'/'srkl' with skew 0: a plain KL)."""
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            return "kl" if self.beta == 0.0 else "rkl"
        if self.kind in ("skl", "srkl") and self.skew_alpha == 0.0:
            return self.kind[1:]
        return self.kind

    def mix(self) -> float:
        """The mixture weight soft_rows needs: beta for 'jsd', skew_alpha for 'skl'/'srkl'."""
        return self.skew_alpha if self.kind in ("skl", "srkl") else self.beta

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- building blocks ---------------------------------------------------------------------------
def log_softmax(z):
    """Row log-softmax of z [n, V] by log-sum-exp; -inf entries (masks) come back as LOG_FLOOR."""
    xp = array_module(z)
    m = z.max(axis=-1, keepdims=True)
    out = z - xp.where(xp.isfinite(m), m, 0.0)
    out -= xp.log(xp.exp(out).sum(axis=-1, keepdims=True))
    return xp.maximum(out, LOG_FLOOR, out=out)


def _plogp_diff(p, a, b):
    """sum over rows of p (a - b), dropping p == 0 terms (there a = log p is LOG_FLOOR)."""
    xp = array_module(p)
    return (p * xp.where(p > 0, a - b, 0.0)).sum(axis=-1)


def _centered(q, L):
    """q (L - sum q L): the softmax Jacobian applied to L, with q == 0 terms dropped."""
    xp = array_module(q)
    qL = q * xp.where(q > 0, L, 0.0)
    return qL - q * qL.sum(axis=-1, keepdims=True)


def soft_rows(lq, lp, kind, beta):
    """Per-row soft loss and d/dz (z = student logits / T), from log-probs lq (student), lp (teacher).
    ``beta``: the JSD mixture weight, or the skew a of 'skl' / 'srkl'."""
    xp = array_module(lq)
    q, p = xp.exp(lq), xp.exp(lp)
    if kind == "kl":
        return _plogp_diff(p, lp, lq), q - p
    if kind == "rkl":
        return _plogp_diff(q, lq, lp), _centered(q, lq - lp)
    if kind in ("skl", "srkl", "tvd"):
        return _skew_or_tvd_rows(q, p, lq, lp, kind, beta)
    lm = xp.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))   # log(beta p + (1-beta) q)
    rows = beta * _plogp_diff(p, lp, lm) + (1.0 - beta) * _plogp_diff(q, lq, lm)
    return rows, (1.0 - beta) * _centered(q, lq - lm)


def _skew_or_tvd_rows(q, p, lq, lp, kind, a):
    """Rows and d/dz of the skew KLs (mixture weight a in [0, 1)) and the total variation distance."""
    xp = array_module(q)
    if kind == "tvd":
        return 0.5 * xp.abs(p - q).sum(axis=-1), _centered(q, 0.5 * xp.sign(q - p))
    log_a = math.log(a) if a > 0 else LOG_FLOOR
    if kind == "skl":                                                 # KL(p || a p + (1-a) q)
        lm = xp.logaddexp(lp + log_a, lq + math.log1p(-a))
        r = xp.where(p > 0, q * xp.exp(xp.minimum(lp - lm, -log_a)), 0.0)   # q p / m  (p / m <= 1 / a)
        return _plogp_diff(p, lp, lm), -(1.0 - a) * (r - q * r.sum(axis=-1, keepdims=True))
    lm = xp.logaddexp(lq + log_a, lp + math.log1p(-a))               # KL(q || a q + (1-a) p)
    qm = xp.exp(xp.minimum(lq - lm, -log_a))                          # q / m'  (<= 1 / a)
    return _plogp_diff(q, lq, lm), _centered(q, lq - lm - a * qm)


def _top_k_index(t, k):
    """Column indices [n, k] of each row's k largest teacher logits."""
    xp = array_module(t)
    return xp.argpartition(t, t.shape[-1] - k, axis=-1)[:, -k:]


def kd_rows(s, t, cfg: LossConfig):
    """Soft loss per row [n] (times T^2) and d(rows)/ds [n, V], for s, t [n, V]."""
    xp = array_module(s)
    T = float(cfg.temperature)
    kind = cfg.effective_kind()
    if cfg.top_k is None or cfg.top_k >= s.shape[-1]:
        rows, dz = soft_rows(log_softmax(s / T), log_softmax(t / T), kind, cfg.mix())
        return T * T * rows, T * dz
    idx = _top_k_index(t, cfg.top_k)                              # [n, k]
    r = xp.arange(s.shape[0])[:, None]
    lp = log_softmax(t[r, idx] / T)                               # teacher over its top k
    if cfg.top_k_student == "full":
        lq_full = log_softmax(s / T)
        dz = xp.exp(lq_full)
        dz[r, idx] -= xp.exp(lp)                                  # q - p, p zero off the top k
        return T * T * _plogp_diff(xp.exp(lp), lp, lq_full[r, idx]), T * dz
    rows, dz_k = soft_rows(log_softmax(s[r, idx] / T), lp, kind, cfg.mix())
    ds = xp.zeros_like(s)
    ds[r, idx] = dz_k
    return T * T * rows, T * ds


class SparseTargets:
    """A teacher's top-k per token: ids [n, k] int, logp [n, k + 1] (top-k log-probs, then the rest)."""

    def __init__(self, ids, logp):
        self.ids, self.logp = ids, logp

    @property
    def shape(self):
        return tuple(self.ids.shape)

    def rows(self, start, stop) -> "SparseTargets":
        return SparseTargets(self.ids[start:stop], self.logp[start:stop])

    def to(self, xp) -> "SparseTargets":
        return SparseTargets(xp.asarray(self.ids), xp.asarray(self.logp))


def sparse_kd_rows(s, sparse: SparseTargets, cfg: LossConfig):
    """Soft loss per row [n] (times T^2) and d/ds [n, V] against a sparse teacher (see the module docstring)."""
    xp = array_module(s)
    T = float(cfg.temperature)
    z = s / T
    n, V = z.shape
    idx = sparse.ids.astype(xp.int64)
    r = xp.arange(n)[:, None]
    rest = z.copy()
    rest[r, idx] = -xp.inf                                        # z outside K
    m = rest.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    sum_rest = xp.exp(rest - m).sum(axis=-1, keepdims=True)
    lse_rest = xp.where(sum_rest > 0, m + xp.log(xp.where(sum_rest > 0, sum_rest, 1.0)), -xp.inf)  # [n, 1]; -inf: K is all
    c = xp.concatenate([z[r, idx], lse_rest], axis=-1)           # [n, k + 1] class logits
    rows, dc = soft_rows(log_softmax(c), xp.maximum(sparse.logp.astype(z.dtype), LOG_FLOOR),
                         cfg.effective_kind(), cfg.mix())
    dz = xp.exp(rest - xp.where(xp.isfinite(lse_rest), lse_rest, 0.0)) * dc[:, -1:]   # 0 on K (exp(-inf))
    dz[r, idx] = dc[:, :-1]
    return T * T * rows, T * dz


def ce_rows(s, targets, need_grad=True):
    """Cross-entropy per row [n] and d(rows)/ds [n, V] (or None); rows with target < 0 give 0."""
    xp = array_module(s)
    has = targets >= 0
    tgt = xp.where(has, targets, 0)
    r = xp.arange(s.shape[0])
    lq = log_softmax(s)
    rows = xp.where(has, -lq[r, tgt], 0.0)
    if not need_grad:
        return rows, None
    ds = xp.exp(lq)
    ds[r, tgt] -= 1.0
    ds *= has[:, None]
    return rows, ds


# -- what the student calls --------------------------------------------------------------------
def token_weights(input_ids, attention_mask, cfg: LossConfig, loss_mask=None, counts=None):
    """Per-token targets and loss weights, flattened row-major over [B, T].

    ``loss_mask`` [B, T] (instruction data): 1 where the id is a training target (a response
    token). Position t predicts id t + 1, so with a loss mask both KD and CE count exactly the
    positions whose next id is a target; without one, KD counts every real position.
    ``counts`` (n_kd, n_ce): normalise by these token counts instead of this batch's own (data
    parallelism: a rank's rows divided by the global batch's counts, so the ranks' sums are the
    whole batch's mean).
    -> dict(targets [N] int (-1: none), kd_mask, ce_mask [N] bool, kd_weight, ce_weight [N],
            n_kd, n_ce) with the weights already holding (1 - alpha)/n_kd and alpha/n_ce."""
    xp = array_module(input_ids)
    B, T = input_ids.shape
    real = xp.ones((B, T), dtype=bool) if attention_mask is None else attention_mask.astype(bool)
    has_next = xp.zeros((B, T), dtype=bool)
    has_next[:, :-1] = real[:, :-1] & real[:, 1:]
    if loss_mask is not None:
        has_next[:, :-1] &= xp.asarray(loss_mask)[:, 1:].astype(bool)
    targets = xp.full((B, T), -1, dtype=xp.int64)
    targets[:, :-1] = input_ids[:, 1:]
    targets = xp.where(has_next, targets, -1).reshape(-1)
    kd_mask = (real if loss_mask is None else has_next).reshape(-1)
    ce_mask = has_next.reshape(-1)
    if counts is not None:
        n_kd, n_ce = int(counts[0]), int(counts[1])
    elif attention_mask is None and loss_mask is None:      # known without reading the device (no sync)
        n_kd, n_ce = B * T, B * (T - 1)
    else:
        n_kd, n_ce = int(kd_mask.sum()), int(ce_mask.sum())
    kd_w = kd_mask * ((1.0 - cfg.alpha) / max(n_kd, 1))
    ce_w = ce_mask * (cfg.alpha / max(n_ce, 1))
    return dict(targets=targets, kd_mask=kd_mask, ce_mask=ce_mask, kd_weight=kd_w, ce_weight=ce_w,
                n_kd=n_kd, n_ce=n_ce)


def chunk_loss(s, t, targets, kd_weight, ce_weight, cfg: LossConfig):
    """One token chunk: s [n, V] student logits, t [n, V] teacher logits (None: CE only).

    -> (kd_rows [n], ce_rows [n], ds [n, V]) where ds = d/ds sum(kd_weight kd_rows + ce_weight ce_rows)."""
    xp = array_module(s)
    ce, dce = ce_rows(s, targets, need_grad=cfg.alpha > 0)
    ds = xp.zeros_like(s) if dce is None else dce * ce_weight[:, None].astype(s.dtype)
    if t is None:
        if cfg.alpha != 1.0:
            raise Q4KError("no teacher logits: only the hard-label loss (alpha = 1) can be computed")
        return xp.zeros_like(ce), ce, ds
    if isinstance(t, SparseTargets):
        kd, dkd = sparse_kd_rows(s, t, cfg)
    else:
        kd, dkd = kd_rows(s, t.astype(s.dtype, copy=False), cfg)
    ds += dkd * kd_weight[:, None].astype(s.dtype)
    return kd, ce, ds


def masked_sum(rows, mask):
    """sum of rows where mask (padding rows may hold anything, even inf)."""
    xp = array_module(rows)
    return float(xp.where(mask, rows, 0.0).sum())


def distill_loss(s, t, input_ids, attention_mask, cfg: LossConfig, loss_mask=None):
    """Whole-batch form: s, t [B, T, V] -> (loss, ds [B, T, V], parts). See Student for the chunked one."""
    B, T, V = s.shape
    w = token_weights(input_ids, attention_mask, cfg, loss_mask)
    kd, ce, ds = chunk_loss(s.reshape(-1, V), None if t is None else t.reshape(-1, V),
                            w["targets"], w["kd_weight"], w["ce_weight"], cfg)
    loss, parts = finish_parts(masked_sum(kd, w["kd_mask"]), masked_sum(ce, w["ce_mask"]), w, cfg)
    return loss, ds.reshape(B, T, V), parts


def finish_parts(kd_sum, ce_sum, w, cfg: LossConfig):
    """(loss, parts) from the masked row sums of a whole batch."""
    kd = kd_sum / max(w["n_kd"], 1)
    ce = ce_sum / max(w["n_ce"], 1)
    loss = cfg.alpha * ce + (1.0 - cfg.alpha) * kd
    return loss, dict(loss=loss, kd=kd, ce=ce, tokens=w["n_kd"])
