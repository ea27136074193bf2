"""Fuzz the header readers: mutated or cut GGUF/APR headers give Q4KError/FileFormatError only,
never another exception and never a large allocation (a lying count must not be believed)."""
import functools
import os
import struct
import tempfile

import gguf
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q4kdistill.formats import apr

from q4kdistill.formats import gguf_file

from q4kdistill.memory import planner

from q4kdistill.formats import quants

from q4kdistill.formats import synthetic
from q4kdistill.errors import FileFormatError, Q4KError
from q4kdistill.formats.model_file import ModelFile
from conftest import traced_peak

PEAK_BYTES = 48 << 20
INTERESTING = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 30, 31, 32, 64, 255, 256, 2 ** 16 - 1, 2 ** 31, 2 ** 32 - 1,
               2 ** 32, 2 ** 40, 2 ** 63, 2 ** 64 - 1]
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@functools.lru_cache(maxsize=None)
def small_gguf() -> bytes:
    """A GGUF with one key of every value type and three tensor types (~1 KB of header)."""
    path = os.path.join(tempfile.mkdtemp(), "small.gguf")
    w = gguf.GGUFWriter(path, "llama")
    VT = gguf.GGUFValueType
    for key, value, vt in [("u8", 7, VT.UINT8), ("i8", -7, VT.INT8), ("u16", 700, VT.UINT16), ("i16", -700, VT.INT16),
                           ("u32", 7, VT.UINT32), ("i32", -7, VT.INT32), ("f32", 0.5, VT.FLOAT32), ("b", True, VT.BOOL),
                           ("s", "text", VT.STRING), ("u64", 2 ** 40, VT.UINT64), ("i64", -2 ** 40, VT.INT64),
                           ("f64", 0.25, VT.FLOAT64)]:
        w.add_key_value(f"x.{key}", value, vt)
    w.add_key_value("x.strings", ["a", "bc", "def"], VT.ARRAY, VT.STRING)
    w.add_key_value("x.ints", list(range(70)), VT.ARRAY, VT.INT32)
    w.add_key_value("llama.embedding_length", 256, VT.UINT32)
    w.add_tensor("a", np.ones(8, np.float32))
    w.add_tensor("b", quants.quantize(np.ones((2, 32), np.float32), "Q8_0"), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", quants.quantize(np.ones((1, 256), np.float32), "Q4_K"), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def small_apr() -> bytes:
    d = tempfile.mkdtemp()
    cfg = synthetic.tiny_config("llama", vocab_size=262, n_layers=1, d_model=256, n_heads=2, head_dim=128, d_ff=256)
    src = synthetic.write_gguf(os.path.join(d, "t.gguf"), cfg, qtypes={"*": "Q8_0"})
    apr.write(ModelFile.open(src), os.path.join(d, "t.apr"))
    with open(os.path.join(d, "t.apr"), "rb") as f:
        return f.read()


def mutations(limit):
    value = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2 ** 64 - 1))
    one = st.tuples(st.integers(0, limit - 1), st.sampled_from(["<B", "<I", "<Q"]), value)
    return st.lists(one, min_size=1, max_size=4)


def mutate(data: bytes, muts, cut) -> bytes:
    raw = bytearray(data)
    for pos, fmt, value in muts:
        size = struct.calcsize(fmt)
        if pos + size <= len(raw):
            struct.pack_into(fmt, raw, pos, value % (1 << (8 * size)))
    return bytes(raw[:cut] if cut is not None else raw)


def exercise(path):
    """Everything a user of the file can do to it."""
    mf = ModelFile.open(path)
    mf.dtype_histogram(), planner.teacher_resident(mf.tensors.values()), mf.to_manifest()
    for name in mf.tensors:
        mf.tensor_data(name)
    mf.config


def exercise_bytes(raw: bytes, name: str):
    """``raw`` written to a file ``name``, then exercised: Q4KError or nothing, and a bounded peak."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(raw)
        with traced_peak() as traced:
            try:
                exercise(path)
            except Q4KError:
                pass
        peak = traced()
    assert peak < PEAK_BYTES, f"{peak} bytes allocated"


@FUZZ
@given(data=st.data())
def test_gguf_header_fuzz(data):
    clean = small_gguf()
    header_end = gguf_file.parse_header(clean, "clean").data_offset
    muts = data.draw(mutations(header_end))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(clean))))
    bad = mutate(clean, muts, cut)
    for summarize in (False, True):
        try:
            h = gguf_file.parse_header(bad, "fuzz.gguf", summarize)
        except FileFormatError:
            continue
        assert all(t.offset >= h.data_offset and t.nbytes > 0 for t in h.tensors.values())
    exercise_bytes(bad, "fuzz.gguf")


@FUZZ
@given(data=st.data(), fix_crc=st.booleans())
def test_apr_header_fuzz(data, fix_crc):
    clean = small_apr()
    index_start, data_start = apr.HEADER.unpack_from(clean)[7:9]
    # aim most mutations at the header and the tensor index, where the counts and offsets are
    region = data.draw(st.sampled_from([(0, 64), (index_start, data_start), (0, data_start)]))
    muts = [(region[0] + p % (region[1] - region[0]), fmt, v) for p, fmt, v in data.draw(mutations(1 << 20))]
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(clean))))
    bad = bytearray(mutate(clean, muts, cut))
    if fix_crc and len(bad) >= 64:
        bad[40:44] = struct.pack("<I", apr.header_crc(bytes(bad[:64])))
    bad = bytes(bad)
    try:
        apr.parse_header(bad, "fuzz.apr")
    except FileFormatError:
        pass
    exercise_bytes(bad, "fuzz.apr")
