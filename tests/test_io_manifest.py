"""Manifest JSON: load/save, a teacher described by one, random valid tensors for it."""
import copy
import json

import numpy as np
import pytest

from q4kdistill.formats import manifest

from q4kdistill.formats import quants

from q4kdistill.formats import synthetic
from q4kdistill.errors import FileFormatError
from q4kdistill.formats.model_file import ModelFile


@pytest.fixture(scope="module")
def manifest_7b(manifest_7b_path):
    with open(manifest_7b_path) as f:
        return json.load(f)


def test_7b_manifest_teacher(manifest_7b_path, manifest_7b):
    mf = ModelFile.open(manifest_7b_path)
    assert mf.kind == "manifest" and len(mf.tensors) == 339
    assert mf.total_tensor_bytes == 4_677_120_000 == manifest_7b["total_tensor_bytes"]
    assert mf.to_manifest() == manifest_7b
    assert mf.dtype_histogram() == {"Q4_K": {"count": 169, "bytes": 3_427_909_632},
                                    "Q6_K": {"count": 29, "bytes": 1_247_877_120},
                                    "F32": {"count": 141, "bytes": 1_333_248}}
    cfg = mf.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (28, 3584, 28, 4, 18944, 152064)
    assert cfg.qkv_bias and not cfg.tied_output and cfg.rope_style == "neox"
    info = mf.tensors["blk.0.ffn_down.weight"]
    assert (info.shape, info.shape_ggml, info.type_name) == ((3584, 18944), (18944, 3584), "Q6_K")


def test_manifest_dict_and_save_round_trip(manifest_7b, tmp_path):
    path = tmp_path / "m.json"
    manifest.save(manifest_7b, path)
    assert ModelFile.open(path).to_manifest() == manifest_7b
    assert ModelFile.open(copy.deepcopy(manifest_7b)).to_manifest() == manifest_7b


def test_random_tensors_are_valid_and_deterministic(manifest_7b):
    small = copy.deepcopy(manifest_7b)
    small["tensors"] = [t for t in small["tensors"] if t["name"].startswith("blk.0.attn") or t["name"] == "output_norm.weight"]
    del small["total_tensor_bytes"]
    mf, again, other = ModelFile.open(small), ModelFile.open(small), ModelFile.open(small, seed=1)
    for name, info in mf.tensors.items():
        data = mf.tensor_data(name)
        assert data.shape == info.data_shape and data.nbytes == info.nbytes
        assert np.array_equal(data, again.tensor_data(name))
        values = quants.dequantize(data, info.qtype) if info.quantized else data
        assert np.isfinite(values).all()
        if "norm" in name:
            assert (values == 1).all()
        else:
            assert values.std() > 0 and not np.array_equal(data, other.tensor_data(name))
    q, k = mf.tensor_data("blk.0.attn_q.weight"), mf.tensor_data("blk.0.attn_output.weight")
    assert not np.array_equal(q[:10], k[:10])          # different tensors, different blocks


def test_manifest_of_a_synthetic_file_matches_its_header(tmp_path):
    path = synthetic.write_gguf(tmp_path / "t.gguf", synthetic.tiny_config("gemma3"))
    full = ModelFile.open(path)
    m = full.to_manifest()
    assert m["metadata"]["tokenizer.ggml.tokens"] == {"array_len": 384}
    assert m["metadata"]["general.name"] == "tiny gemma3"
    assert ModelFile.open(m).config == full.config
    assert [t["name"] for t in m["tensors"]] == list(full.config.tensor_shapes())


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["tensors"][0].update(nbytes=5), "nbytes 5 but Q6_K"),
    (lambda m: m["tensors"][0].update(type="Q9_X"), "unknown quant type 'Q9_X'"),
    (lambda m: m["tensors"][0].update(shape_ggml=[100, 3]), "not a multiple of Q6_K's block of 256"),
    (lambda m: m["tensors"][0].update(shape_ggml=[2 ** 40, 2 ** 40]), "absurd shape"),
    (lambda m: m["tensors"][0].pop("name"), "needs 'name'"),
    (lambda m: m["tensors"].append(dict(m["tensors"][1])), "listed twice"),
    (lambda m: m.update(total_tensor_bytes=1), "total_tensor_bytes 1"),
    (lambda m: m.pop("tensors"), "not a manifest"),
])
def test_bad_manifests(manifest_7b, edit, problem):
    bad = copy.deepcopy(manifest_7b)
    edit(bad)
    with pytest.raises(FileFormatError, match=problem):
        ModelFile.open(bad)


def test_summaries():
    assert manifest.summarize_value(list(range(65))) == {"array_len": 65}
    assert manifest.summarize_value(list(range(64))) == list(range(64))
    assert manifest.summarize_value("x" * 257) == {"chars": 257}
    assert manifest.summarize_value("é" * 256) == "é" * 256
