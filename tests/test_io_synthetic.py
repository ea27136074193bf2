"""Synthetic teachers: tiny configs and complete GGUFs that our reader and llama.cpp both load."""
import numpy as np
import pytest

from q4kdistill.formats import quants

from q4kdistill.formats import synthetic
from q4kdistill.errors import Q4KError
from q4kdistill.formats.model_file import ModelFile

ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    return {arch: synthetic.write_gguf(d / f"{arch}.gguf", synthetic.tiny_config(arch), seed=7) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_file_says_what_the_config_says(files, arch):
    cfg = synthetic.tiny_config(arch)
    mf = ModelFile.open(files[arch])
    assert mf.config == cfg and mf.architecture == arch
    assert {n: t.shape for n, t in mf.tensors.items()} == cfg.tensor_shapes()
    assert list(mf.tensors) == list(cfg.tensor_shapes())
    assert mf.metadata["general.file_type"] == 15                      # MOSTLY_Q4_K_M
    for name, info in mf.tensors.items():
        want = "F32" if len(info.shape) == 1 else ("Q6_K" if name.split(".")[-2] in ("attn_v", "ffn_down", "output") else "Q4_K")
        assert info.type_name == want, name


def test_family_features():
    llama, qwen, gemma = (synthetic.tiny_config(a) for a in ARCHS)
    assert (llama.rope_style, llama.act, llama.tied_output, llama.qkv_bias) == ("norm", "silu", False, False)
    assert (qwen.rope_style, qwen.qkv_bias, qwen.tied_output) == ("neox", True, False)
    assert (gemma.act, gemma.qk_norm, gemma.post_norms, gemma.tied_output) == ("gelu_tanh", True, True, True)
    assert gemma.sliding_window == 8 and gemma.swa_layers == [0, 1] and gemma.embed_scale == 16.0
    assert "blk.1.attn_q.bias" in qwen.tensor_shapes() and "blk.1.post_ffw_norm.weight" in gemma.tensor_shapes()


def test_overrides_round_trip(tmp_path):
    cfg = synthetic.tiny_config("gemma3", n_layers=7, n_heads=8, n_kv_heads=1, head_dim=32, d_ff=768,
                                vocab_size=300, swa_layers=[0, 2, 4], rope_base_swa=5000.0, tied_output=False,
                                norm_eps=1e-5)
    assert cfg.n_layers == 7 and cfg.swa_layers == [0, 2, 4] and not cfg.tied_output
    path = synthetic.write_gguf(tmp_path / "g.gguf", cfg, qtypes={"*": "Q8_0", "output": "F16"}, seed=2)
    mf = ModelFile.open(path)
    assert mf.config == cfg
    assert mf.tensors["output.weight"].type_name == "F16" and mf.tensors["blk.6.ffn_down.weight"].type_name == "Q8_0"


def test_weights_are_the_promised_distributions(files):
    mf = ModelFile.open(files["llama"])
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        info = mf.tensors[name]
        w = quants.dequantize(mf.tensor_data(name), info.qtype)
        assert w.shape == info.shape
        assert abs(w.std() * np.sqrt(info.shape[1]) - 1) < 0.1, name
    norm = mf.tensor_data("blk.0.attn_norm.weight")
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.2
    other = synthetic.write_gguf(files["llama"] + ".seed8", synthetic.tiny_config("llama"), seed=8)
    assert not np.array_equal(ModelFile.open(other).tensor_data("output_norm.weight"), mf.tensor_data("output_norm.weight"))


@pytest.mark.parametrize("overrides, problem", [
    (dict(qkv_bias=True), "cannot express qkv_bias=True"),
    (dict(act="gelu_tanh"), "cannot express act='gelu_tanh'"),
])
def test_inexpressible_configs(overrides, problem):
    with pytest.raises(Q4KError, match=problem):
        synthetic.tiny_config("llama", **overrides)


def test_bad_requests(tmp_path):
    with pytest.raises(Q4KError, match="unsupported architecture 'gpt2'"):
        synthetic.tiny_config("gpt2")
    with pytest.raises(Q4KError, match="rows of 288 values are not whole Q4_K blocks"):
        synthetic.write_gguf(tmp_path / "x.gguf", synthetic.tiny_config("llama", d_model=288, n_heads=4, head_dim=72))
    with pytest.raises(Q4KError, match="too small"):
        synthetic.tiny_config("qwen2", vocab_size=100)
    with pytest.raises(Q4KError, match="exactly 384"):
        synthetic.write_gguf(tmp_path / "x.gguf", synthetic.tiny_config("llama"), tokenizer={"tokenizer.ggml.tokens": ["a"]})


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_loads_and_runs_it(files, arch):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(files[arch], n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = model.tokenize(b"hello world, the model", add_bos=True)
    assert model.detokenize(ids).decode().strip() == "hello world, the model"
    model.eval(ids)
    logits = np.array(model.scores[:len(ids)])
    assert logits.shape == (len(ids), 384) and np.isfinite(logits).all() and logits.std() > 0.1
