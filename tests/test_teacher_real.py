"""The teacher on the real gemma-3-270m Q4_K_M file against two outside references.

  Hugging Face transformers  decodes the same blocks and runs float32 math: every position's
                             cosine >= 0.9999, top-1 agreement >= 99.5 %
  llama.cpp                  quantizes activations to 8 bits inside its Q4_K products, so it
                             is looser: mean cosine >= 0.998, every position >= 0.99, top-1 >= 93 %
                             (run with an F32 K/V cache, so that those 8 bits are all it changes)

Our teacher runs the four texts as ONE right-padded batch (so the padding mask is exercised on
the real model); the references run each text alone. The measured numbers are in docs/parity.md.
"""
import numpy as np
import pytest

from q4kdistill.teacher.model import Teacher
from q4kdistill.formats.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

TEXTS = {
    "prose": "The old lighthouse keeper climbed the spiral stairs every evening, long after the ships had "
             "stopped coming. He polished the great lens, wound the clockwork, and watched the beam sweep "
             "across the empty water, as if the sea might still need someone to remember it.",
    "code": "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
            "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
            "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    "numbers": "Quarterly revenue rose from $1,234,567.89 to $2,468,013.57 (+99.9%). Inventory: 42 crates "
               "x 17 units = 714 units; 3.14159 * 2.71828 = 8.53973; 2024-03-15T08:30:00Z; 0x1F4A, 1e-6.",
    "non-English": "Le petit prince regarda les étoiles et demanda pourquoi elles brillaient. "
                   "Der schnelle braune Fuchs springt über den faulen Hund. "
                   "東京は日本の首都であり、多くの人々が住んでいます。 "
                   "Москва — столица России, крупнейший город страны.",
}


def cosine_rows(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def agreement(ours: dict, ref: dict) -> dict:
    """Per-position cosine and top-1 agreement over all texts."""
    cos = np.concatenate([cosine_rows(ours[k], ref[k]) for k in TEXTS])
    top1 = np.concatenate([ours[k].argmax(-1) == ref[k].argmax(-1) for k in TEXTS])
    return {"positions": cos.size, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "top1": float(top1.mean())}


@pytest.fixture(scope="module")
def token_ids(gemma_path):
    tok = Tokenizer.from_gguf(gemma_path)
    return {k: tok.encode(text) for k, text in TEXTS.items()}           # BOS first, as the file says


@pytest.fixture(scope="module")
def ours(gemma_path, token_ids):
    """Our NumPy teacher on one right-padded batch [4, T_max] -> {text: [T_i, V]}."""
    teacher = Teacher.load(gemma_path, device="cpu", log=None)
    T = max(len(ids) for ids in token_ids.values())
    batch = np.zeros((len(TEXTS), T), np.int64)
    mask = np.zeros((len(TEXTS), T), bool)
    for row, ids in enumerate(token_ids.values()):
        batch[row, :len(ids)] = ids
        mask[row, :len(ids)] = True
    logits = teacher.logits_for_batch(batch, mask)                      # [4, T, V]
    assert np.isfinite(logits).all()                                    # padded positions too
    return {k: logits[row, :len(ids)] for row, (k, ids) in enumerate(token_ids.items())}


@pytest.fixture(scope="module")
def hf_logits(gemma_path, token_ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import os

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gemma_path), gguf_file=os.path.basename(gemma_path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return {k: model(torch.tensor([ids])).logits[0].numpy() for k, ids in token_ids.items()}


@pytest.fixture(scope="module")
def llama_cpp_logits(gemma_path, token_ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    # F32 K/V cache (type 0) and no flash attention: then the only approximation left in the
    # reference is its 8-bit activations (with the default F16 cache the worst position of the
    # numbers text drops from 0.992 to 0.981 for transformers and for us alike)
    llm = llama_cpp.Llama(gemma_path, logits_all=True, n_ctx=512, n_batch=512, verbose=False,
                          type_k=0, type_v=0, flash_attn=False)
    out = {}
    for k, ids in token_ids.items():
        llm.reset()
        llm.eval(ids)
        out[k] = np.array(llm.scores[:len(ids)], np.float32)
    return out


def test_texts_are_long_and_varied(token_ids):
    lengths = {k: len(v) for k, v in token_ids.items()}
    assert 300 <= sum(lengths.values()) <= 450, lengths
    assert min(lengths.values()) >= 50, lengths


def test_matches_transformers(ours, hf_logits, record_property):
    m = agreement(ours, hf_logits)
    record_property("vs_transformers", m)
    print("vs transformers:", m)
    assert m["positions"] >= 300
    assert m["cos_min"] >= 0.9999, m
    assert m["top1"] >= 0.995, m


def test_matches_llama_cpp(ours, llama_cpp_logits, record_property, request):
    """Against llama.cpp (its own quantized-activation path): cos_mean >= 0.998, cos_min >= 0.99, top-1
    >= 93 %, or, where the llama.cpp build itself lies further from the float32 reference than that, as
    close to it as transformers fp32 is (llama-cpp-python 0.3.36 put one of the 324 positions at cosine
    0.98180 from transformers; ours at 0.98180 too: 2026-12-04)."""
    m = agreement(ours, llama_cpp_logits)
    record_property("vs_llama_cpp", m)
    print("vs llama.cpp:", m)
    try:
        yard = agreement(request.getfixturevalue("hf_logits"), llama_cpp_logits)
    except pytest.skip.Exception:
        yard = None
    floor = {"cos_mean": 0.998, "cos_min": 0.99, "top1": 0.93}
    if yard is not None:                     # the same llama.cpp build against transformers fp32
        slack = {"cos_mean": 1e-4, "cos_min": 1e-4, "top1": 0.01}
        floor = {k: min(v, yard[k] - slack[k]) for k, v in floor.items()}
    assert m["positions"] >= 300
    for key, least in floor.items():
        assert m[key] >= least, (key, m, yard)


def test_transformers_vs_llama_cpp_for_scale(hf_logits, llama_cpp_logits):
    """The two references against each other: the yardstick for the llama.cpp thresholds."""
    m = agreement(hf_logits, llama_cpp_logits)
    print("transformers vs llama.cpp:", m)
    assert m["cos_mean"] >= 0.99, m
