"""Numba CUDA kernels for x @ W.T on GGUF quant blocks as stored, and their registry.

No model knowledge lives here: only quant formats, matrix shapes and launch parameters.

What runs where (README.md, "What runs where", has the table per card): at small M (1, and up to
8 for Q4_K on the H200 and on cards without a table) a fused GEMV decodes the blocks inside the
product; above that every shipped table decodes one matrix at a time into a reusable fp16
scratch and calls cuBLAS GemmEx (FP32 accumulate), so training sizes (M = 8 x 512) run that way.

    matmul(x, w_raw, qtype, n_out, variant=None)   x @ W.T, float32 [M, n_out]
    dequantize_to(w_raw, qtype, n_out, out_dtype)  W decoded: float32 / float16 / bfloat16 bits
    embedding_rows(w_raw, qtype, ids)              only rows `ids` decoded, float32
    variants(qtype=None), get(name), register(Variant(...)), choose(qtype, M, N, K)
    bench.run(...)                                 benchmark table (see bench.py)
    rmsnorm_fwd/bwd, rope_apply, glu_fwd/bwd, kd_loss_rows   fused row/elementwise kernels (fused_*.py)

Files, in reading order: decode.py (decode8 per type; the block layouts themselves are
q4kdistill/formats/block_layouts.py), gemv.py, gemv_chunk.py, gemv_dp4a.py, gemm.py, dequant.py (the
kernels), scratch.py (decode + cuBLAS), decode_ahead.py (stacked weights in one GEMM; a tall weight
decoded a slab ahead of its GEMMs), cpu.py (NumPy), linked.py with csrc/ (CUDA C, one file
per job), registry.py (Variant: what each allocates and accepts), builtin.py, dispatch.py,
autotune.py, bench.py; the fused transformer ops: fused_io.py (storage types, block reductions),
fused_rmsnorm.py, fused_rope.py, fused_glu.py, fused_kd_loss.py. README.md says how to add a variant.
"""
from q4kdistill import backend as _backend  # noqa: F401  (switches on the simulator on CPU before numba.cuda loads)

from . import builtin as _builtin  # noqa: F401,E402  (registers the shipped variants)
from .dispatch import choose, dequantize_to, embedding_rows, matmul, reload_table
from .fused_glu import glu_bwd, glu_fwd
from .fused_kd_loss import kd_loss_rows
from .fused_rmsnorm import rmsnorm_bwd, rmsnorm_fwd
from .fused_rope import rope_apply
from .registry import Variant, get, register, variants
from .scratch import gemm_f16_f32, release_scratch, scratch_bytes

__all__ = ["matmul", "dequantize_to", "embedding_rows", "variants", "get", "register", "Variant",
           "choose", "reload_table", "scratch_bytes", "release_scratch", "gemm_f16_f32",
           "rmsnorm_fwd", "rmsnorm_bwd", "rope_apply", "glu_fwd", "glu_bwd", "kd_loss_rows"]
