"""APR v2: the layout we write, round trips from GGUF, and files we must refuse."""
import struct
import zlib

import numpy as np
import pytest

import gguf

from q4kdistill.formats import apr

from q4kdistill.formats import quants

from q4kdistill.formats import synthetic
from q4kdistill.errors import FileFormatError
from q4kdistill.formats.model_file import ModelFile


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(gguf path, apr path) of a tiny qwen2 with many tensor types."""
    d = tmp_path_factory.mktemp("apr")
    qtypes = {"token_embd": "Q8_0", "attn_k": "Q5_0", "attn_q": "F16", "ffn_up": "BF16", "ffn_gate": "Q4_0"}
    src = synthetic.write_gguf(d / "t.gguf", synthetic.tiny_config("qwen2"), qtypes, seed=3)
    out = d / "t.apr"
    size = apr.write(ModelFile.open(src), out)
    assert size == out.stat().st_size
    return src, out


def _same_weights(a, g, name, a_name=None):
    """The APR tensor holds the GGUF tensor's bytes, or (types no APR reader takes) its F32 dequantization."""
    got, want = a.tensors[a_name or name], g.tensors[name]
    assert (got.shape, got.shape_ggml) == (want.shape, want.shape_ggml)
    if want.qtype in apr.WRITE_CODES:
        assert (got.qtype, got.nbytes) == (want.qtype, want.nbytes)
        assert np.array_equal(a.tensor_data(a_name or name), g.tensor_data(name))
    else:
        assert got.qtype == gguf.GGMLQuantizationType.F32
        assert np.array_equal(a.tensor_data(a_name or name), quants.dequantize(g.tensor_data(name), want.qtype))


def test_round_trip_from_gguf(pair):
    src, out = pair
    g, a = ModelFile.open(src), ModelFile.open(out)
    assert a.kind == "apr" and a.config == g.config and a.metadata == g.metadata
    assert sorted(a.tensors) == sorted(g.tensors)
    for name, info in g.tensors.items():
        _same_weights(a, g, name)
        if info.qtype in apr.WRITE_CODES:
            assert np.shares_memory(a.tensor_data(name), a._mapped())
    hist = a.dtype_histogram()
    assert set(hist) == {"F32", "F16", "BF16", "Q4_K", "Q6_K"}      # Q8_0, Q5_0, Q4_0 became F32


def test_round_trip_of_the_real_gemma_file(gemma_path, tmp_path):
    out = tmp_path / "g.apr"
    g = ModelFile.open(gemma_path)
    lines = []
    apr.write(g, out, log=lines.append)
    assert any(line.startswith("11 Q8_0 tensor(s) written as F32") for line in lines), lines   # 10 + lm_head
    a = ModelFile.open(out)
    assert a.config == g.config and a.metadata == g.metadata and sorted(a.tensors) == sorted(g.tensors)
    for name in ("blk.3.attn_q.weight", "blk.0.ffn_down.weight", "output_norm.weight", "blk.5.attn_k.weight"):
        _same_weights(a, g, name)


def test_layout(pair):
    _, out = pair
    raw = out.read_bytes()
    (magic, major, minor, flags, n, meta_off, meta_size, index_off, data_off, crc, reserved) = \
        struct.unpack_from("<4sBBHIQIQQI20s", raw)
    assert (magic, major, minor, meta_off, reserved) == (b"APR\0", 2, 0, 64, bytes(20))
    assert crc == zlib.crc32(raw[:40] + raw[44:64])
    assert flags == apr.FLAGS["LAYOUT_ROW_MAJOR"] | apr.FLAGS["QUANTIZED"] | apr.FLAGS["HAS_VOCAB"]
    assert index_off % 64 == 0 and data_off % 64 == 0 and index_off >= meta_off + meta_size
    assert int.from_bytes(raw[-4:], "little") == zlib.crc32(raw[:-4])
    meta = apr._json(raw[meta_off:meta_off + meta_size], out)
    assert (meta["architecture"], meta["hidden_size"], meta["num_layers"], meta["num_heads"], meta["num_kv_heads"],
            meta["vocab_size"], meta["intermediate_size"], meta["head_dim"], meta["rope_type"]) == \
           ("qwen2", 256, 2, 4, 2, 384, 512, 64, 2)
    assert len(meta["tokenizer.vocabulary"]) == 384 and "tokenizer.ggml.tokens" not in meta["gguf_metadata"]
    # index: sorted names as `apr import` names qwen2 tensors; dims [rows, cols]; 64-aligned; aprender codes
    pos, names = index_off, []
    for _ in range(n):
        (name_len,) = struct.unpack_from("<H", raw, pos)
        name = raw[pos + 2:pos + 2 + name_len].decode()
        dtype, ndim = raw[pos + 2 + name_len], raw[pos + 3 + name_len]
        dims = struct.unpack_from(f"<{ndim}Q", raw, pos + 4 + name_len)
        offset, size = struct.unpack_from("<QQ", raw, pos + 4 + name_len + 8 * ndim)
        pos += 4 + name_len + 8 * ndim + 16
        names.append(name)
        assert offset % 64 == 0 and dtype in (0, 1, 30, 12, 14)
        if name == "model.layers.0.mlp.down_proj.weight":
            assert (dtype, dims, size) == (14, (256, 512), 256 * 2 * 210)     # Q6_K, [rows, cols]
        if name == "model.layers.0.mlp.up_proj.weight":
            assert dtype == 30 and dims == (512, 256)                          # BF16
        if name == "model.embed_tokens.weight":                                # Q8_0 -> F32
            assert (dtype, dims, size) == (0, (384, 256), 384 * 256 * 4)
    assert names == sorted(names) and "lm_head.weight" in names and "model.norm.weight" in names


def _patched(src, tmp_path, edit, fix_crc=True):
    raw = bytearray(src.read_bytes())
    edit(raw)
    if fix_crc:
        raw[40:44] = struct.pack("<I", zlib.crc32(bytes(raw[:40] + raw[44:64])))
    bad = tmp_path / "bad.apr"
    bad.write_bytes(bytes(raw))
    return bad


@pytest.mark.parametrize("flag, problem", [
    ("LZ4_COMPRESSED", "LZ4-compressed"), ("ZSTD_COMPRESSED", "Zstd-compressed"),
    ("ENCRYPTED", "encrypted"), ("SHARDED", "sharded"), ("LAYOUT_COLUMN_MAJOR", "column-major"),
])
def test_refused_flags(pair, tmp_path, flag, problem):
    def set_flag(raw):
        flags = struct.unpack_from("<H", raw, 6)[0] | apr.FLAGS[flag]
        raw[6:8] = struct.pack("<H", flags)
    with pytest.raises(FileFormatError, match=problem):
        ModelFile.open(_patched(pair[1], tmp_path, set_flag), header_only=True)


def test_corruption_is_caught(pair, tmp_path):
    def poke(at):
        return lambda raw: raw.__setitem__(at, raw[at] ^ 0xFF)
    with pytest.raises(FileFormatError, match="header CRC32"):
        ModelFile.open(_patched(pair[1], tmp_path, poke(9), fix_crc=False))
    size = pair[1].stat().st_size
    with pytest.raises(FileFormatError, match="footer CRC32"):
        ModelFile.open(_patched(pair[1], tmp_path, poke(size - 100)))
    ModelFile.open(_patched(pair[1], tmp_path, poke(size - 100)), header_only=True)   # data not read
    with pytest.raises(FileFormatError, match="version 3.0"):
        ModelFile.open(_patched(pair[1], tmp_path, lambda raw: raw.__setitem__(4, 3)))
    with pytest.raises(FileFormatError, match="truncated: tensor"):
        bad = tmp_path / "short.apr"
        bad.write_bytes(pair[1].read_bytes()[:size // 2])
        ModelFile.open(bad)


def test_aprender_metadata_without_gguf_keys():
    stored = {"model_type": "qwen2", "architecture": "qwen2", "hidden_size": 896, "num_layers": 24, "num_heads": 14,
              "num_kv_heads": 2, "vocab_size": 151936, "intermediate_size": 4864, "rope_theta": 1e6,
              "rms_norm_eps": 1e-6, "head_dim": 64, "max_position_embeddings": 32768}
    meta = apr.gguf_metadata(stored)
    from q4kdistill.config import ModelConfig
    cfg = ModelConfig.from_metadata(meta, ["output_norm.weight", "blk.0.attn_q.bias"])
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.d_ff, cfg.rope_base,
            cfg.head_dim, cfg.context_length) == (896, 24, 14, 2, 151936, 4864, 1e6, 64, 32768)
