"""Fuzz every loader a user's file reaches (issue 14): GGUF and APR metadata, manifests,
checkpoints, run configs and flags, and random bit flips in a small real GGUF run through the CLI.

Each example must end in a Q4KError (exit 2 with one line at the CLI) or a correct result (a
config whose tensor table is the file's, arrays of the student's shapes, settings of the right
types and ranges), with a bounded allocation (tracemalloc). The binary header readers have their
own fuzz tests in test_io_fuzz.py; this file aims at the values behind a header that parses.
Examples are few and derandomized: the whole file runs in well under a minute on 2 cores.
"""
import functools
import json
import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from q4kdistill import cli
from q4kdistill.errors import Q4KError
from q4kdistill.formats import apr, synthetic, validate
from q4kdistill.formats.model_file import ModelFile
from q4kdistill.train import checkpoint
from q4kdistill.train.loop import DistillConfig
from q4kdistill.train.options import RULES, typed_settings
from conftest import traced_peak

PEAK_BYTES = 32 << 20
DENSE = dict.fromkeys(("*", "attn_v", "ffn_down", "output", "token_embd"), "F32")
SMALL = dict(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128)


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@functools.lru_cache(maxsize=None)
def tiny_path(arch="gemma3") -> str:
    path = os.path.join(tempfile.mkdtemp(), f"{arch}.gguf")
    return synthetic.write_gguf(path, synthetic.tiny_config(arch, **SMALL), qtypes=DENSE, seed=5)


def bounded(fn):
    """fn() under tracemalloc: its result (or the Q4KError it raised) and an asserted peak."""
    with traced_peak() as traced:
        try:
            result = fn()
        except Q4KError as exc:
            result = exc
    peak = traced()
    assert peak < PEAK_BYTES, f"{peak:,} bytes allocated"
    return result


# hostile metadata values: wrong types, negative, huge, non-finite, nested
VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 8, 31, 32, 64, 128, 383, 384, 385, -1, -5, 2 ** 31, 2 ** 32 + 1, 2 ** 62, 10 ** 30]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=8),
    st.lists(st.integers(-3, 400), max_size=5), st.none(), st.just({"array_len": 5}), st.just({"array_len": -1}),
)


def config_keys(arch):
    return [f"{arch}.{k}" for k in ("embedding_length", "attention.head_count", "attention.head_count_kv",
                                     "attention.key_length", "attention.value_length", "block_count",
                                     "feed_forward_length", "vocab_size", "context_length", "rope.freq_base",
                                     "attention.layer_norm_rms_epsilon", "attention.sliding_window",
                                     "attention.sliding_window_pattern", "rope.freq_base_swa")] + \
        ["general.architecture", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
         "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.tokens",
         "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"]


def check_config(metadata, tensors):
    """validate.model_config: a Q4KError, or a config whose tensor table is exactly the file's."""
    got = bounded(lambda: validate.model_config(metadata, tensors, "fuzz"))
    event("refused" if isinstance(got, Q4KError) else "accepted")
    if isinstance(got, Q4KError):
        assert "\n" not in str(got)
        return None
    shapes = got.tensor_shapes()
    assert all(tuple(tensors[n].shape) == tuple(s) for n, s in shapes.items())
    assert set(tensors) - set(shapes) <= set(validate.IGNORED_TENSORS)
    assert got.n_heads % got.n_kv_heads == 0 and got.norm_eps > 0 and math.isfinite(got.rope_base)
    for tid in (got.bos_token_id, got.eos_token_id, got.pad_token_id):
        assert tid is None or 0 <= tid < got.vocab_size
    return got


@fuzz(60)
@given(arch=st.sampled_from(["gemma3", "llama", "qwen2"]), data=st.data())
def test_gguf_metadata_values(arch, data):
    """Any value at any config or tokenizer key of a real-format header: refused or consistent."""
    mf = ModelFile.open(tiny_path(arch), header_only=False)
    meta = dict(mf.metadata)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(config_keys(arch)))
        value = data.draw(VALUES)
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    check_config(meta, mf.tensors)


@fuzz(40)
@given(arch=st.sampled_from(["gemma3", "llama"]), data=st.data())
def test_tensor_table_changes(arch, data):
    """Tensors dropped, added or reshaped (a tensor-info bit flip): refused unless consistent."""
    import dataclasses

    mf = ModelFile.open(tiny_path(arch), header_only=True)
    tensors = dict(mf.tensors)
    names = list(tensors)
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["drop", "add", "reshape"]))
        name = data.draw(st.sampled_from(names))
        if what == "drop":
            tensors.pop(name, None)
        elif what == "add":
            tensors[data.draw(st.sampled_from(["rope_freqs.weight", "blk.9.attn_q.weight", "x"]))] = mf.tensors[name]
        elif name in tensors:
            shape = tuple(data.draw(st.integers(1, 512)) if i == 0 else d for i, d in enumerate(tensors[name].shape))
            tensors[name] = dataclasses.replace(tensors[name], shape=shape)
    check_config(mf.metadata, tensors)


@functools.lru_cache(maxsize=None)
def apr_stored():
    d = tempfile.mkdtemp()
    apr.write(ModelFile.open(tiny_path("gemma3")), os.path.join(d, "t.apr"))
    h = apr.read_header(os.path.join(d, "t.apr"))
    return json.dumps(h.json), h.tensors


@fuzz(40)
@given(data=st.data(), keep_gguf=st.booleans())
def test_apr_metadata_values(data, keep_gguf):
    """APR JSON metadata (aprender's fields, or the GGUF metadata it carries) with hostile values."""
    raw, tensors = apr_stored()
    stored = json.loads(raw)
    if not keep_gguf:
        stored.pop("gguf_metadata")
    fields = [f for f, _, _ in apr.CONFIG_FIELDS] + ["architecture", "model_type"]
    for _ in range(data.draw(st.integers(1, 3))):
        if keep_gguf:
            stored["gguf_metadata"][data.draw(st.sampled_from(config_keys("gemma3")))] = data.draw(VALUES)
        else:
            stored[data.draw(st.sampled_from(fields))] = data.draw(VALUES)
    meta = bounded(lambda: apr.gguf_metadata(stored))
    if not isinstance(meta, Q4KError):
        check_config(meta, tensors)


@fuzz(40)
@given(data=st.data())
def test_manifest_documents(data):
    """A manifest JSON with hostile metadata and tensor entries: refused, or consistent and cheap
    (no tensor data is made before the load check says it fits)."""
    base = ModelFile.open(tiny_path("gemma3"), header_only=True).to_manifest()
    doc = json.loads(json.dumps(base))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["metadata", "tensor", "total"]))
        if where == "metadata":
            doc["metadata"][data.draw(st.sampled_from(config_keys("gemma3")))] = data.draw(VALUES)
        elif where == "tensor":
            entry = doc["tensors"][data.draw(st.integers(0, len(doc["tensors"]) - 1))]
            entry[data.draw(st.sampled_from(["name", "type", "shape_ggml", "nbytes"]))] = data.draw(
                st.one_of(VALUES, st.lists(st.sampled_from([1, 32, 64, 256, 2 ** 20, 2 ** 40, 0, -1]), max_size=5),
                          st.sampled_from(["F32", "Q4_K", "Q8_0", "NOPE"])))
        else:
            doc["total_tensor_bytes"] = data.draw(VALUES)

    def load():
        mf = ModelFile.open(doc)
        cfg = check_config(mf.metadata, mf.tensors)
        validate.check_fits(mf, "native", np, available=64 << 20)
        return cfg

    bounded(load)


def test_load_is_refused_above_free_memory():
    """check_fits: the planner's load figure against the free bytes, the same figure either side."""
    mf = ModelFile.open(ModelFile.open(tiny_path("gemma3"), header_only=True).to_manifest())
    need = validate.load_need(mf, "native", on_host=True)
    assert need > mf.total_tensor_bytes                         # the random tensors are made on the host
    validate.check_fits(mf, "native", np, available=need)
    with pytest.raises(Q4KError, match=f"needs {need / 1e9:.2f} GB"):
        validate.check_fits(mf, "native", np, available=need - 1)
    on_file = ModelFile.open(tiny_path("gemma3"))               # a file's matrices are views of the map
    assert validate.load_need(on_file, "native", on_host=True) < on_file.total_tensor_bytes // 10


# -- checkpoints -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def small_checkpoint() -> bytes:
    from test_validation_cli import student_checkpoint

    d = tempfile.mkdtemp()
    path = student_checkpoint(os.path.join(d, "run"), tiny_path("gemma3"))
    with open(path, "rb") as f:
        return f.read()


@fuzz(60)
@given(data=st.data())
def test_checkpoint_bytes(data):
    """Mutated or cut checkpoint files: refused, or loaded with every array as the student needs."""
    clean = small_checkpoint()
    raw = bytearray(clean)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.one_of(st.integers(0, len(raw) - 1), st.integers(max(0, len(raw) - 2048), len(raw) - 1)))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    raw = bytes(raw[:cut] if cut is not None else raw)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.npz")
        with open(path, "wb") as f:
            f.write(raw)
        got = bounded(lambda: checkpoint.load_student(path))
    event("refused" if isinstance(got, Q4KError) else "loaded")
    if isinstance(got, Q4KError):
        assert "\n" not in str(got)
        return
    shapes = got.student_config.tensor_shapes()
    assert {k: v.shape for k, v in got.state["params"].items()} == {k: tuple(s) for k, s in shapes.items()}
    assert all(v.dtype == np.float32 for v in got.state["params"].values())


@fuzz(40)
@given(data=st.data())
def test_checkpoint_meta(data):
    """__meta__ with hostile values where the schema and the student's config are."""
    from test_validation_cli import rewrite_meta

    clean = small_checkpoint()
    paths = [("step",), ("fingerprint",), ("config", "student", "n_layers"), ("config", "student", "d_model"),
             ("config", "student", "vocab_size"), ("config", "student", "swa_layers"),
             ("config", "student", "tied_output"), ("config", "student", "norm_eps"), ("config", "distill"),
             ("state", "params"), ("state", "optimizer", "steps"), ("state", "data", "position"), ("format",)]
    edits = [(data.draw(st.sampled_from(paths)), data.draw(VALUES)) for _ in range(data.draw(st.integers(1, 2)))]

    def edit(meta):
        for keys, value in edits:
            node = meta
            for k in keys[:-1]:
                node = node[k] if isinstance(node, dict) and isinstance(node.get(k), dict) else {}
            node[keys[-1]] = value

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.npz")
        with open(path, "wb") as f:
            f.write(clean)
        rewrite_meta(path, edit)
        got = bounded(lambda: checkpoint.load_student(path))
    if not isinstance(got, Q4KError):
        assert got.student_config.n_layers >= 1 and isinstance(got.step, int) and got.step >= 0


# -- run configs and flags -----------------------------------------------------------------------------

JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)


# values a real config holds (most examples should reach the typed result, not only refusals)
PLAUSIBLE = st.sampled_from([0, 1, 2, 8, 64, 1000, 0.0, 0.5, 1.0, 3e-4, True, False, None, "kl", "jsd", "auto",
                             "native", "0,1", [0, 1], "x.gguf"])


@fuzz(150)
@given(settings_=st.dictionaries(st.one_of(st.sampled_from(sorted(RULES)), st.text(max_size=6)),
                                 st.one_of(PLAUSIBLE, JSON_VALUES, st.text(max_size=12)), max_size=5),
       from_text=st.booleans())
def test_config_values(settings_, from_text):
    """Any JSON settings (or any flag text): refused in one line, or typed and in range."""
    if from_text:
        settings_ = {k: v if isinstance(v, str) else json.dumps(v) for k, v in settings_.items()}
    try:
        typed = typed_settings(settings_, "fuzz", from_text=from_text)
        cfg = DistillConfig.from_dict({"teacher": "t.gguf", "data": "d", **typed}, source="fuzz")
    except Q4KError as exc:
        event("refused")
        assert "\n" not in str(exc)
        return
    event("accepted")
    for name, rule in RULES.items():
        value = getattr(cfg, name)
        if value is None:
            assert rule.optional
        elif rule.kind is list:
            assert all(type(i) is int and 0 <= i for i in value)
        else:
            assert type(value) is rule.kind, (name, value)
            if rule.kind in (int, float):
                assert math.isfinite(value) and (rule.low is None or value >= rule.low)


def test_teacher_backends_match_the_teacher():
    from q4kdistill.teacher.model import BACKENDS
    from q4kdistill.train.options import TEACHER_BACKENDS

    assert TEACHER_BACKENDS == BACKENDS


# -- bit flips in a small real file, through the CLI -------------------------------------------------------

@fuzz(25)
@given(data=st.data())
def test_bit_flips_through_the_cli(data, tmp_path_factory, capsys):
    """Random bit flips in a small real GGUF (header-weighted): `logits` exits 2 with one line, or
    0 with finite logits of the file's vocabulary."""
    clean = open(tiny_path("gemma3"), "rb").read()
    header_end = ModelFile.open(tiny_path("gemma3")).tensors["token_embd.weight"].offset
    raw = bytearray(clean)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.one_of(st.integers(0, header_end - 1), st.integers(0, len(raw) - 1)))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    d = tmp_path_factory.mktemp("flip")
    path, out = d / "f.gguf", d / "lg.npy"
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    status = cli.main(["logits", "--teacher", str(path), "--tokens", "1,2,3", "--out", str(out)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("teacher: ")]
    event(f"exit {status}")
    if status == 2:
        assert len(lines) == 1 and lines[0].startswith("q4kdistill: error: "), lines
        assert not out.exists()
    else:
        assert status == 0 and not lines, captured.err
        logits = np.load(out)
        assert logits.shape == (3, 384) and np.isfinite(logits).all()


# -- on the GPU: the same checks on CuPy arrays and GPU memory ------------------------------------------

@pytest.mark.gpu
def test_finite_check_and_memory_figure_on_the_gpu(tmp_path):
    """check_finite on CuPy chunks (the training loop's [chunk, V] logits) names the position and
    allocates no [n, V] temporary; check_fits reads the GPU's free memory and refuses above it."""
    import cupy

    from q4kdistill.finite import NonFiniteError, check_finite

    x = cupy.random.standard_normal((256, 262144), dtype=cupy.float32)
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    before = pool.used_bytes()
    assert check_finite(x, "logits", 0, 64) is x
    assert pool.used_bytes() - before < 1 << 20                  # a scalar, not a [256, V] mask
    x[130, 7] = cupy.nan
    with pytest.raises(NonFiniteError, match="batch row 2, position 2, vocabulary id 7"):
        check_finite(x, "the teacher's logits", 0, 64)
    free = validate.device_memory_available(cupy)
    assert free is not None and 0 < free <= cupy.cuda.runtime.memGetInfo()[1] + pool.total_bytes()
    mf = ModelFile.open(tiny_path("gemma3"))
    validate.check_fits(mf, "native", cupy)                      # a tiny teacher fits
    with pytest.raises(Q4KError, match="GPU memory is free"):
        validate.check_fits(mf, "dequant-f32", cupy, available=1000)
