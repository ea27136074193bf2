"""Skew KL, skew reverse KL and total variation distance: values against direct float64 formulas,
d/dlogits against central differences, the limits a = 0 (plain KL), no NaN with masks."""
import numpy as np
import pytest

from q4kdistill.errors import Q4KError
from q4kdistill.student.losses import LossConfig, distill_loss, log_softmax
from q4kdistill.student.ops.gradcheck import numeric_grad, rel_error

B, T, V = 2, 3, 11


def sample(seed, scale=2.0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, 2] = False
    return rng.standard_normal((B, T, V)) * scale, rng.standard_normal((B, T, V)) * scale, ids, mask


CONFIGS = [
    LossConfig("skl", skew_alpha=0.1),
    LossConfig("skl", skew_alpha=0.7, temperature=1.7, alpha=0.3),
    LossConfig("srkl", skew_alpha=0.1),
    LossConfig("srkl", skew_alpha=0.5, temperature=0.6),
    LossConfig("tvd"),
    LossConfig("tvd", temperature=2.0, alpha=0.25),
    LossConfig("skl", skew_alpha=0.3, top_k=4),
    LossConfig("srkl", skew_alpha=0.3, top_k=4),
    LossConfig("tvd", top_k=3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-a{c.skew_alpha}-T{c.temperature}-k{c.top_k}")
@pytest.mark.parametrize("seed", [1, 2])
def test_gradient_against_finite_differences(cfg, seed):
    s, t, ids, mask = sample(seed)
    loss, ds, _ = distill_loss(s, t, ids, mask, cfg)
    assert loss > 0 and np.all(ds[~mask] == 0)
    num = numeric_grad(lambda: distill_loss(s, t, ids, mask, cfg)[0], s)
    assert np.abs(num).max() > 1e-3                                 # the check has something to compare
    assert rel_error(ds, num) <= 1e-6


def kl(p, q):
    return float((p * (np.log(p) - np.log(q))).sum())


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_values_against_direct_formulas(temp):
    s, t, ids, _ = sample(3)
    s, t, ids = s[:1, :1], t[:1, :1], ids[:1, :1]                   # one token
    q, p = np.exp(log_softmax(s[0] / temp))[0], np.exp(log_softmax(t[0] / temp))[0]
    for a in (0.05, 0.5, 0.9):
        skl = distill_loss(s, t, ids, None, LossConfig("skl", skew_alpha=a, temperature=temp))[0]
        srkl = distill_loss(s, t, ids, None, LossConfig("srkl", skew_alpha=a, temperature=temp))[0]
        assert skl == pytest.approx(temp ** 2 * kl(p, a * p + (1 - a) * q), rel=1e-12)
        assert srkl == pytest.approx(temp ** 2 * kl(q, a * q + (1 - a) * p), rel=1e-12)
    tvd = distill_loss(s, t, ids, None, LossConfig("tvd", temperature=temp))[0]
    assert tvd == pytest.approx(temp ** 2 * 0.5 * np.abs(p - q).sum(), rel=1e-12)


def test_skew_zero_is_the_plain_kl_and_skew_shrinks_the_loss():
    s, t, ids, mask = sample(4)
    for skew, plain in (("skl", "kl"), ("srkl", "rkl")):
        a0 = distill_loss(s, t, ids, mask, LossConfig(skew, skew_alpha=0.0))
        ref = distill_loss(s, t, ids, mask, LossConfig(plain))
        assert a0[0] == ref[0] and np.array_equal(a0[1], ref[1])
        values = [distill_loss(s, t, ids, mask, LossConfig(skew, skew_alpha=a))[0] for a in (0.0, 0.2, 0.5, 0.9)]
        assert all(x > y > 0 for x, y in zip(values, values[1:]))   # the mixture moves m towards the first argument
    assert distill_loss(s, s, ids, mask, LossConfig("tvd"))[0] == 0.0


@pytest.mark.parametrize("kind", ["skl", "srkl", "tvd"])
def test_no_nan_with_huge_logits_and_inf_masks(kind):
    s, t, ids, mask = sample(5, scale=1e4)                         # probabilities underflow to 0
    t[..., :2] = -np.inf
    s[..., :2] = -np.inf
    for k in (None, 3):
        with np.errstate(invalid="raise", divide="raise", over="raise"):
            loss, ds, _ = distill_loss(s, t, ids, mask, LossConfig(kind, skew_alpha=0.2, top_k=k, temperature=0.5))
        assert np.isfinite(loss) and np.all(np.isfinite(ds)), (kind, k)


@pytest.mark.parametrize("bad", [dict(kind="skl", skew_alpha=1.0), dict(kind="srkl", skew_alpha=-0.1),
                                 dict(kind="tvd", top_k=2, top_k_student="full")])
def test_bad_config(bad):
    with pytest.raises(Q4KError):
        LossConfig(**bad)
