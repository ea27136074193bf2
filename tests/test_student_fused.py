"""The student on the fused kernels (ops/fused.py, fused_linear_loss) against its reference ops.

Simulator tests (tiny shapes): ``fused.ON_HOST = True`` sends the student's NumPy arrays through the
kernels, so the wiring of model.py (add+norm, norm backward with the residual grad, rope in place,
GLU, the fused head) is checked on the CPU. GPU tests: 0.5B-layout widths, 4 blocks, V 32k, 4 x 512,
the CuPy student (fp32 and bf16) against the NumPy fp32 student from the same initial weights.
"""
import math

import numpy as np
import pytest
from _helpers_student import batch, randomize, tiny_config

from q4kdistill.config import ModelConfig
from q4kdistill.student import Student
from q4kdistill.student.losses import LossConfig, SparseTargets
from q4kdistill.student.ops import fused as fused_ops

KERNELS = (("kernels.fused_rmsnorm", "rmsnorm_fwd"), ("kernels.fused_rmsnorm", "rmsnorm_bwd"),
           ("kernels.fused_rmsnorm", "rmsnorm_apply"),
           ("kernels.fused_rope", "rope_apply"), ("kernels.fused_glu", "glu_fwd"), ("kernels.fused_glu", "glu_bwd"),
           ("kernels.fused_kd_loss", "kd_loss_rows"))


def count_kernel_calls(monkeypatch) -> dict:
    """Wrap every fused kernel launcher the student reaches; -> {launcher name: calls} (filled as they run)."""
    import importlib

    calls = {}
    for mod_name, fn in KERNELS:
        mod = importlib.import_module(mod_name)

        def counted(*a, _f=getattr(mod, fn), _n=fn, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(mod, fn, counted)
    return calls


def step(model, ids, teacher, loss_cfg, mask):
    loss, _, parts = model.loss_and_grads(ids, teacher, loss_cfg, attention_mask=mask)
    return loss, parts, model.grad_buffer.flat.copy()


def assert_grads_close(got, ref, model, rel):
    """Every named gradient within ``rel`` of that tensor's largest reference value."""
    buf = model.grad_buffer
    for name, shape in buf.shapes.items():
        a = buf.offsets[name]
        g, r = got[a:a + math.prod(shape)], ref[a:a + math.prod(shape)]
        err, scale = float(np.abs(g - r).max()), float(np.abs(r).max())
        assert err <= rel * scale + 1e-7, f"{name}: max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("family,checkpoint", [("llama", False), ("qwen2", True), ("gemma3", False)])
def test_wired_student_matches_reference_ops(monkeypatch, family, checkpoint):
    """Loss, parts and every gradient of the fused-wired student (fp32, simulator) within 1e-4 of the
    reference ops' run; every fused kernel is reached, and none on the default CPU path. Each family
    once (the simulator runs a gemma3 step in ~1 min); checkpointing on for qwen2, so the recompute
    path goes through the kernels too."""
    cfg = tiny_config(family)
    rng = np.random.default_rng(3 + len(family))
    model = Student(cfg, dtype=np.float32, checkpoint=checkpoint, chunk_tokens=4)     # 10 tokens: chunks 4, 4, 2
    randomize(model, rng)
    ids, mask = batch(rng, cfg)
    teacher = (rng.standard_normal(ids.shape + (cfg.vocab_size,)) * 2).astype(np.float32)
    loss_cfg = LossConfig(alpha=0.3, temperature=1.5)
    calls = count_kernel_calls(monkeypatch)
    loss_ref, parts_ref, grads_ref = step(model, ids, teacher, loss_cfg, mask)
    assert not calls, f"the CPU path reached fused kernels: {calls}"
    monkeypatch.setattr(fused_ops, "ON_HOST", True)
    loss, parts, grads = step(model, ids, teacher, loss_cfg, mask)
    assert set(calls) == {fn for _, fn in KERNELS}, calls
    assert math.isclose(loss, loss_ref, rel_tol=1e-5), (loss, loss_ref)
    for k in parts_ref:
        assert math.isclose(parts[k], parts_ref[k], rel_tol=1e-5, abs_tol=1e-7), (k, parts[k], parts_ref[k])
    assert_grads_close(grads, grads_ref, model, 1e-4)


def test_glu_output_made_again_in_the_backward_changes_nothing(monkeypatch):
    """The fused path drops the GLU output after ffn_down's product and makes it again in the backward
    (model._glu_recomputable): loss and every gradient bit for bit those of keeping it (bf16, emulated:
    the product's input is the rounded output, as ffn_down's cache held it; fp32 is covered against
    the reference ops above)."""
    import q4kdistill.student.model as M

    cfg = tiny_config("llama")
    rng = np.random.default_rng(12)
    model = Student(cfg, xp=np, precision="bf16")
    randomize(model, rng, 0.2)
    ids, mask = batch(rng, cfg)
    teacher = (rng.standard_normal(ids.shape + (cfg.vocab_size,)) * 2).astype(np.float32)
    monkeypatch.setattr(fused_ops, "ON_HOST", True)
    calls = count_kernel_calls(monkeypatch)
    made_again = step(model, ids, teacher, LossConfig(), mask)
    forward_glus = calls["glu_fwd"]
    monkeypatch.setattr(M, "_glu_recomputable", lambda c, cfg: False)
    kept = step(model, ids, teacher, LossConfig(), mask)
    assert forward_glus == 2 * cfg.n_layers and calls["glu_fwd"] == 3 * cfg.n_layers   # once more a block
    assert made_again[:2] == kept[:2]
    np.testing.assert_array_equal(made_again[2], kept[2])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_norm_outputs_made_again_in_the_backward_change_nothing(monkeypatch, precision):
    """The fused path keeps neither norm's output (the input of q, k, v and of gate, up) for the
    weight grads: model._drop_normed drops it, the backward makes it again from the norm's cache
    (rmsnorm_apply: the forward's expression on the same values). Loss and every gradient bit for
    bit those of keeping it; two remakes a block. And in bf16 the flash cache's O is the attention
    output's kept 16-bit copy (model._share_attention_output), not a second array."""
    import q4kdistill.student.model as M

    cfg = tiny_config("llama")
    rng = np.random.default_rng(13)
    model = Student(cfg, xp=np, precision=precision)
    randomize(model, rng, 0.2)
    ids, mask = batch(rng, cfg)
    teacher = (rng.standard_normal(ids.shape + (cfg.vocab_size,)) * 2).astype(np.float32)
    monkeypatch.setattr(fused_ops, "ON_HOST", True)
    calls = count_kernel_calls(monkeypatch)
    shared = []
    share = M._share_attention_output

    def spy(c, shape, prec):
        share(c, shape, prec)
        shared.append(np.shares_memory(c["attn"].o, c["attn_output"][0]))
    monkeypatch.setattr(M, "_share_attention_output", spy)
    made_again = step(model, ids, teacher, LossConfig(), mask)
    assert calls["rmsnorm_apply"] == 2 * cfg.n_layers
    assert shared == [True] * cfg.n_layers        # bf16: O is the rounded copy; fp32: the one array anyway
    monkeypatch.setattr(M, "_drop_normed", lambda c, norm, products: None)
    kept = step(model, ids, teacher, LossConfig(), mask)
    assert calls["rmsnorm_apply"] == 2 * cfg.n_layers                 # none the second time
    assert made_again[:2] == kept[:2]
    np.testing.assert_array_equal(made_again[2], kept[2])


def test_wired_student_takes_teacher_cache_chunks(monkeypatch):
    """A teacher callable that returns SparseTargets (a teacher cache's top-k): the fused head runs
    the reference chunk loss for those chunks and matches the reference ops' run."""
    cfg = tiny_config("qwen2")
    rng = np.random.default_rng(11)
    model = Student(cfg, dtype=np.float32, chunk_tokens=3)
    randomize(model, rng)
    ids, mask = batch(rng, cfg)
    n, k = ids.size, 4
    top = np.argsort(-rng.standard_normal((n, cfg.vocab_size)), axis=1)[:, :k]
    p = rng.dirichlet(np.ones(k + 1), size=n)                       # top-k probabilities, then the rest
    sparse = SparseTargets(top, np.log(p).astype(np.float32))

    def teacher(a, b):
        return sparse.rows(a, b)
    loss_cfg = LossConfig(alpha=0.2)
    loss_ref, _, grads_ref = step(model, ids, teacher, loss_cfg, mask)
    monkeypatch.setattr(fused_ops, "ON_HOST", True)
    loss, _, grads = step(model, ids, teacher, loss_cfg, mask)
    assert math.isclose(loss, loss_ref, rel_tol=1e-5), (loss, loss_ref)
    assert_grads_close(grads, grads_ref, model, 1e-4)


def test_wired_student_bad_teacher_shape_is_q4k_error(monkeypatch):
    from q4kdistill.errors import Q4KError

    cfg = tiny_config("llama")
    model = Student(cfg, dtype=np.float32)
    ids, mask = batch(np.random.default_rng(0), cfg)
    monkeypatch.setattr(fused_ops, "ON_HOST", True)
    with pytest.raises(Q4KError, match="same vocabulary"):
        model.loss_and_grads(ids, np.zeros(ids.shape + (cfg.vocab_size + 1,), np.float32), LossConfig())


# -- the GPU: 0.5B-layout widths ----------------------------------------------------------------
def _cp():
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as e:                                        # noqa: BLE001  (no driver, no device)
        pytest.skip(f"no CUDA device: {e}")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("precision,loss_rel,grad_rel", [("fp32", 1e-4, 2e-3), ("bf16", 2e-2, 1e-1)])
def test_gpu_fused_student_matches_numpy_fp32(monkeypatch, precision, loss_rel, grad_rel):
    """qwen2-0.5B widths (d_model 896, 14/2 heads, d_ff 4864), 4 blocks, V 32768, 4 x 512 tokens,
    checkpointing on: the CuPy student on the fused kernels against the NumPy fp32 reference student
    from the same initial weights. Bounds: fp32 loss 1e-4 relative, every gradient within 2e-3 of its
    tensor's max |ref| (float32 sums in another order over 2048 tokens; attention on the FP32 Numba
    kernels, as the default tensor-core path rounds q, k, v to 16 bits); bf16 (8-bit mantissas in
    every product and kept activation, attention on the tensor cores) loss 2e-2, gradients 1e-1 of
    max |ref| per tensor."""
    cp = _cp()
    if precision == "fp32":
        monkeypatch.setenv("Q4KDISTILL_ATTENTION", "numba")
    cfg = ModelConfig("qwen2", rope_style="neox", act="silu", qkv_bias=True, tied_output=True, n_layers=4,
                      d_model=896, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864, vocab_size=32768, norm_eps=1e-6)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (4, 512))
    mask = np.ones(ids.shape, bool)
    mask[1, 400:] = False                                          # right padding
    teacher = (rng.standard_normal(ids.shape + (cfg.vocab_size,), dtype=np.float32) * 3)
    loss_cfg = LossConfig(alpha=0.2, temperature=1.5)
    ref = Student.from_config(cfg, seed=1, xp=np, checkpoint=True)
    loss_ref, parts_ref, grads_ref = step(ref, ids, teacher, loss_cfg, mask)
    gpu = Student.from_config(cfg, seed=1, xp=cp, checkpoint=True, precision=precision)
    loss, _, _ = gpu.loss_and_grads(cp.asarray(ids), cp.asarray(teacher), loss_cfg, attention_mask=cp.asarray(mask))
    assert math.isfinite(loss) and math.isclose(loss, loss_ref, rel_tol=loss_rel), (loss, loss_ref)
    assert_grads_close(cp.asnumpy(gpu.grad_buffer.flat), grads_ref, ref, grad_rel)
