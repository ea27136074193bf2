"""The Teacher's API on tiny synthetic models: loading (GGUF, APR, manifest), backends and their
resident bytes, chunked logits, vocabulary checks, errors, and that the native path never
decodes (and keeps) a whole weight matrix."""
import json
import weakref

import numpy as np
import pytest

from q4kdistill.formats import apr

from q4kdistill.formats import quants

from q4kdistill.formats import synthetic
from q4kdistill.errors import Q4KError
from q4kdistill.formats.model_file import ModelFile
from q4kdistill.teacher.model import Teacher
from conftest import traced_peak

QTYPES = {"token_embd": "Q8_0", "attn_k": "Q5_0", "attn_output": "F16", "ffn_gate": "BF16"}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    cfg = synthetic.tiny_config("qwen2", vocab_size=389)                 # an odd vocabulary
    return synthetic.write_gguf(tmp_path_factory.mktemp("api") / "tiny.gguf", cfg, qtypes=QTYPES, seed=11)


@pytest.fixture(scope="module")
def teacher(tiny_path):
    return Teacher.load(tiny_path, device="cpu", log=None)


@pytest.fixture
def ids(teacher):
    return np.random.default_rng().integers(0, teacher.vocab_size, (2, 13))   # fresh every test


# -- loading and resident bytes -----------------------------------------------------------

def test_load_logs_and_keeps_every_tensor_as_stored(tiny_path):
    lines = []
    teacher = Teacher.load(tiny_path, device="cpu", log=lines.append)
    mf = ModelFile.open(tiny_path)
    assert teacher.backend == "native"
    assert len(lines) == 1 and "uploaded" in lines[0] and "MB, kept quantized" in lines[0]
    assert teacher.resident_bytes == mf.total_tensor_bytes                # <= 1.02x with room to spare
    for name, info in mf.tensors.items():
        w = teacher.weights[name]
        assert w.qtype == info.qtype and w.shape == info.shape
        assert np.array_equal(np.asarray(w.data), mf.tensor_data(name))  # the file's bytes, not a decode


def test_auto_picks_dense_for_a_float_file(tmp_path):
    cfg = synthetic.tiny_config("llama")
    path = synthetic.write_gguf(tmp_path / "f.gguf", cfg, qtypes={"*": "F16", "output": "F32"}, seed=1)
    lines = []
    dense = Teacher.load(path, device="cpu", log=lines.append)
    assert dense.backend == "dense" and "dense" in lines[0]
    assert dense.resident_bytes == ModelFile.open(path).total_tensor_bytes
    ids = np.random.default_rng(0).integers(0, dense.vocab_size, (1, 7))
    f32 = Teacher.load(path, backend="dequant-f32", device="cpu", log=None)
    np.testing.assert_allclose(dense.logits_for_batch(ids), f32.logits_for_batch(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, bytes_per_weight, tol", [("dequant-f32", 4, 1e-5), ("dequant-f16", 2, 3e-3),
                                                         ("dequant-bf16", 2, 3e-2)])
def test_dequant_backends(tiny_path, teacher, ids, name, bytes_per_weight, tol):
    mf = ModelFile.open(tiny_path)
    other = Teacher.load(tiny_path, backend=name, device="cpu", log=None)
    matrices = sum(t.n_elements for t in mf.tensors.values() if len(t.shape) == 2)
    vectors = sum(t.nbytes for t in mf.tensors.values() if len(t.shape) == 1)
    assert other.resident_bytes == bytes_per_weight * matrices + vectors
    assert all(not w.quantized for w in other.weights.values())
    want = teacher.logits_for_batch(ids)
    got = other.logits_for_batch(ids)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    np.testing.assert_array_equal(teacher.with_backend(name).logits_for_batch(ids), got)


def test_manifest_and_apr_load_the_same_way(tiny_path, teacher, ids, tmp_path):
    apr_path = tmp_path / "tiny.apr"
    apr.write(ModelFile.open(tiny_path), apr_path)
    from_apr = Teacher.load(str(apr_path), device="cpu", log=None)
    np.testing.assert_array_equal(from_apr.logits_for_batch(ids), teacher.logits_for_batch(ids))

    manifest_path = tmp_path / "tiny.manifest.json"
    manifest_path.write_text(json.dumps(ModelFile.open(tiny_path).to_manifest()))
    lines = []
    random_teacher = Teacher.load(str(manifest_path), device="cpu", log=lines.append)
    assert "kept quantized" in lines[0]
    assert random_teacher.resident_bytes == teacher.resident_bytes
    logits = random_teacher.logits_for_batch(ids)
    assert np.isfinite(logits).all() and not np.allclose(logits, teacher.logits_for_batch(ids))


def test_incomplete_model_is_one_clear_error(tiny_path):
    mf = ModelFile.open(tiny_path)
    del mf.tensors["blk.1.ffn_up.weight"]
    with pytest.raises(Q4KError, match="missing 1 tensors.*blk.1.ffn_up.weight"):
        Teacher.load(mf, device="cpu", log=None)
    with pytest.raises(Q4KError, match="unknown teacher backend"):
        Teacher.load(tiny_path, backend="int4", device="cpu", log=None)


# -- outputs -------------------------------------------------------------------------------

def test_chunked_logits_equal_the_full_batch(teacher, ids):
    full = teacher.logits_for_batch(ids)                                 # [B, T, V]
    flat = full.reshape(-1, teacher.vocab_size)
    chunks = list(teacher.iter_logits(ids, chunk_tokens=5))
    assert [(a, b) for a, b, _ in chunks] == [(s, min(s + 5, 26)) for s in range(0, 26, 5)]
    np.testing.assert_allclose(np.concatenate([c for _, _, c in chunks]), flat, rtol=1e-5, atol=1e-5)  # other GEMM shapes, other rounding
    fn = teacher.logits_fn(ids)
    np.testing.assert_allclose(fn(11, 17), flat[11:17], rtol=1e-5, atol=1e-5)
    h = teacher.hidden_states(ids)
    assert h.shape == (2, 13, teacher.config.d_model) and h.dtype == np.float32


def test_head_in_vocabulary_slabs_equals_one_product(teacher, ids, monkeypatch):
    from q4kdistill.teacher import forward as teacher_forward

    whole = teacher.logits_for_batch(ids)
    monkeypatch.setattr(teacher_forward, "HEAD_ROWS", 100)               # 389 rows -> 4 slabs, the last short
    sliced = teacher.logits_for_batch(ids)
    np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(teacher.logits_fn(ids)(3, 9), whole.reshape(-1, 389)[3:9], rtol=1e-5, atol=1e-5)


def test_weight_f32_decodes_one_tensor(tiny_path, teacher):
    mf = ModelFile.open(tiny_path)
    for name in ("token_embd.weight", "blk.0.attn_output.weight", "blk.1.ffn_gate.weight", "output_norm.weight"):
        got = teacher.weight_f32(name)
        assert got.dtype == np.float32 and got.shape == mf.tensors[name].shape
        np.testing.assert_array_equal(got, quants.dequantize(mf.tensor_data(name), mf.tensors[name].qtype))
    with pytest.raises(Q4KError, match="no tensor 'nope'"):
        teacher.weight_f32("nope")


def test_vocab_check_and_truncation(tiny_path, ids):
    teacher = Teacher.load(tiny_path, device="cpu", log=None)
    full = teacher.logits_for_batch(ids)
    assert teacher.check_vocab(389) == 389
    with pytest.raises(Q4KError, match=r"teacher has 389 tokens.*has 256"):
        teacher.check_vocab(256)
    assert teacher.check_vocab(256, truncate=True) == 256 == teacher.vocab_size
    cut = teacher.logits_for_batch(ids)
    assert cut.shape == (2, 13, 256)
    # the same rows of the LM head; BLAS may sum a [*, 256] product in another order than a
    # [*, 389] one (seen on CI's CPU: 1.3e-6 off at |x| 0.19), so float32 rounding, not equality
    np.testing.assert_allclose(cut, full[..., :256], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bad, mask, message", [
    (np.arange(5), None, "integer array \\[batch, tokens\\]"),
    (np.zeros((1, 3), np.float32), None, "integer array"),
    (np.array([[1, 389]]), None, "token id 389 is outside the teacher's vocabulary \\(0..388\\)"),
    (np.array([[1, -1]]), None, "token id -1"),
    (np.array([[1, 2]]), np.ones((1, 3), bool), "attention_mask has shape \\(1, 3\\)"),
])
def test_bad_inputs_are_clear_errors(teacher, bad, mask, message):
    with pytest.raises(Q4KError, match=message):
        teacher.logits_for_batch(bad, mask)


def test_bad_chunk_size(teacher, ids):
    with pytest.raises(Q4KError, match="chunk_tokens must be >= 1"):
        next(teacher.iter_logits(ids, chunk_tokens=0))


# -- the native path never decodes a whole matrix ------------------------------------------

def _forward_peak_bytes(path):
    """In a fresh process (no other test's threads allocating while tracemalloc watches): the
    host-memory peak of a 4-token forward, with the kernels' NumPy slabs cut to 1 MB."""
    import kernels.cpu

    kernels.cpu.SLAB_BYTES = 1 << 20
    teacher = Teacher.load(path, device="cpu", log=None)
    resident = teacher.resident_bytes
    with traced_peak() as traced:
        logits = teacher.logits_for_batch(np.array([[5, 300, 20000, 32767]]))
    peak = traced()
    kept_blocks = all(w.data.dtype == np.uint8 for w in teacher.weights.values() if w.quantized)
    return logits.shape, peak, teacher.resident_bytes == resident, kept_blocks


def test_native_forward_never_holds_a_decoded_matrix(tmp_path):
    """The tied 32k-token table (Q8_0: 8.9 MB as blocks, 33.5 MB decoded) is the biggest matrix.
    A forward of 4 tokens must peak far below the table's decoded size (so nothing in the teacher
    decodes it whole), and keep nothing decoded."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cfg = synthetic.tiny_config("llama", vocab_size=32768, tied_output=True)
    path = synthetic.write_gguf(tmp_path / "wide.gguf", cfg, qtypes={"token_embd": "Q8_0"}, seed=3)
    decoded_table = 4 * cfg.vocab_size * cfg.d_model
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        shape, peak, same_resident, kept_blocks = pool.submit(_forward_peak_bytes, str(path)).result()
    assert shape == (1, 4, 32768)
    assert peak < decoded_table / 4, f"forward peaked at {peak / 1e6:.1f} MB (the decoded table is {decoded_table / 1e6:.1f} MB)"
    assert same_resident and kept_blocks


@pytest.mark.parametrize("head_rows", [None, 100])            # one product; slabs of 100 vocabulary rows
def test_logits_fn_in_spans_is_the_logits_rounded(teacher, ids, monkeypatch, head_rows):
    """head_span (a GPU's policy, forced here): each call's rows are views of one span's logits made
    at once in float16 -- the float32 logits rounded, bit for bit -- asked in increasing or any order.
    One buffer serves every span while the caller lets its views go; a view still held gets the next
    span a fresh buffer (it never changes under the caller); the buffer goes with the last row."""
    from q4kdistill.teacher import forward as teacher_forward
    from q4kdistill.teacher import model as teacher_model

    if head_rows:
        monkeypatch.setattr(teacher_forward, "HEAD_ROWS", head_rows)
    assert teacher_model.head_span(False) is None                # the CPU: float32 per call
    want = teacher.logits_for_batch(ids).reshape(-1, teacher.vocab_size)
    monkeypatch.setattr(teacher_model, "head_span", lambda on_gpu, tokens=None: (10, np.float16))
    fn = teacher.logits_fn(ids)
    assert isinstance(fn, teacher_model.SpanLogits)
    N = want.shape[0]                         # 26 tokens asked 4 at a time: spans 0-10, 8-18, 16-26
    made = []
    real = teacher_forward.lm_head
    monkeypatch.setattr(teacher_forward, "lm_head",
                        lambda h, w, dtype=None, out=None: made.append(h.shape[0]) or real(h, w, dtype, out))
    h = teacher._flat_hidden(ids, None)

    def rounded(a, b, start, stop):       # the float32 product of the same rows (BLAS sums by row count)
        return real(h[a:b], teacher._head)[start - a:stop - a].astype(np.float16)

    previous = None
    for start, span in zip(range(0, N, 4), [(0, 10)] * 2 + [(8, 18)] * 2 + [(16, 26)] * 3):
        got = fn(start, min(start + 4, N))
        assert got.dtype == np.float16 and (fn.first, max(fn.stop, span[1])) == span
        np.testing.assert_array_equal(got, rounded(*span, start, min(start + 4, N)))
        np.testing.assert_allclose(got, want[start:start + 4], rtol=2e-3, atol=2e-3)
        assert previous is None or previous() is got.base         # the same buffer for every span
        previous = weakref.ref(got.base)                         # (a reference would count as a held view)
        del got
    assert made == [10, 10, 10] and fn.buffer is None            # 8:12 straddles a span: a new one from 8
    assert previous() is None                                    # let go with the last row
    first = fn(0, 4)                                             # held while the next span is made:
    second = fn(12, 16)
    assert second.base is not first.base
    np.testing.assert_array_equal(first, rounded(0, 10, 0, 4))   # ... so the held view is unchanged
    np.testing.assert_array_equal(fn(3, 5), rounded(3, 13, 3, 5))                  # out of order: made again


def test_head_span_from_the_environment(monkeypatch):
    from q4kdistill.teacher import model as teacher_model

    monkeypatch.delenv(teacher_model.SPAN_ENV, raising=False)
    assert teacher_model.head_span(True) == (teacher_model.HEAD_SPAN_TOKENS, np.float16)
    monkeypatch.setenv(teacher_model.SPAN_ENV, "512")
    assert teacher_model.head_span(True) == (512, np.float16) and teacher_model.head_span(False) is None
    monkeypatch.setenv(teacher_model.SPAN_ENV, "0")
    assert teacher_model.head_span(True) is None
    monkeypatch.setenv(teacher_model.SPAN_ENV, "lots")
    with pytest.raises(Q4KError, match="number of tokens"):
        teacher_model.head_span(True)


def test_evaluation_and_audit_logits_stay_float32(teacher, ids, monkeypatch):
    """logits_fn(spans=False) -- evaluation, audit, generate -- multiplies each call in float32 even
    where a step's loss would get float16 spans."""
    from q4kdistill.teacher import model as teacher_model

    monkeypatch.setattr(teacher_model, "head_span", lambda on_gpu, tokens=None: (10, np.float16))
    assert isinstance(teacher.logits_fn(ids), teacher_model.SpanLogits)
    fn = teacher.logits_fn(ids, spans=False)
    assert not isinstance(fn, teacher_model.SpanLogits) and fn(0, 3).dtype == np.float32
