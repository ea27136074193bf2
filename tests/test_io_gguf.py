"""GGUF header reading (whole and truncated files) and ModelFile's memory-mapped tensor views."""
import json
import os

import gguf
import numpy as np
import pytest

from q4kdistill.formats import gguf_file

from q4kdistill.formats import manifest

from q4kdistill.formats import synthetic
from q4kdistill.cli import inspect
from q4kdistill.errors import FileFormatError
from q4kdistill.formats.model_file import ModelFile


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    qtypes = {"token_embd": "Q8_0", "attn_k": "Q5_0", "attn_q": "F16", "ffn_up": "BF16"}
    return {arch: synthetic.write_gguf(d / f"{arch}.gguf", synthetic.tiny_config(arch), qtypes, seed=1)
            for arch in ("llama", "qwen2", "gemma3")}


def test_truncated_7b_header_equals_the_shared_manifest(deepseek_chunk_path, manifest_7b_path):
    with open(manifest_7b_path) as f:
        want = json.load(f)
    h = gguf_file.read_header(deepseek_chunk_path, summarize=True)
    got = manifest.to_dict(h.metadata, h.tensors.values(), want["source"], h.version)
    assert got == want
    assert len(h.tensors) == 339 and h.data_offset < os.path.getsize(deepseek_chunk_path)


def test_header_only_model_file_of_the_truncated_7b(deepseek_chunk_path, manifest_7b_path):
    mf = ModelFile.open(deepseek_chunk_path, header_only=True)
    ref = ModelFile.open(manifest_7b_path)
    assert mf.config == ref.config
    assert mf.config.n_layers == 28 and mf.config.vocab_size == 152064 and mf.config.qkv_bias
    assert mf.to_manifest()["tensors"] == ref.to_manifest()["tensors"]
    assert mf.metadata["tokenizer.ggml.tokens"] == {"array_len": 152064}
    with pytest.raises(FileFormatError, match=r"truncated: tensor output.weight needs bytes up to \d+, file has 99614720"):
        mf.tensor_data("output.weight")


def test_full_open_refuses_the_truncated_7b(deepseek_chunk_path):
    with pytest.raises(FileFormatError, match=r"truncated: tensor \S+ needs bytes up to \d+, file has 99614720"):
        ModelFile.open(deepseek_chunk_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_same_as_gguf_reader(tiny_files, arch):
    mf = ModelFile.open(tiny_files[arch])
    reader = gguf.GGUFReader(tiny_files[arch])
    _assert_same_as_reader(mf, reader)
    types = {t.type_name for t in mf.tensors.values()}
    assert {"Q8_0", "Q5_0", "F16", "BF16", "Q4_K", "Q6_K", "F32"} <= types


def test_real_gemma_file(gemma_path):
    mf = ModelFile.open(gemma_path)
    cfg = mf.config
    assert (cfg.architecture, cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.sliding_window) == ("gemma3", 18, 640, 262144, 512)
    assert cfg.swa_layers == [i for i in range(18) if i not in (5, 11, 17)] and cfg.tied_output
    assert {k: h["count"] for k, h in mf.dtype_histogram().items()} == {"Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9, "F32": 109}
    tokens = mf.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 262144 and tokens[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert len(mf.metadata["tokenizer.ggml.scores"]) == 262144
    # the tensors tile the data section: each starts where the previous ends (aligned), the last ends the file
    end = None
    for info in sorted(mf.tensors.values(), key=lambda t: t.offset):
        assert end is None or info.offset == -(-end // 32) * 32
        end = info.offset + info.nbytes
    assert end == os.path.getsize(gemma_path)
    assert mf.tensor_data("token_embd.weight").shape == (262144, 680)       # Q8_0: 640 / 32 * 34


@pytest.mark.slow
def test_same_as_gguf_reader_on_gemma(gemma_path):
    """GGUFReader takes 8-20 s on this file (a view per vocabulary entry); we take 0.3 s."""
    _assert_same_as_reader(ModelFile.open(gemma_path), gguf.GGUFReader(gemma_path))


def _assert_same_as_reader(mf, reader):
    assert list(mf.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = mf.tensors[t.name]
        data = mf.tensor_data(t.name)
        assert info.qtype == t.tensor_type and info.shape_ggml == tuple(int(d) for d in t.shape)
        assert info.nbytes == t.n_bytes and info.offset == t.data_offset
        assert data.shape == info.data_shape
        assert np.array_equal(data.view(np.uint8), np.asarray(t.data).view(np.uint8))
        assert isinstance(data.base, np.memmap) or isinstance(data.base.base, np.memmap)   # a view, not a copy
        assert not data.flags.writeable
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert mf.metadata == fields


def test_views_share_the_mapped_file(tiny_files):
    mf = ModelFile.open(tiny_files["llama"])
    a, b = mf.tensor_data("blk.0.attn_v.weight"), mf.tensor_data("blk.0.attn_v.weight")
    assert a.dtype == np.uint8 and a.shape == (128, 210)          # Q6_K: [kv_dim, 256/256*210]
    assert np.shares_memory(a, b) and np.shares_memory(a, mf._mapped())
    assert mf.tensor_data("blk.0.attn_q.weight").dtype == np.float16
    assert mf.tensor_data("blk.0.ffn_up.weight").dtype == np.uint16         # BF16 as raw bits
    assert mf.tensor_data("output_norm.weight").shape == (256,)


def test_histogram_and_predicted_bytes(tiny_files):
    mf = ModelFile.open(tiny_files["qwen2"])
    hist = mf.dtype_histogram()
    for name, h in hist.items():
        infos = [t for t in mf.tensors.values() if t.type_name == name]
        assert h == {"count": len(infos), "bytes": sum(t.nbytes for t in infos)}
    assert sum(h["count"] for h in hist.values()) == len(mf.tensors)
    shapes = mf.config.tensor_shapes().values()
    n = sum(int(np.prod(s)) for s in shapes)
    vec = sum(int(np.prod(s)) for s in shapes if len(s) == 1)   # norms and biases: F32 here, kept as F32
    assert inspect.summary(mf)["predicted_gpu_bytes"] == \
           {"native": mf.total_tensor_bytes, "f32": 4 * n, "bf16": 2 * n + 2 * vec}
    assert list(hist.values())[0]["bytes"] == max(h["bytes"] for h in hist.values())


def test_header_only_summarises_like_a_manifest(tiny_files):
    full = ModelFile.open(tiny_files["gemma3"])
    brief = ModelFile.open(tiny_files["gemma3"], header_only=True)
    assert brief.metadata == manifest.summarize_metadata(full.metadata)
    assert brief.metadata["tokenizer.ggml.tokens"] == {"array_len": 384}
    assert brief.metadata["gemma3.attention.sliding_window_pattern"] == [True, True]
    assert brief.config == full.config


def test_missing_tensor_is_a_clear_error(tiny_files):
    with pytest.raises(Exception, match="no tensor 'nope'"):
        ModelFile.open(tiny_files["llama"]).tensor_data("nope")
