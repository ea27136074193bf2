"""The linked CUDA C variants on the CPU: registered, source in place, and a clear error there.

Their numerics are checked on the GPU (tests/test_kernels_gpu.py runs every registered variant,
and test_linked_decode_f16_on_gpu the decode); NVRTC compiles the source only on a GPU machine.
"""
import shutil
import subprocess
from collections import defaultdict

import numpy as np
import pytest

import kernels
from kernels import linked
from q4kdistill.errors import Q4KError


def test_linked_variants_registered_for_k_quants_only():
    names = [n for n in kernels.variants() if "linked" in n]
    assert {"gemv_q8_linked_r2w4", "dequant_linked_cublas", "dequant_linked_cublas16"} <= set(names)
    for n in names:
        v = kernels.get(n)
        assert v.device == "gpu" and not v.simulated and set(v.qtypes) <= {"Q4_K", "Q6_K"}
        assert not v.supports("Q8_0", 1, True) and not v.supports("Q4_K", 1, False)
    assert kernels.get("gemv_q8_linked_r2w4").m_max == 16


def _includes(text):
    return [line for line in text.splitlines() if line.lstrip().startswith("#include")]


def test_source_has_every_declared_function():
    jobs = {f: linked.source_text(f) for f in linked.JOBS}
    for f, fns in (("quantize_x.cu", ("q8_quantize", "q8_quantize_frag", "q8k_quantize_frag")),
                   ("decode_cast.cu", ("q4k_decode_f16", "q6k_decode_f16", "q6k_decode_f16_staged", "f32_to_f16"))):
        for fn in fns:
            assert f'extern "C" __device__ int {fn}(' in jobs[f]
    for tmpl in linked.TEMPLATES.values():
        assert f"{tmpl}_gemv(" in jobs["gemv_dp4a.cu"]
    mma = jobs["gemv_mma.cu"]
    assert "q4k_mma(" in mma and "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in mma
    assert "q6k_mma(" in mma and "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32" in mma
    assert "q4k_mma_rows(" in mma and mma.count("q4k_mma_sb<NT, XK>(") == 2   # one product, two work splits
    assert "q4k_f32(" in jobs["gemv_f32.cu"]
    for f, text in jobs.items():                      # NVRTC gets no include path: headers inlined, once
        assert not _includes(text), f
        assert text.count("#define Q4KDISTILL_COMMON_CUH") == 1, f
    for f in ("gemv_dp4a.cu", "gemv_f32.cu", "gemv_mma.cu", "decode_cast.cu"):   # they decode blocks
        assert jobs[f].count("constexpr int Q4_K_BYTES = 144;") == 1 and "struct Q4Scales" in jobs[f]
    everything = linked.source_text()
    assert not _includes(everything) and everything.count("struct Q4Scales") == 1


def test_csrc_names_block_fields_only_through_the_layout_header():
    """No .cu file spells a Q4_K / Q6_K block size or field offset: they come from block_layouts.cuh."""
    import re

    for path in sorted(linked.CSRC.glob("*.cu")) + [linked.CSRC / "block_decode.cuh"]:
        code = "\n".join(line.split("//")[0] for line in path.read_text().splitlines())
        for literal in ("144", "210", "208", "192"):
            assert not re.search(rf"\b{literal}\b", code), (path.name, literal)


def test_only_csrc_includes_are_inlined(tmp_path, monkeypatch):
    (tmp_path / "a.cu").write_text('#include "b.cuh"\n#include "b.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text("int b;\n")
    (tmp_path / "c.cu").write_text("#include <cuda_fp16.h>\n")
    monkeypatch.setattr(linked, "CSRC", tmp_path)
    assert linked.source_text("a.cu") == "int b;\nint a;\n"
    with pytest.raises(Q4KError, match="only #include"):
        linked.source_text("c.cu")


# one instantiation of each template, as the shipped variants use them
INSTANCES = [linked.gemv_source("Q4_K", 16, 2, 4), linked.gemv_source("Q6_K", 1, 4, 2), linked.f32_source(4, 2, 4),
             linked.mma_source("Q4_K", 2, 2, 4, x256=True), linked.mma_source("Q4_K", 1, 4),
             linked.mma_source("Q4_K", 1, 4, rows=True), linked.mma_source("Q6_K", 2, 4)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_csrc_compiles_with_nvcc(tmp_path):
    """What NVRTC will compile on the GPU, compiled here for sm_90a: each job with its wrappers."""
    extra = defaultdict(str)
    for f, _, wrapper in INSTANCES:
        extra[f] += wrapper
    texts = {f: linked.source_text(f) + "\n" + extra[f] for f in linked.JOBS}
    texts["all.cu"] = linked.source_text() + "\n" + linked.f32_source(1, 2, 4)[2]    # every job at once (source_with's default)
    for f, text in texts.items():
        src = tmp_path / f
        src.write_text(text)
        r = subprocess.run(["nvcc", "-rdc=true", "-gencode=arch=compute_90a,code=sm_90a", "-c", "-o", str(src) + ".o",
                            str(src)], capture_output=True, text=True)
        assert r.returncode == 0 and "warning" not in r.stderr, (f, r.stderr[-2000:])


def test_split_along_k_only_for_few_row_blocks():
    assert linked.mma_rows_split(152064, 3584, 4) == 1                 # the LM head fills the GPU by rows
    assert 2 <= linked.mma_rows_split(3584, 18944, 4) <= 18944 // 256 // 2
    assert linked.mma_rows_split(37, 256, 4) == 1                      # one super-block: nothing to split
    assert linked.mma_split(152064, 3584, 2) == 1 and linked.mma_split(3584, 18944, 2) > 1


def test_source_with_appends_once(tmp_path, monkeypatch):
    monkeypatch.setenv("Q4KDISTILL_CSRC_CACHE", str(tmp_path))
    a = linked.source_with("// one\n")
    assert linked.source_with("// one\n") == a and a != linked.source_with("// two\n")
    assert open(a).read().endswith("// one\n") and len(list(tmp_path.iterdir())) == 2
    assert linked.source_with("// one\n", "gemv_f32.cu") != a            # the job's file alone


def test_cpu_call_is_a_clear_error():
    if not linked.SIMULATOR:
        pytest.skip("a GPU is present")
    x = np.zeros((1, 256), np.float32)
    w = np.zeros((4, 144), np.uint8)
    with pytest.raises(Q4KError, match="GPU only"):
        linked.gemv_q8_linked(x, w, "Q4_K", 4, np.zeros((1, 4), np.float32))


# -- decode_cast.cu's decoders on the CPU: tests/decode_emulate.cpp --------------------------------
@pytest.fixture(scope="module")
def decode_emulated(tmp_path_factory):
    from _helpers_emulate import build_emulator

    return build_emulator(tmp_path_factory, "decode_emulate.cpp", {"DC_SOURCE": linked.CSRC / "decode_cast.cu"},
                          include_dirs=[linked.CSRC])


def _emulate_decode(lib, which, w, K, threads=linked.DECODE_THREADS, offset=0):
    """fp16 [n, K] from the emulated kernel; the rows start ``offset`` bytes into a buffer (alignment)."""
    import ctypes

    n, rb = w.shape
    buf = np.zeros(n * rb + offset + 16, np.uint8)
    buf[offset:offset + n * rb] = w.reshape(-1)
    out = np.full((n, K), np.nan, np.float16)
    assert lib.emu_decode(which, buf[offset:].ctypes.data_as(ctypes.c_void_p), rb, n, K,
                          out.ctypes.data_as(ctypes.c_void_p), threads) == 0
    return out


@pytest.mark.parametrize("qtype, K", [("Q4_K", 768), ("Q6_K", 256), ("Q6_K", 768), ("Q6_K", 1280), ("Q6_K", 2048)])
def test_decoders_emulated_on_the_cpu(decode_emulated, qtype, K):
    """Every decoder against the float64 decode rounded once to fp16 (all but a few last-bit ties),
    the staged Q6_K decoder bit for bit against the direct one: super-block counts per row of 1, 3
    (odd: rows 2-byte aligned, the staged copy takes 2-byte words), 5 (a group of 4 and a partial one)
    and 8, rows starting 2 bytes past a 4-byte boundary too."""
    from q4kdistill.formats import quants

    rng = np.random.default_rng(K)
    n = 5
    w = quants.quantize((rng.standard_normal((n, K)) * np.exp(rng.uniform(-3, 3, (n, 1)))).astype(np.float32), qtype)
    ref = quants.dequantize(w, qtype).astype(np.float64)
    direct = _emulate_decode(decode_emulated, 0 if qtype == "Q4_K" else 1, w, K)
    assert np.isfinite(direct).all()
    assert np.all(np.abs(direct.astype(np.float64) - ref) <= 2.0**-11 * np.abs(ref) * 1.01 + 2.0**-24)
    assert np.mean(direct == ref.astype(np.float32).astype(np.float16)) > 0.999
    if qtype == "Q6_K":
        for offset in (0, 2):
            np.testing.assert_array_equal(_emulate_decode(decode_emulated, 2, w, K, offset=offset), direct)


def test_q6k_staged_choice(monkeypatch):
    assert f"#define Q6K_STAGE_WARPS {linked.Q6K_STAGE_WARPS}" in linked.source_text("decode_cast.cu")
    monkeypatch.delenv(linked.Q6K_DECODE_ENV, raising=False)
    assert not linked.q6k_staged() and linked.q6k_staged(True)
    monkeypatch.setenv(linked.Q6K_DECODE_ENV, "staged")
    assert linked.q6k_staged() and not linked.q6k_staged(False)
    monkeypatch.setenv(linked.Q6K_DECODE_ENV, "fast")
    with pytest.raises(Q4KError, match="staged or direct"):
        linked.q6k_staged()
