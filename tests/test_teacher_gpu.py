"""The teacher on the GPU (CuPy + Numba CUDA kernels) against its own NumPy path; run with
`pytest -m gpu` on a CUDA machine (skipped elsewhere).

Tolerances: for M > 16 tokens the default kernel decodes weights to an fp16 scratch and runs
cuBLAS with fp16 operands (||err|| / ||ref|| <= 2e-3 per product, kernels/scratch.py), so the
logits are compared by per-position cosine and top-1; M <= 16 runs fp32 GEMV kernels (tight).
"""
import numpy as np
import pytest

from q4kdistill import backend
from q4kdistill.teacher.model import Teacher
from test_teacher_forward import FAMILIES, write_family
from test_teacher_real import TEXTS, cosine_rows

pytestmark = pytest.mark.gpu


def both(path):
    return Teacher.load(path, device="cpu", log=None), Teacher.load(path, device="cuda", log=None)


def padded(vocab, B, T, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T))
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    return ids, np.arange(T)[None, :] < lengths[:, None]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gpu_matches_numpy_on_every_family(name, tmp_path):
    cpu, gpu = both(write_family(name, tmp_path, seed=9))
    assert gpu.resident_bytes == cpu.resident_bytes
    for B, T, cos_min in ((1, 7, 0.999999), (4, 40, 0.9999)):             # GEMV sizes, then GEMM sizes
        ids, mask = padded(cpu.vocab_size, B, T, seed=B)
        want = cpu.logits_for_batch(ids, mask)[mask]                       # [real tokens, V]
        got = backend.to_host(gpu.logits_for_batch(ids, mask))[mask]
        assert np.isfinite(got).all()
        assert cosine_rows(got, want).min() >= cos_min
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
        chunks = [backend.to_host(c) for _, _, c in gpu.iter_logits(ids, mask, chunk_tokens=33)]
        np.testing.assert_allclose(np.concatenate(chunks).reshape(B, T, -1)[mask], got, rtol=0, atol=1e-4 * np.abs(got).max())


@pytest.mark.parametrize("backend_name", ["dequant-f32", "dequant-bf16", "dequant-f16"])
def test_gpu_dequant_backends(backend_name, tmp_path):
    cpu, gpu = both(write_family("qwen2-bias", tmp_path, seed=3))
    ids, mask = padded(cpu.vocab_size, 2, 24, seed=5)
    want = cpu.logits_for_batch(ids, mask)[mask]
    other = gpu.with_backend(backend_name)
    got = backend.to_host(other.logits_for_batch(ids, mask))[mask]
    assert cosine_rows(got, want).min() >= 0.999


@pytest.mark.slow
def test_gpu_real_gemma_matches_numpy(gemma_path):
    """The four texts of test_teacher_real as one padded batch (M = 480 > 16: fp16 operands)."""
    from q4kdistill.formats.tokenizer import Tokenizer

    cpu, gpu = both(gemma_path)
    assert gpu.resident_bytes == cpu.resident_bytes == sum(w.nbytes for w in cpu.weights.values())
    tok = Tokenizer.from_gguf(gemma_path)
    rows = [tok.encode(text) for text in TEXTS.values()]
    T = max(map(len, rows))
    ids = np.array([r + [0] * (T - len(r)) for r in rows])
    mask = np.array([[t < len(r) for t in range(T)] for r in rows])
    want = cpu.logits_for_batch(ids, mask)[mask]
    got = backend.to_host(gpu.logits_for_batch(ids, mask))[mask]
    cos = cosine_rows(got, want)
    assert cos.min() >= 0.995 and cos.mean() >= 0.9995, (cos.min(), cos.mean())
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


@pytest.mark.slow
def test_7b_manifest_resident_and_forward_peak(manifest_7b_path):
    """The claims: resident <= 1.02x the tensor bytes, forward peak at 1 x 512 <= 5.5 GB."""
    from q4kdistill.memory import meter as memory
    from q4kdistill.formats.model_file import ModelFile

    memory.install()
    meter = memory.MemoryMeter()
    with meter.phase("load"):
        teacher = Teacher.load(manifest_7b_path, log=None)
    tensor_bytes = ModelFile.open(manifest_7b_path).total_tensor_bytes
    assert teacher.resident_bytes <= 1.02 * tensor_bytes
    ids = np.random.default_rng(0).integers(0, teacher.vocab_size, (1, 512))
    with meter.phase("forward"):
        for _, _, chunk in teacher.iter_logits(ids, chunk_tokens=512):
            assert bool(backend.xp().isfinite(chunk).all())
    assert meter.record("forward").peak_bytes <= 5.5e9, meter.table()
