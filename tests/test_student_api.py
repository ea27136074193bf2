"""Student construction, forward forms, memory options, teacher init, and a tiny distillation."""
import numpy as np
import pytest

from q4kdistill.errors import Q4KError
from q4kdistill.student.losses import LossConfig
from q4kdistill.student.optim import AdamW, OptimConfig
from q4kdistill.student.model import Student
from _helpers_student import batch, randomize, tiny_config


class FakeTeacher:
    """What Student.from_teacher needs from q4kdistill.teacher.model.Teacher: config and weight_f32."""

    def __init__(self, config, seed):
        self.config = config
        self.model = Student.from_config(config, seed=seed, dtype=np.float64, xp=np)
        randomize(self.model, np.random.default_rng(seed), scale=0.3)
        self.asked = []

    def weight_f32(self, name):
        self.asked.append(name)
        return self.model.params[name].astype(np.float32)


def test_names_shapes_and_init():
    cfg = tiny_config("gemma3", tied_output=False)
    s = Student.from_config(cfg, seed=3, xp=np)
    assert list(s.params) == list(cfg.tensor_shapes())
    assert s.params["blk.1.attn_q.weight"].shape == (cfg.q_dim, cfg.d_model)
    assert s.params["blk.0.attn_k_norm.weight"].shape == (cfg.head_dim,)
    assert s.params["output.weight"].shape == (cfg.vocab_size, cfg.d_model)
    assert all(v.dtype == np.float32 for v in s.params.values())
    assert np.all(s.params["blk.0.post_ffw_norm.weight"] == 1)
    assert np.array_equal(s.param_buffer.flat, Student.from_config(cfg, seed=3, xp=np).param_buffer.flat)
    q = Student.from_config(tiny_config("qwen2"), xp=np)
    assert "output.weight" not in q.params and np.all(q.params["blk.0.attn_v.bias"] == 0)
    assert q.n_params == sum(v.size for v in q.params.values())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forward_forms_agree(family):
    rng = np.random.default_rng(0)
    cfg = tiny_config(family)
    s = Student(cfg, dtype=np.float64, xp=np)
    randomize(s, rng)
    ids, mask = batch(rng, cfg, B=3, T=6)
    logits = s.forward(ids, mask)
    assert logits.shape == (3, 6, cfg.vocab_size)
    for chunk in (1, 4, 7, 100):
        parts = list(s.iter_logits(ids, mask, chunk_tokens=chunk))
        assert parts[0][:2] == (0, min(chunk, 18)) and parts[-1][1] == 18
        assert np.allclose(np.concatenate([p[2] for p in parts]).reshape(logits.shape), logits, rtol=1e-13, atol=1e-13)
    # right padding: what the pad positions hold cannot change the real positions
    ids2 = ids.copy()
    ids2[0, ~mask[0]] = (ids2[0, ~mask[0]] + 3) % cfg.vocab_size
    assert np.allclose(s.forward(ids2, mask)[0, mask[0]], logits[0, mask[0]], rtol=1e-12, atol=1e-12)
    # the batch rows are independent
    assert np.allclose(s.forward(ids[1:2], mask[1:2])[0], logits[1], rtol=1e-12, atol=1e-12)


def test_memory_options_do_not_change_results():
    rng = np.random.default_rng(1)
    cfg = tiny_config("gemma3", tied_output=False)
    ids, mask = batch(rng, cfg)
    teacher = rng.standard_normal((*ids.shape, cfg.vocab_size))
    results = []
    for checkpoint, chunk in ((False, None), (True, None), (False, 3), (True, 1)):
        s = Student(cfg, dtype=np.float64, xp=np, checkpoint=checkpoint, chunk_tokens=chunk)
        randomize(s, np.random.default_rng(2))
        loss, grads, parts = s.loss_and_grads(ids, teacher, LossConfig(alpha=0.5, temperature=2.0), attention_mask=mask)
        results.append((loss, s.grad_buffer.flat.copy()))
    for loss, g in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-13)
        assert np.allclose(g, results[0][1], rtol=1e-11, atol=1e-14)


def test_accumulate_and_ce_only():
    rng = np.random.default_rng(2)
    cfg = tiny_config("llama")
    s = Student.from_config(cfg, seed=0, dtype=np.float64, xp=np)
    ids, mask = batch(rng, cfg)
    loss, grads, parts = s.loss_and_grads(ids, None, LossConfig(alpha=1.0), attention_mask=mask)
    assert parts["kd"] == 0 and parts["ce"] == loss > 0
    once = s.grad_buffer.flat.copy()
    s.loss_and_grads(ids, None, LossConfig(alpha=1.0), attention_mask=mask, accumulate=True)
    assert np.allclose(s.grad_buffer.flat, 2 * once)
    with pytest.raises(Q4KError, match="shape"):
        s.loss_and_grads(ids, np.zeros((2, 5, cfg.vocab_size + 1)), LossConfig())
    with pytest.raises(Q4KError):
        s.forward(ids[0])


def test_from_teacher_takes_the_chosen_blocks():
    tcfg = tiny_config("gemma3", n_layers=4, swa_layers=[0, 1, 3], tied_output=False)
    teacher = FakeTeacher(tcfg, seed=7)
    s = Student.from_teacher(teacher, layers=[3, 2], xp=np)
    assert s.config.n_layers == 2 and s.config.swa_layers == [0]           # block 3 slides, block 2 is global
    assert s.config.layer_rope_base(0) == tcfg.rope_base_swa and s.config.layer_rope_base(1) == tcfg.rope_base
    for name in ("ffn_down.weight", "attn_q_norm.weight"):
        assert np.array_equal(s.params[f"blk.0.{name}"], teacher.model.params[f"blk.3.{name}"].astype(np.float32))
        assert np.array_equal(s.params[f"blk.1.{name}"], teacher.model.params[f"blk.2.{name}"].astype(np.float32))
    assert "output.weight" in teacher.asked and not any(n.startswith(("blk.0.", "blk.1.")) for n in teacher.asked)
    # every block kept: the student is the teacher
    full = Student.from_teacher(teacher, layers=range(4), dtype=np.float64, xp=np)
    ids, mask = batch(np.random.default_rng(0), tcfg)
    ref = teacher.model.forward(ids, mask)
    assert np.allclose(full.forward(ids, mask), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(Q4KError):
        Student.from_teacher(teacher, layers=[4])


def test_distillation_lowers_the_loss():
    """A width-reduced random student sharing the teacher's vocabulary learns one batch."""
    tcfg = tiny_config("qwen2", vocab_size=17)
    teacher = FakeTeacher(tcfg, seed=3).model
    student = Student.from_config(tcfg.replace(d_model=8, n_layers=1, d_ff=12), seed=0, xp=np)
    ids, mask = batch(np.random.default_rng(4), tcfg, B=3, T=8)
    t_logits = teacher.forward(ids, mask).astype(np.float32) * 3
    opt = AdamW.for_student(student, OptimConfig(lr=3e-2, min_lr=3e-3, warmup_steps=3, total_steps=40, weight_decay=0.01))
    losses = []
    for _ in range(40):
        loss, _, parts = student.loss_and_grads(ids, t_logits, LossConfig("kl", alpha=0.1), attention_mask=mask)
        opt.step()
        losses.append(parts["kd"])
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
