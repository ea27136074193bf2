"""KD losses: values against direct formulas, d/dlogits against central differences, no NaN."""
import numpy as np
import pytest

from q4kdistill.errors import Q4KError
from q4kdistill.student.losses import LossConfig, distill_loss, log_softmax, token_weights
from q4kdistill.student.ops.gradcheck import numeric_grad, rel_error

B, T, V = 2, 4, 9


def sample(seed, scale=2.0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, 3] = False
    mask[0, 0] = False
    return rng.standard_normal((B, T, V)) * scale, rng.standard_normal((B, T, V)) * scale, ids, mask


CONFIGS = [
    LossConfig("kl", temperature=2.0, alpha=0.3),
    LossConfig("rkl", temperature=0.7),
    LossConfig("jsd", beta=0.3, alpha=0.4, temperature=1.3),
    LossConfig("jsd", beta=0.0),
    LossConfig("jsd", beta=1.0),
    LossConfig("kl", top_k=3, temperature=1.5),
    LossConfig("kl", top_k=3, top_k_student="full", alpha=0.2),
    LossConfig("rkl", top_k=4),
    LossConfig("jsd", beta=0.6, top_k=2),
    LossConfig("kl", alpha=1.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-b{c.beta}-k{c.top_k}-{c.top_k_student}-a{c.alpha}")
def test_gradient(cfg):
    s, t, ids, mask = sample(1)
    loss, ds, parts = distill_loss(s, t, ids, mask, cfg)
    assert np.all(ds[~mask] == 0)                                  # padding rows get no gradient
    err = rel_error(ds, numeric_grad(lambda: distill_loss(s, t, ids, mask, cfg)[0], s))
    assert err <= 1e-6


def direct(p, q):
    return float((p * (np.log(p) - np.log(q))).sum())


def test_values_against_direct_formulas():
    s, t, ids, _ = sample(2)
    s, t = s[:1, :1], t[:1, :1]                                    # one token
    ids = ids[:1, :1]
    for T in (1.0, 2.5):
        q, p = np.exp(log_softmax(s[0] / T))[0], np.exp(log_softmax(t[0] / T))[0]
        kl = distill_loss(s, t, ids, None, LossConfig("kl", temperature=T))[0]
        rkl = distill_loss(s, t, ids, None, LossConfig("rkl", temperature=T))[0]
        assert kl == pytest.approx(T * T * direct(p, q), rel=1e-12)
        assert rkl == pytest.approx(T * T * direct(q, p), rel=1e-12)
        m = 0.3 * p + 0.7 * q
        jsd = distill_loss(s, t, ids, None, LossConfig("jsd", beta=0.3, temperature=T))[0]
        assert jsd == pytest.approx(T * T * (0.3 * direct(p, m) + 0.7 * direct(q, m)), rel=1e-12)
    assert distill_loss(s, t, ids, None, LossConfig("jsd", beta=0.0))[0] == distill_loss(s, t, ids, None, LossConfig("kl"))[0]
    assert distill_loss(s, t, ids, None, LossConfig("jsd", beta=1.0))[0] == distill_loss(s, t, ids, None, LossConfig("rkl"))[0]
    assert distill_loss(s, s, ids, None, LossConfig("jsd", beta=0.5))[0] == pytest.approx(0.0, abs=1e-15)


def test_cross_entropy_targets_skip_padding_and_last_position():
    s, t, ids, mask = sample(3)
    w = token_weights(ids, mask, LossConfig(alpha=0.5))
    tg = w["targets"].reshape(B, T)
    assert tg[0, 0] == -1 and tg[0, 1] == ids[0, 2] and tg[1, 2] == -1 and np.all(tg[:, -1] == -1)
    assert w["n_kd"] == mask.sum() and w["n_ce"] == 4
    ce = distill_loss(s, None, ids, mask, LossConfig(alpha=1.0))[2]["ce"]
    lq = log_softmax(s.reshape(-1, V))
    want = np.mean([-lq[i, tg.reshape(-1)[i]] for i in range(B * T) if tg.reshape(-1)[i] >= 0])
    assert ce == pytest.approx(want, rel=1e-12)
    with pytest.raises(Q4KError):
        distill_loss(s, None, ids, mask, LossConfig(alpha=0.5))


def test_token_counts_without_masks_are_the_counted_ones():
    """No padding and no loss mask: n_kd, n_ce are B*T and B*(T-1) without reading the masks back
    (no device sync on a GPU); they equal what counting the masks gives."""
    s, t, ids, _ = sample(4)
    w = token_weights(ids, None, LossConfig(alpha=0.5))
    assert (w["n_kd"], w["n_ce"]) == (int(w["kd_mask"].sum()), int(w["ce_mask"].sum())) == (B * T, B * (T - 1))


@pytest.mark.parametrize("kind", ["kl", "rkl", "jsd"])
def test_no_nan_with_huge_logits_and_inf_masks(kind):
    s, t, ids, mask = sample(4, scale=1e4)                         # probabilities underflow to 0
    t[..., :2] = -np.inf                                           # a vocabulary mask on both sides
    s[..., :2] = -np.inf if kind != "kl" else s[..., :2]           # (rkl/jsd: student masked the same way)
    for k in (None, 3):
        with np.errstate(invalid="raise", divide="raise", over="raise"):
            loss, ds, parts = distill_loss(s, t, ids, mask, LossConfig(kind, alpha=0.0, top_k=k, temperature=0.5))
        assert np.isfinite(loss) and np.all(np.isfinite(ds)), (kind, k)


def test_top_k():
    s, t, ids, mask = sample(5)
    full = distill_loss(s, t, ids, mask, LossConfig("rkl"))[0]
    assert distill_loss(s, t, ids, mask, LossConfig("rkl", top_k=V))[0] == pytest.approx(full, rel=1e-12)
    restricted, ds, _ = distill_loss(s, t, ids, mask, LossConfig("kl", top_k=2))
    unrestricted, ds_full, _ = distill_loss(s, t, ids, mask, LossConfig("kl", top_k=2, top_k_student="full"))
    assert unrestricted > restricted                               # full softmax also pays for mass off the top k
    outside = np.argsort(t, axis=-1)[..., :-2]                     # the V-2 smallest teacher logits
    assert np.all(np.take_along_axis(ds, outside, -1) == 0)       # restricted: no gradient off the top k
    assert np.all(np.take_along_axis(ds_full, outside, -1)[mask] > 0)  # full: pushed down there
    with pytest.raises(Q4KError):
        LossConfig("rkl", top_k=2, top_k_student="full")


@pytest.mark.parametrize("bad", [dict(kind="mse"), dict(temperature=0), dict(alpha=1.5), dict(beta=-0.1),
                                 dict(top_k=0), dict(top_k_student="half")])
def test_bad_config(bad):
    with pytest.raises(Q4KError):
        LossConfig(**bad)
