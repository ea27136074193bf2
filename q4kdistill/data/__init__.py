"""Data shipped with the package."""
import os

#: Tensor table + metadata of the real DeepSeek-R1-Distill-Qwen-7B Q4_K_M GGUF (339 tensors, 4,677,120,000 bytes).
MANIFEST_7B = os.path.join(os.path.dirname(__file__), "deepseek-r1-distill-qwen-7b-q4_k_m.manifest.json")

# The data pipeline (text/shards -> token stream -> packed sequences -> batches); see corpus.py.
from .corpus import (  # noqa: E402,F401
    Batches, TokenDataset, demo_corpus, find_files, load_datasets, load_shard, save_tokens, split_files,
    tokenize_files,
)
