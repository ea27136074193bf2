"""`q4kdistill inspect` and `convert`, run as a user would; bad input gets one line and exit 2."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from q4kdistill.formats import synthetic


def cli(*args):
    return subprocess.run([sys.executable, "-m", "q4kdistill", *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return synthetic.write_gguf(d / "tiny.gguf", synthetic.tiny_config("llama"), seed=0)


def test_inspect_truncated_7b_json(deepseek_chunk_path, manifest_7b_path):
    r = cli("inspect", deepseek_chunk_path, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["architecture"] == "qwen2" and out["tensor_count"] == 339
    assert out["bytes_by_type"] == {"Q4_K": 3_427_909_632, "Q6_K": 1_247_877_120, "F32": 1_333_248}
    assert out["total_tensor_bytes"] == 4_677_120_000
    n = 7_615_616_512                                    # elements of all 339 tensors
    vec = 333_312                                        # of its 141 F32 norms and biases (kept as F32)
    assert out["predicted_gpu_bytes"] == {"native": 4_677_120_000, "f32": 4 * n, "bf16": 2 * n + 2 * vec}
    assert out["config"]["n_layers"] == 28 and "truncated: tensor" in out["truncated"]
    from_manifest = json.loads(cli("inspect", manifest_7b_path, "--json").stdout)
    assert {k: v for k, v in from_manifest.items() if k not in ("file", "kind", "truncated")} == \
           {k: v for k, v in out.items() if k not in ("file", "kind", "truncated")}


def test_inspect_tables(deepseek_chunk_path, tiny):
    r = cli("inspect", deepseek_chunk_path)
    assert r.returncode == 0, r.stderr
    assert "qwen2: 28 layers, d_model 3584" in r.stdout and "header only: truncated" in r.stdout
    assert "4,677,120,000" in r.stdout and "30,462,466,048" in r.stdout
    r = cli("inspect", tiny)
    assert r.returncode == 0 and "llama: 2 layers" in r.stdout and "header only" not in r.stdout


def test_convert_to_apr_and_manifest(tiny, deepseek_chunk_path, manifest_7b_path, tmp_path):
    out = tmp_path / "tiny.apr"
    r = cli("convert", tiny, out)
    assert r.returncode == 0, r.stderr
    a, g = (json.loads(cli("inspect", p, "--json").stdout) for p in (out, tiny))
    assert a["kind"] == "apr" and {k: v for k, v in a.items() if k not in ("file", "kind")} == \
           {k: v for k, v in g.items() if k not in ("file", "kind")}
    r = cli("convert", deepseek_chunk_path, tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "m.json") as f, open(manifest_7b_path) as g7:
        got, want = json.load(f), json.load(g7)
    assert {**got, "source": None} == {**want, "source": None}


# -- bad input ---------------------------------------------------------------------------

def _gguf(path, arch, kv, tensors=(("w", np.ones(32, np.float32)),)):
    synthetic.write_file(path, {"general.architecture": arch, **kv}, tensors)
    return path


def _patch(src, dst, offset, fmt, value):
    raw = bytearray(open(src, "rb").read())
    struct.pack_into(fmt, raw, offset, value)
    open(dst, "wb").write(bytes(raw))
    return dst


def _tensor_field(path, name, field):
    """Offset of a tensor-info field (dims / type) of a 1-D tensor in a GGUF header."""
    raw = open(path, "rb").read()
    at = raw.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name) + 4
    return at if field == "dims" else at + 8


def bad_inputs(tmp, tiny, chunk):
    text = tmp / "notes.txt"
    text.write_text("hello, not a model\n")
    empty = tmp / "empty.gguf"
    empty.write_bytes(b"")
    bad_json = tmp / "bad.json"
    bad_json.write_text("{ not json")
    norm = "output_norm.weight"
    cases = [
        (("inspect", text), "not a GGUF, APR or manifest file"),
        (("inspect", empty), "not a GGUF, APR or manifest file"),
        (("inspect", tmp / "missing.gguf"), "no such file"),
        (("inspect", tmp), "is a directory"),
        (("inspect", bad_json), "cannot read manifest JSON"),
        (("convert", chunk, tmp / "x.apr"), "truncated: tensor"),
        (("inspect", _patch(tiny, tmp / "q.gguf", _tensor_field(tiny, norm, "type"), "<I", 99)), "unknown quant type 99"),
        (("inspect", _patch(tiny, tmp / "d.gguf", _tensor_field(tiny, norm, "dims"), "<Q", 2 ** 50)), "absurd shape"),
        (("inspect", _patch(tiny, tmp / "n.gguf", 8, "<Q", 2 ** 40)), "absurd tensor count"),
        (("inspect", _patch(tiny, tmp / "k.gguf", 16, "<Q", 2 ** 62)), "absurd metadata count"),
        (("inspect", _patch(tiny, tmp / "s.gguf", 24, "<Q", 2 ** 63)), "absurd length"),
        (("inspect", _patch(tiny, tmp / "v.gguf", 4, "<I", 7)), "unsupported GGUF version 7"),
        (("inspect", _gguf(tmp / "mamba.gguf", "mamba", {"mamba.block_count": 2})), "unsupported architecture 'mamba'"),
        (("inspect", _gguf(tmp / "nokey.gguf", "llama", {"llama.block_count": 2})), "missing metadata key 'llama.embedding_length'"),
        (("inspect", _gguf(tmp / "str.gguf", "llama", {"llama.block_count": "two", "llama.embedding_length": 8,
                                                        "llama.attention.head_count": 2})), "is not an integer"),
    ]
    big = _gguf(tmp / "big.gguf", "llama", {}, [("w", np.zeros(1 << 16, np.float32))])
    short = tmp / "short.gguf"
    short.write_bytes(open(big, "rb").read()[:-1000])
    cases.append((("convert", short, tmp / "y.apr"), "truncated: tensor w needs bytes up to"))
    return cases


def test_bad_input_gets_one_line_and_exit_2(tiny, deepseek_chunk_path, tmp_path):
    cases = bad_inputs(tmp_path, tiny, deepseek_chunk_path)
    procs = [subprocess.Popen([sys.executable, "-m", "q4kdistill", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, problem), p in zip(cases, procs):
        _, stderr = p.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (args, stderr)
        assert lines[0].startswith("q4kdistill: error: ") and problem in lines[0], (args, lines[0])
        assert str(args[1]) in lines[0], lines[0]
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "x.apr").exists()
