"""The tiny teacher and corpus the distillation-loop tests share (test_distill, test_distributed_loop)."""
import numpy as np

from q4kdistill.formats import synthetic

DENSE = dict.fromkeys(("*", "attn_v", "ffn_down", "output", "token_embd"), "F32")
SMALL = dict(n_layers=3, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=256)


def write_teacher(tmp_path_factory):
    """A 3-block gemma3 teacher (sliding and global layers), F32, its own 384-token tokenizer."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.gguf"
    return synthetic.write_gguf(path, synthetic.tiny_config("gemma3", **SMALL), qtypes=DENSE, seed=1)


def write_corpus(tmp_path_factory) -> str:
    """12 text files of sentences in the synthetic tokenizer's words (some held out by file)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(synthetic._WORDS, rng.integers(5, 15))) + "." for _ in range(40))
        (root / f"doc{i:02d}.txt").write_text(text)
    return str(root)
