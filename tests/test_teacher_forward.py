"""The teacher's forward on tiny synthetic models of every family against a float64 reference.

tests/reference_forward.py decodes the same GGUF with gguf.quants and spells every op out in
float64, one unpadded sequence at a time; the teacher runs a right-padded batch in float32.
Each family model carries its features: GQA, untied/tied heads, qkv biases, q/k norms, post
norms, embedding scaling, sliding windows shorter than T with their own rope base, and a mix
of quant and float types (Q4_K, Q6_K, Q8_0, Q5_0, F16, BF16, F32).
"""
import numpy as np
import pytest

import reference_forward as ref
from q4kdistill.formats import synthetic
from q4kdistill.teacher.model import Teacher

FAMILIES = {
    # name: (architecture, tiny_config overrides, qtypes)
    "llama-gqa": ("llama", dict(n_kv_heads=2),
                  {"token_embd": "Q4_K", "attn_k": "Q8_0", "ffn_up": "Q5_0", "attn_output": "F16", "ffn_gate": "BF16"}),
    "llama-mha-tied": ("llama", dict(n_kv_heads=4, tied_output=True), {"token_embd": "Q6_K"}),
    "qwen2-bias": ("qwen2", {}, {"token_embd": "Q4_K", "attn_q": "Q8_0"}),
    "gemma3-swa": ("gemma3", dict(n_layers=3, n_kv_heads=1, sliding_window=4, swa_layers=[0, 2]),
                   {"token_embd": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_0", "ffn_up": "Q5_0"}),
}
B, T = 3, 13
LENGTHS = (13, 9, 1)                      # right padding: real tokens per row


def write_family(name, directory, seed=0) -> str:
    arch, overrides, qtypes = FAMILIES[name]
    return synthetic.write_gguf(directory / f"{name}.gguf", synthetic.tiny_config(arch, **overrides),
                                qtypes=qtypes, seed=seed)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(path, teacher, reference weights) of one family's tiny model."""
    path = write_family(request.param, tmp_path_factory.mktemp("teacher"), seed=len(request.param))
    return path, Teacher.load(path, device="cpu", log=None), ref.load_weights(path)


def padded_batch(vocab):
    """Fresh random ids [B, T] (printed on failure) and the right-padding mask."""
    seed = np.random.SeedSequence().entropy
    print("ids seed", seed)
    ids = np.random.default_rng(seed).integers(0, vocab, (B, T))
    mask = np.arange(T)[None, :] < np.array(LENGTHS)[:, None]          # [B, T]
    return ids, mask


def test_matches_float64_reference(family):
    path, teacher, weights = family
    ids, mask = padded_batch(teacher.vocab_size)
    ids[~mask] = 0                                                       # pad id
    logits = teacher.logits_for_batch(ids, mask)                         # [B, T, V]
    assert logits.dtype == np.float32 and logits.shape == (B, T, teacher.vocab_size)
    assert np.isfinite(logits).all()
    for b, n in enumerate(LENGTHS):
        want = ref.reference_logits(weights, teacher.config, ids[b, :n])  # [n, V] float64
        scale = np.abs(want).max()
        np.testing.assert_allclose(logits[b, :n], want, rtol=0, atol=2e-5 * scale)
        assert (logits[b, :n].argmax(-1) == want.argmax(-1)).all()


def test_padding_does_not_leak_into_real_positions(family):
    _, teacher, _ = family
    ids, mask = padded_batch(teacher.vocab_size)
    a = teacher.logits_for_batch(ids, mask)
    ids2 = np.where(mask, ids, (ids + 7) % teacher.vocab_size)          # other tokens in the padding
    b = teacher.logits_for_batch(ids2, mask)
    np.testing.assert_allclose(a[mask], b[mask], rtol=0, atol=1e-5 * np.abs(a).max())
    assert not np.allclose(a[~mask], b[~mask])                           # the padding did change


def test_hidden_states_are_the_reference_trunk(family):
    _, teacher, weights = family
    ids, _ = padded_batch(teacher.vocab_size)
    h = teacher.hidden_states(ids)                                       # [B, T, D]
    assert h.shape == (B, T, teacher.config.d_model)
    want = ref.reference_hidden(weights, teacher.config, ids[1])
    np.testing.assert_allclose(h[1], want, rtol=0, atol=2e-5 * np.abs(want).max())


# Each family feature must matter, or the parity above would not be checking it: switch one off
# in the teacher's config and the logits must leave the reference.
FEATURES = {
    "llama-gqa": dict(rope_style="neox"),
    "qwen2-bias": dict(qkv_bias=None),                                   # biases dropped, below
    "gemma3-swa": dict(sliding_window=None),
    "llama-mha-tied": dict(rope_base=500.0),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_each_feature_is_exercised(name, tmp_path):
    teacher = Teacher.load(write_family(name, tmp_path, seed=5), device="cpu", log=None)
    ids = np.random.default_rng(4).integers(0, teacher.vocab_size, (1, T))
    good = teacher.logits_for_batch(ids)
    change = FEATURES[name]
    if "qkv_bias" in change:
        for layer in teacher.layers:
            for n in "qkv":
                layer.pop(f"attn_{n}.bias")
    else:
        teacher.config = teacher.config.replace(**change)
    bad = teacher.logits_for_batch(ids)
    assert np.abs(bad - good).max() > 1e-3 * np.abs(good).max()


def test_gemma_scaling_and_windows_are_set():
    cfg = synthetic.tiny_config("gemma3", **FAMILIES["gemma3-swa"][1])
    assert cfg.embed_scale == pytest.approx(np.sqrt(cfg.d_model))
    assert cfg.layer_window(0) == 4 < T and cfg.layer_window(1) is None
    assert cfg.layer_rope_base(0) != cfg.layer_rope_base(1)
