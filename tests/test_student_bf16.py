"""The bf16 student (student/precision.py): bfloat16 rounding, gradients within bf16 bounds of the
fp32 ones, fp32 master weights, and the copy the products use kept in step with the master.

On the CPU bfloat16 is emulated (float32 arrays holding bfloat16 values), so these tests run the
same code path as a GPU's bf16 student; test_student_bf16_gpu at the end runs the real dtype.

Bounds: bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %). One rounding of every
product input and output through two blocks and the LM head moves the loss by about 0.02 % and
the gradient (as a whole) by about 2 %, any one tensor's gradient by up to about 4.5 % (measured
on these shapes); the bounds below leave about 2x room, and a lower bound checks bf16 is really on.
"""
import numpy as np
import pytest

from q4kdistill.errors import Q4KError
from q4kdistill.student.losses import LossConfig
from q4kdistill.student.model import Student
from q4kdistill.student.ops.gradcheck import rel_error
from q4kdistill.student.optim import AdamW
from q4kdistill.student.precision import Precision, resolve, round_bf16
from _helpers_student import batch, randomize, tiny_config

LOSS_REL = 2e-3          # |loss_bf16 - loss_fp32| / loss_fp32
GRAD_REL = 5e-2          # ||g_bf16 - g_fp32|| / ||g_fp32|| over the whole grad buffer
TENSOR_REL = 1e-1        # the same, tensor by tensor
AT_LEAST = 1e-4          # bf16 must differ from fp32 by at least this (the rounding is really on)


def test_round_bf16_matches_torch_and_rounds_ties_to_even():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 5000),
                        np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 3.3895314e38, 1e-40], np.float32)]).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(round_bf16(x), want)
    one_ulp = np.float32(2.0 ** -7)                        # bf16 spacing at 1.0
    ties = np.array([1 + one_ulp / 2, 1 + 3 * one_ulp / 2], np.float32)   # halfway: to the even neighbour
    np.testing.assert_array_equal(round_bf16(ties), np.array([1.0, 1 + 2 * one_ulp], np.float32))
    assert round_bf16(x).dtype == np.float32


def test_precision_names():
    assert resolve("auto", on_gpu=False) == "fp32" and resolve(None, on_gpu=True) == "bf16"
    assert resolve("fp32", on_gpu=True) == "fp32"
    with pytest.raises(Q4KError, match="precision 'fp16'"):
        resolve("fp16", on_gpu=False)
    with pytest.raises(Q4KError):
        Precision("half", np)
    p = Precision("bf16", np)
    assert p.emulated and p.low_dtype == np.float32
    x = np.array([1.0 + 2.0 ** -10], np.float32)
    assert p.low(x)[0] == 1.0 and p.high(x)[0] == 1.0      # emulated: a product's output is rounded too
    assert Precision("fp32", np).low(x) is x


def _pair(family, rng, **changes):
    cfg = tiny_config(family, d_model=32, head_dim=8, d_ff=40, vocab_size=50, **changes)
    fp32 = Student(cfg, xp=np)
    randomize(fp32, rng, 0.2)
    bf16 = Student(cfg, xp=np, precision="bf16")
    bf16.param_buffer.flat[...] = fp32.param_buffer.flat
    return cfg, fp32, bf16


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_bf16_gradients_within_bf16_bounds_of_fp32(family):
    rng = np.random.default_rng(1)
    cfg, fp32, bf16 = _pair(family, rng)
    ids, mask = batch(rng, cfg, 2, 7)
    teacher = (rng.standard_normal((2, 7, cfg.vocab_size)) * 2).astype(np.float32)
    loss_cfg = LossConfig(alpha=0.3)
    l32, g32, _ = fp32.loss_and_grads(ids, teacher, loss_cfg, mask)
    l16, g16, _ = bf16.loss_and_grads(ids, teacher, loss_cfg, mask)
    assert bf16.param_buffer.flat.dtype == np.float32 and bf16.grad_buffer.flat.dtype == np.float32
    assert abs(l16 - l32) <= LOSS_REL * abs(l32)
    whole = rel_error(bf16.grad_buffer.flat, fp32.grad_buffer.flat)
    assert AT_LEAST < whole <= GRAD_REL, whole
    for name in g32:
        assert rel_error(g16[name], g32[name]) <= TENSOR_REL, name


def test_bf16_checkpointing_changes_nothing_and_chunks_stay_within_bounds():
    """Recomputing blocks in the backward gives the very same numbers; smaller LM-head chunks round
    each chunk's head gradient to bf16 on its own, so they move it, within the bf16 bounds."""
    rng = np.random.default_rng(2)
    cfg = tiny_config("qwen2", d_model=32, head_dim=8, d_ff=40, vocab_size=50)
    ids, mask = batch(rng, cfg, 2, 7)
    teacher = (rng.standard_normal((2, 7, cfg.vocab_size)) * 2).astype(np.float32)
    runs = {}
    for checkpoint, chunk in ((False, None), (True, None), (False, 5)):
        s = Student.from_config(cfg, seed=3, precision="bf16", checkpoint=checkpoint, chunk_tokens=chunk, xp=np)
        loss, _, _ = s.loss_and_grads(ids, teacher, LossConfig(), mask)
        runs[checkpoint, chunk] = (loss, s.grad_buffer.flat.copy())
    assert runs[False, None][0] == runs[True, None][0]
    np.testing.assert_array_equal(runs[False, None][1], runs[True, None][1])
    assert runs[False, 5][0] == pytest.approx(runs[False, None][0], rel=LOSS_REL)
    assert rel_error(runs[False, 5][1], runs[False, None][1]) <= GRAD_REL


def test_master_stays_fp32_and_the_copy_follows_each_step():
    rng = np.random.default_rng(4)
    cfg, _, s = _pair("llama", rng)
    ids, mask = batch(rng, cfg, 2, 7)
    teacher = (rng.standard_normal((2, 7, cfg.vocab_size)) * 2).astype(np.float32)
    master = s.param_buffer.flat.copy()
    s.loss_and_grads(ids, teacher, LossConfig(), mask)
    np.testing.assert_array_equal(s.param_buffer.flat, master)            # the forward never rounds the master
    w = "blk.0.ffn_up.weight"
    assert not np.array_equal(s.params[w], round_bf16(s.params[w]))         # the master holds more than bf16
    np.testing.assert_array_equal(s.compute[w], round_bf16(s.params[w]))    # what the products use
    assert s.compute["blk.0.attn_norm.weight"] is s.params["blk.0.attn_norm.weight"]   # vectors: the master
    opt = AdamW.for_student(s)
    opt.step()
    assert not np.array_equal(s.param_buffer.flat, master)
    s.loss_and_grads(ids, teacher, LossConfig(), mask)
    np.testing.assert_array_equal(s.compute[w], round_bf16(s.params[w]))    # refreshed from the new master


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_copy_holds_what_the_products_multiply_and_the_planner_counts_it(family):
    """An untied embedding is only gathered (from the master): the copy leaves it out; a tied one is the
    LM head's weight too and is copied. The planner's row counts the same elements."""
    from q4kdistill.memory.planner import bf16_copy_elements

    rng = np.random.default_rng(6)
    cfg, _, s = _pair(family, rng)
    embd = "token_embd.weight"
    assert cfg.tied_output == (family == "qwen2")
    assert s._low_flat.size == bf16_copy_elements(cfg)
    assert (s.compute[embd] is s.params[embd]) != cfg.tied_output
    ids, mask = batch(rng, cfg, 2, 7)
    s.loss_and_grads(ids, None, LossConfig(alpha=1.0), mask)
    for name, shape in cfg.tensor_shapes().items():
        if len(shape) >= 2 and (cfg.tied_output or name != embd):
            np.testing.assert_array_equal(s.compute[name], round_bf16(s.params[name]), err_msg=name)


def test_bf16_logits_are_bf16_products():
    """iter_logits: the LM head's product in bf16 (inputs and output rounded), returned as float32."""
    rng = np.random.default_rng(5)
    cfg, fp32, bf16 = _pair("gemma3", rng)
    ids, _ = batch(rng, cfg, 2, 7)
    s16, s32 = bf16.forward(ids), fp32.forward(ids)
    assert s16.dtype == np.float32
    np.testing.assert_array_equal(s16, round_bf16(s16))
    assert AT_LEAST < rel_error(s16, s32) <= GRAD_REL


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_student_bf16_gpu(family):
    """Real bfloat16 on CuPy (cuBLAS products): the dtype is used, the gradients sit within bf16
    bounds of the GPU fp32 student's, and a step of AdamW moves the fp32 master."""
    import cupy

    cfg = tiny_config(family, n_layers=3, d_model=256, n_heads=8, n_kv_heads=2, head_dim=32, d_ff=704,
                      vocab_size=32003, sliding_window=48, swa_layers=[0, 1] if family == "gemma3" else [])
    rng = np.random.default_rng(0)
    ids = cupy.asarray(rng.integers(0, cfg.vocab_size, (3, 128)))
    teacher = cupy.asarray((rng.standard_normal((3 * 128, cfg.vocab_size)) * 2).astype(np.float32))
    fp32 = Student.from_config(cfg, seed=1, xp=cupy)
    bf16 = Student.from_config(cfg, seed=1, xp=cupy, precision="bf16", chunk_tokens=100)
    assert not bf16.prec.emulated and bf16.prec.low_dtype.itemsize == 2
    assert bf16.compute["blk.0.ffn_up.weight"].dtype == bf16.prec.low_dtype
    l32, _, _ = fp32.loss_and_grads(ids, lambda a, b: teacher[a:b], LossConfig(alpha=0.2))
    l16, _, _ = bf16.loss_and_grads(ids, lambda a, b: teacher[a:b], LossConfig(alpha=0.2))
    assert abs(l16 - l32) <= LOSS_REL * abs(l32)
    whole = rel_error(bf16.grad_buffer.flat, fp32.grad_buffer.flat)
    assert AT_LEAST < whole <= GRAD_REL, whole
    before = bf16.param_buffer.flat.copy()
    AdamW.for_student(bf16).step()
    assert bf16.param_buffer.flat.dtype == cupy.float32 and not bool((bf16.param_buffer.flat == before).all())


@pytest.mark.gpu
def test_cupy_bfloat16_cast_is_the_emulated_rounding():
    """CuPy's float32 -> bfloat16 cast and round_bf16 agree bit for bit: the CPU tests see the GPU's numbers."""
    import cupy

    prec = Precision("bf16", cupy)
    assert not prec.emulated
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1 << 20) * 10.0 ** rng.integers(-20, 20, 1 << 20)).astype(np.float32)
    got = prec.high(prec.low(cupy.asarray(x))).get()
    np.testing.assert_array_equal(got, round_bf16(x))


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [True, False])
def test_matmul_f32_is_the_fp32_product_of_the_16bit_operands(trans_b):
    """matmul_f32 (one GemmEx, bf16 / fp16 operands, FP32 output): against float64 of the same
    rounded operands to FP32 summation error (K = 1000: ~1e-6 relative), shapes not multiples of 8
    on any side, the output poisoned first; a mixed pair of types is refused."""
    import cupy

    from q4kdistill.student.ops.fused_linear_loss import matmul_f32

    rng = np.random.default_rng(3)
    M, N, K = 77, 133, 1000
    for dtype in (cupy.float16, Precision("bf16", cupy).low_dtype):
        a = cupy.asarray(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
        b = cupy.asarray(rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)).astype(dtype)
        out = cupy.full((M, N), cupy.nan, dtype=cupy.float32)
        got = matmul_f32(a, b, trans_b, out=out)
        a64, b64 = (x.astype(cupy.float32).get().astype(np.float64) for x in (a, b))
        want = a64 @ (b64.T if trans_b else b64)
        assert got is out and rel_error(got.get(), want) < 1e-5
    with pytest.raises(Q4KError):
        matmul_f32(a, b.astype(cupy.float16) if b.dtype != cupy.float16 else b.astype(cupy.float32), trans_b)
