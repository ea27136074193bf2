"""Our encoders against llama.cpp itself (the libggml that llama-cpp-python ships).

Two routes into llama.cpp's reference quantizers:
  * ``ggml_quantize_chunk`` - the per-tensor call llama-quantize makes (no imatrix => the
    ``quantize_row_*_ref`` functions) - on hand-picked awkward inputs, every type we encode;
  * ``llama_model_quantize`` on a whole one-layer llama GGUF (Gaussian and real gemma-3
    weights) to Q4_K_M, which mixes Q4_K and Q6_K tensors.
Both must give the same bytes as ours; the issue's bound (RMSE within 5 % of llama.cpp's) is
asserted on its own so that it still speaks if a future llama.cpp changes its rounding.
Skipped where llama-cpp-python is not installed (it is in the ``ref`` extra).
"""
import ctypes
import glob
import os

import gguf
import numpy as np
import pytest

from q4kdistill.formats import quants

from q4kdistill.formats import synthetic

from _helpers_quants import gguf_tensors

llama_cpp = pytest.importorskip("llama_cpp")
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def ggml_quantize():
    """float32 [rows, cols] -> llama.cpp's bytes uint8 [rows, row_bytes], through ggml_quantize_chunk."""
    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base here")
    fn = ctypes.CDLL(libs[0]).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def run(x, name):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], quants.row_bytes(name, x.shape[1])), np.uint8)
        fn(int(T[name]), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out
    return run


def rmse(raw, name, x):
    return float(np.sqrt(np.mean((quants.dequantize(raw, name) - x) ** 2)))


def awkward_inputs():
    rng = np.random.default_rng(0)
    x = {
        "gauss": rng.standard_normal((24, 512)),
        "gauss_0.02": 0.02 * rng.standard_normal((24, 512)),
        "fp16_subnormal_scales": 1e-6 * rng.standard_normal((4, 256)),
        "student_t3": rng.standard_t(3, (24, 512)),
        "sparse": np.where(rng.random((8, 256)) < 0.97, 0, rng.standard_normal((8, 256))),
        "all_positive": np.abs(rng.standard_normal((4, 256))),
        "all_negative": -np.abs(rng.standard_normal((4, 256))),
        "integers": rng.integers(-8, 8, (4, 256)),
        "constant_and_zero": np.r_[np.full((1, 256), 0.5), np.full((1, 256), -0.5), np.zeros((1, 256))],
    }
    return {k: v.astype(np.float32) for k, v in x.items()}


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0"])
def test_same_bytes_as_ggml_quantize_chunk(name, ggml_quantize):
    for case, x in awkward_inputs().items():
        ours, ref = quants.quantize(x, name), ggml_quantize(x, name)
        differ = (ours.reshape(-1, quants.type_size(name)) != ref.reshape(-1, quants.type_size(name))).any(-1)
        assert not differ.any(), f"{name} {case}: {differ.sum()} of {differ.size} blocks differ from llama.cpp"


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_rmse_on_gaussian_within_5_percent_of_llama_cpp(name, ggml_quantize):
    x = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    assert rmse(quants.quantize(x, name), name, x) <= 1.05 * rmse(ggml_quantize(x, name), name, x)


def _write_llama_f32(path, tensors):
    """A one-layer llama GGUF with float32 tensors {name: array}: enough for llama_model_quantize."""
    d_model, d_ff = tensors["blk.0.ffn_gate.weight"].shape[::-1]
    meta = {"general.architecture": "llama", "llama.context_length": 128, "llama.embedding_length": d_model,
            "llama.block_count": 1, "llama.feed_forward_length": d_ff, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 4, "llama.rope.dimension_count": d_model // 4,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": tensors["token_embd.weight"].shape[0],
            "general.file_type": int(gguf.LlamaFileType.ALL_F32)}
    synthetic.write_file(path, meta, tensors.items())


def test_q4_k_m_file_from_llama_model_quantize(tmp_path, gemma_path):
    """Gaussian and real (dequantized gemma-3) weights through llama.cpp's whole-file Q4_K_M."""
    real = {name: quants.dequantize(data, info.qtype).reshape(-1)
            for name, (info, data) in gguf_tensors(gemma_path).items() if name.startswith("blk.0.")}
    rng = np.random.default_rng(2)
    D, F, V = 512, 1024, 512

    def gauss(*shape):
        return 0.02 * rng.standard_normal(shape)

    def from_gemma(name, *shape):
        return real[name][:np.prod(shape)].reshape(shape)

    tensors = {
        "token_embd.weight": gauss(V, D), "output_norm.weight": np.ones(D), "output.weight": gauss(V, D),
        "blk.0.attn_norm.weight": np.ones(D), "blk.0.ffn_norm.weight": np.ones(D),
        "blk.0.attn_q.weight": from_gemma("blk.0.attn_q.weight", D, D),
        "blk.0.attn_k.weight": 0.02 * rng.standard_t(3, (D, D)),
        "blk.0.attn_v.weight": from_gemma("blk.0.ffn_up.weight", D, D),
        "blk.0.attn_output.weight": from_gemma("blk.0.attn_output.weight", D, D),
        "blk.0.ffn_gate.weight": from_gemma("blk.0.ffn_gate.weight", F, D),
        "blk.0.ffn_up.weight": gauss(F, D),
        "blk.0.ffn_down.weight": from_gemma("blk.0.ffn_down.weight", D, F),
    }
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    src, dst = tmp_path / "f32.gguf", tmp_path / "q4_k_m.gguf"
    _write_llama_f32(src, tensors)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0

    checked = set()
    for t in gguf.GGUFReader(str(dst)).tensors:
        name = t.tensor_type.name
        if name not in ("Q4_K", "Q6_K"):
            continue
        x, ref = tensors[t.name], np.asarray(t.data)
        ours = quants.quantize(x, name)
        assert rmse(ours, name, x) <= 1.05 * rmse(ref, name, x), f"{t.name} ({name})"
        assert np.array_equal(ours, ref), f"{t.name} ({name}) differs from llama.cpp's bytes"
        checked.add(name)
    assert checked == {"Q4_K", "Q6_K"}
