"""The linked CUDA C variants on the CPU: registered, source in place, and a clear error there.

Their numerics are checked on the GPU (tests/test_kernels_gpu.py runs every registered variant,
and test_linked_decode_f16_on_gpu the decode); NVRTC compiles the source only on a GPU machine.
"""
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


def test_source_has_every_declared_function():
    text = linked.SOURCE.read_text()
    for fn in ("q8_quantize", "q8_quantize_frag", "q8k_quantize_frag", "q4k_decode_f16", "q6k_decode_f16", "f32_to_f16"):
        assert f'extern "C" __device__ int {fn}(' in text
    for tmpl in linked.TEMPLATES.values():
        assert f"{tmpl}_gemv(" in text
    assert "q4k_mma(" in text and "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in text
    assert "q6k_mma(" in text and "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32" in text
    assert "q4k_mma_rows(" in text and text.count("q4k_mma_sb<NT, XK>(") == 2   # one product, two work splits
    assert "#include" not in text                     # NVRTC gets no extra include path


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


def test_cpu_call_is_a_clear_error():
    if not linked.SIMULATOR:
        pytest.skip("a GPU is present")
    x = np.zeros((1, 256), np.float32)
    w = np.zeros((4, 144), np.uint8)
    with pytest.raises(Q4KError, match="GPU only"):
        linked.gemv_q8_linked(x, w, "Q4_K", 4, np.zeros((1, 4), np.float32))
