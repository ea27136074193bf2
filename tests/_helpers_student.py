"""Helpers shared by the student tests: tiny configs of every family, random params, a padded batch."""
import math

import numpy as np

from q4kdistill.config import ModelConfig


def tiny_config(family, **changes):
    """Odd little sizes; kv heads < heads; two blocks."""
    base = dict(n_layers=2, d_model=10, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=9, vocab_size=13, norm_eps=1e-5)
    if family == "llama":
        cfg = ModelConfig("llama", rope_style="norm", act="silu", tied_output=False, **base)
    elif family == "qwen2":
        cfg = ModelConfig("qwen2", rope_style="neox", act="silu", qkv_bias=True, tied_output=True, **base)
    else:
        cfg = ModelConfig("gemma3", rope_style="neox", act="gelu_tanh", qk_norm=True, post_norms=True,
                          embed_scale=math.sqrt(base["d_model"]), attn_scale=0.4, sliding_window=2,
                          swa_layers=[0], rope_base=1e6, rope_base_swa=10.0, tied_output=True, **base)
    return cfg.replace(**changes)


def randomize(student, rng, scale=0.4):
    """Parameters large enough that every nonlinearity matters (norm weights around 1)."""
    for name, view in student.params.items():
        values = rng.standard_normal(view.shape) * scale + (1.0 if name.endswith("norm.weight") else 0.0)
        view[...] = student.xp.asarray(values)                 # (NumPy or CuPy params)


def batch(rng, cfg, B=2, T=5):
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    mask = np.ones((B, T), bool)
    mask[0, T - 2:] = False        # right padding
    mask[1, :1] = False            # left padding: its first query sees no key
    return ids, mask
