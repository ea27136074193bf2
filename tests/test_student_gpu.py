"""GPU float32 against CPU float64: the whole loss_and_grads, at a moderate real-looking size."""
import numpy as np
import pytest

from q4kdistill.student.losses import LossConfig
from q4kdistill.student.ops.gradcheck import rel_error
from q4kdistill.student.model import Student
from _helpers_student import tiny_config


@pytest.mark.gpu
@pytest.mark.parametrize("family,checkpoint,chunk", [("llama", False, None), ("gemma3", True, 96), ("qwen2", False, 200)])
def test_gpu_float32_matches_cpu_float64(family, checkpoint, chunk):
    import cupy

    cfg = tiny_config(family, n_layers=3, d_model=256, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=704,
                      vocab_size=32003, sliding_window=48, swa_layers=[0, 1] if family == "gemma3" else [])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (3, 128))
    mask = np.ones(ids.shape, bool)
    mask[1, 100:] = False
    mask[2, :7] = False
    teacher = (rng.standard_normal((*ids.shape, cfg.vocab_size)) * 2).astype(np.float32)
    loss_cfg = LossConfig("jsd", beta=0.4, alpha=0.2, temperature=1.5, top_k=64)

    cpu = Student.from_config(cfg, seed=1, dtype=np.float64, xp=np)
    gpu = Student(cfg, dtype=np.float32, xp=cupy, checkpoint=checkpoint, chunk_tokens=chunk)
    gpu.param_buffer.flat[...] = cupy.asarray(cpu.param_buffer.flat.astype(np.float32))
    cpu.param_buffer.flat[...] = gpu.param_buffer.flat.get()        # both start from the same fp32 values

    loss64, g64, parts64 = cpu.loss_and_grads(ids, teacher, loss_cfg, attention_mask=mask)
    t_gpu = cupy.asarray(teacher).reshape(-1, cfg.vocab_size)
    loss32, g32, parts32 = gpu.loss_and_grads(cupy.asarray(ids), lambda a, b: t_gpu[a:b], loss_cfg,
                                              attention_mask=cupy.asarray(mask))
    assert loss32 == pytest.approx(loss64, rel=1e-4)
    for name in g64:
        err = rel_error(g32[name], g64[name])
        assert err <= 2e-3, f"{name}: {err:.2e}"
