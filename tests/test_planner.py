"""Memory planner: resident bytes from the real 7B header, the same plan from the truncated file,
student specs, and the `plan` command's JSON."""
import json

import numpy as np
import pytest

from q4kdistill import cli

from q4kdistill.memory import planner
from q4kdistill.errors import Q4KError
from q4kdistill.student.model import Student

B7_TENSORS, B7_BYTES = 339, 4_677_120_000


def _elements(info, vectors):
    return sum(t.n_elements for t in info.tensors.values() if (len(t.shape) == 1) == vectors)


H200, H100, DEFAULT = "NVIDIA H200", "NVIDIA H100 80GB HBM3", "a GPU without a table entry"
FFN = 2 * 18944 * 3584                     # ffn_gate/up/down [18944, 3584] decoded to fp16: 135_790_592 bytes


@pytest.fixture
def on_card(monkeypatch):
    """on_card(name): plan as kernels.choose would on that GPU, with the shipped tuning table and
    NVRTC present (the H100 table picks linked CUDA C variants)."""
    from kernels import dispatch

    from q4kdistill import backend

    monkeypatch.setenv("Q4KDISTILL_TUNING", str(dispatch.SHIPPED_TABLE))
    monkeypatch.setattr(dispatch, "linked_available", lambda: True)

    def use(name):
        monkeypatch.setattr(backend, "gpu_name", lambda: name)
        dispatch.reload_table()

    yield use
    dispatch.reload_table()


def test_resident_bytes_of_the_7b_manifest(manifest_7b_path):
    info = planner.open_teacher(manifest_7b_path)
    assert (len(info.tensors), info.total_tensor_bytes) == (B7_TENSORS, B7_BYTES)
    assert all(t.type_name == "F32" for t in info.tensors.values() if len(t.shape) == 1)
    resident = planner.teacher_resident(info.tensors.values())
    assert resident["native"] == B7_BYTES                     # the blocks as stored, nothing else
    assert resident["dequant-f32"] == 4 * info.n_elements == 30_462_466_048
    # teacher.decode_weight keeps vectors (norms, biases) in float32 on every backend
    assert resident["dequant-bf16"] == 2 * _elements(info, False) + 4 * _elements(info, True)
    plan = planner.make_plan(info, 1, 512, "params=0.5e9")
    assert plan.teacher_resident_bytes == resident
    assert plan.row("teacher forward peak (dequant-f32)").predicted_bytes == resident["dequant-f32"] + 4 * 512 * (3584 + 152064)
    # bf16 upcasts the whole head to float32 for its one product: astype(uint32) and << 16 at once
    assert plan.row("teacher forward peak (dequant-bf16)").predicted_bytes == resident["dequant-bf16"] + 4 * 512 * 3584 + 8 * 152064 * 3584
    # loading decodes straight to the kept dtype, so the peak is at the file's last matrix: all that
    # is kept + its uploaded blocks
    last = info.tensors["blk.27.ffn_up.weight"]
    assert list(info.tensors)[-1] == last.name
    for b in ("dequant-f32", "dequant-bf16"):
        assert plan.row(f"teacher load peak ({b})").predicted_bytes == resident[b] + last.nbytes


@pytest.mark.parametrize("card", [H200, H100, DEFAULT])
def test_native_forward_peak_on_each_card(manifest_7b_path, on_card, card):
    """At 1x512 every table decodes to an fp16 scratch (H200: dequant_f16_cublas, H100:
    dequant_linked_cublas, default: dequant_f16_cublas), so the plan is the same on each card."""
    on_card(card)
    plan = planner.make_plan(manifest_7b_path, 1, 512, "params=0.5e9")
    # the decode scratch holds the largest fp16 matrix the blocks decode, ffn_gate/up/down [18944, 3584]
    # (the LM head [152064, 3584] goes through it in slabs of HEAD_ROWS = 16384 rows)
    assert plan.row("teacher decode scratch (native)").predicted_bytes == FFN
    # the peak is the LM head: hidden [512, 3584], logits [512, 152064], one slab's product
    # [512, 16384] and x in fp16 [512, 3584] for the GemmEx
    head = 4 * 512 * 3584 + 4 * 512 * 152064 + 4 * 512 * 16384 + 2 * 512 * 3584
    assert plan.teacher_forward_peak_bytes == B7_BYTES + FFN + head == 5_168_902_144


# (card, qtype) -> [(M, variant, decode scratch bytes, other workspace bytes)], one per entry of
# kernels/tuning/default.json (DEFAULT: dispatch.builtin_choice), for ffn_gate Q4_K [18944, 3584]
# and ffn_down Q6_K [3584, 18944]: every decode-to-scratch variant holds the fp16 matrix (FFN bytes)
# and x in fp16 [M, K]; the fused GEMVs here allocate nothing.
TABLE_ENTRIES = {
    (H200, "Q4_K"): [(1, "gemv_f32_linked_r4w4", 0, 0), (8, "dequant_f16_cublas", FFN, 2 * 8 * 3584),
                     (16, "dequant_f16_cublas", FFN, 2 * 16 * 3584), (64, "dequant_linked_cublas", FFN, 2 * 64 * 3584),
                     (512, "dequant_linked_cublas", FFN, 2 * 512 * 3584), (4096, "dequant_linked_cublas", FFN, 2 * 4096 * 3584)],
    (H200, "Q6_K"): [(1, "gemv_chunk_r4w4", 0, 0), (8, "dequant_f16_cublas", FFN, 2 * 8 * 18944),
                     (16, "dequant_f16_cublas", FFN, 2 * 16 * 18944), (64, "dequant_f16_cublas", FFN, 2 * 64 * 18944),
                     (512, "dequant_linked_cublas", FFN, 2 * 512 * 18944), (4096, "dequant_linked_cublas", FFN, 2 * 4096 * 18944)],
    (H100, "Q4_K"): [(1, "gemv_f32_linked_r2w4", 0, 0), (8, "dequant_linked_cublas", FFN, 2 * 8 * 3584),
                     (16, "dequant_linked_cublas", FFN, 2 * 16 * 3584), (64, "dequant_linked_cublas", FFN, 2 * 64 * 3584),
                     (512, "dequant_linked_cublas", FFN, 2 * 512 * 3584), (4096, "dequant_linked_cublas", FFN, 2 * 4096 * 3584)],
    (H100, "Q6_K"): [(1, "gemv_chunk_r4w4", 0, 0), (8, "dequant_linked_cublas", FFN, 2 * 8 * 18944),
                     (16, "dequant_linked_cublas", FFN, 2 * 16 * 18944), (64, "dequant_f16_cublas", FFN, 2 * 64 * 18944),
                     (512, "dequant_linked_cublas", FFN, 2 * 512 * 18944), (4096, "dequant_linked_cublas", FFN, 2 * 4096 * 18944)],
    (DEFAULT, "Q4_K"): [(1, "gemv_chunk_r4w4", 0, 0), (8, "gemv_warp_r4w4", 0, 0),
                        (9, "dequant_f16_cublas", FFN, 2 * 9 * 3584)],
    (DEFAULT, "Q6_K"): [(1, "gemv_chunk_r4w4", 0, 0), (8, "gemv_warp_r4w4", 0, 0),
                        (9, "dequant_f16_cublas", FFN, 2 * 9 * 18944)],
}


def test_every_table_entry_has_its_exact_scratch(on_card):
    from kernels import dispatch

    shapes = {"Q4_K": (18944, 3584), "Q6_K": (3584, 18944)}
    table = dispatch._table(str(dispatch.SHIPPED_TABLE))["gpus"]
    for (card, qtype), entries in TABLE_ENTRIES.items():
        if card != DEFAULT:                      # one row here per entry of the shipped table
            assert [e["m_max"] or 4096 for e in table[card][qtype]] == [M for M, *_ in entries]
        on_card(card)
        N, K = shapes[qtype]
        info = type("T", (), dict(shape=(N, K), type_name=qtype, quantized=True, nbytes=N * K // 256 * {"Q4_K": 144, "Q6_K": 210}[qtype]))
        m = planner.Matrix(info, "native")
        for M, variant, scratch, transient in entries:
            assert planner._variant(qtype, M, N, K).name == variant, (card, qtype, M)
            assert m.scratch(M) == (("float16", scratch) if scratch else (None, 0)), (card, qtype, M)
            assert m.transient(M) == transient, (card, qtype, M)
            assert m.linear(M, 4 * M * N) == 4 * M * N + transient


def test_truncated_file_gives_the_manifest_plan(deepseek_chunk_path, manifest_7b_path):
    kw = dict(student="params=0.5e9", chunk_tokens=256)
    from_chunk = planner.make_plan(deepseek_chunk_path, 8, 512, **kw).to_json()
    from_manifest = planner.make_plan(manifest_7b_path, 8, 512, **kw).to_json()
    assert from_chunk["teacher"].pop("source") != from_manifest["teacher"].pop("source")
    assert from_chunk == from_manifest
    assert from_chunk["teacher"]["total_tensor_bytes"] == B7_BYTES


def test_distill_step_plan_adds_up(manifest_7b_path):
    plan = planner.make_plan(manifest_7b_path, 8, 512, "params=0.5e9", chunk_tokens=256)
    n = plan.student["n_params"]
    assert abs(n - 0.5e9) < 0.02e9
    assert plan.row("student state").predicted_bytes == 16 * n          # params, grads, m, v in float32
    step = plan.distill_step_peak_bytes
    assert step == max(plan.row(r).predicted_bytes for r in
                       ("distill: teacher trunk peak", "distill: student forward/backward peak", "distill: optimizer step peak"))
    scratch = plan.row("teacher decode scratch (native)").predicted_bytes
    assert plan.row("distill: optimizer step peak").predicted_bytes == B7_BYTES + 16 * n + scratch
    no_ckpt = planner.make_plan(manifest_7b_path, 8, 512, "params=0.5e9", chunk_tokens=256, checkpoint=False)
    assert no_ckpt.distill_step_peak_bytes > step + 5e9                  # 24 blocks of caches at 8x512
    # the fused head makes the teacher's logits for a chunk (its head: logits [n, V] and a slab's product)
    # before the chunk's s/ds [n, V], then holds both: no second chunk, no [V, D] temporary
    bigger_chunks = planner.make_plan(manifest_7b_path, 8, 512, "params=0.5e9", chunk_tokens=1024, fused_ops=True,
                                      gpu=False)
    U = 1024 * 152064 * 4
    teacher_head = planner.lm_head_bytes(planner.open_teacher(manifest_7b_path), "native", 1024)
    assert bigger_chunks.row("loss chunk working set").predicted_bytes == max(2 * U, sum(teacher_head.values()))


def test_a_gpu_step_plans_the_teachers_logits_in_spans(manifest_7b_path):
    """On a GPU Teacher.logits_fn multiplies HEAD_SPAN_TOKENS at once into float16 (teacher.model.head_span):
    the span is made before the chunk's s; its buffer is held through the loss and the backward of
    every chunk but the batch's last."""
    from q4kdistill.teacher.model import HEAD_SPAN_TOKENS as R

    V, D = 152064, 896
    info = planner.open_teacher(manifest_7b_path)
    plans = [planner.make_plan(manifest_7b_path, 8, 512, "qwen2-0.5b", chunk_tokens=256, precision="bf16",
                               fused_ops=True, gpu=g) for g in (True, False)]
    assert plans[0].head_span == (R, 2) and plans[1].head_span is None and R >= 256
    span = planner.lm_head_bytes(info, "native", R, itemsize=2)
    assert span["logits"] == R * V * 2
    stages = {"teacher head": sum(span.values()), "loss": 256 * V * 2 + R * V * 2,
              "head backward": 256 * V * 2 + 256 * D * 2 + R * V * 2}
    got = plans[0].row("loss chunk working set")
    assert got.predicted_bytes == max(stages.values()) and "'head backward (256 tokens)'" in got.counts
    per_call = planner.lm_head_bytes(info, "native", 256)
    assert plans[1].row("loss chunk working set").predicted_bytes == max(sum(per_call.values()), 2 * 256 * V * 2 + 0,
                                                                         256 * V * 2 + 256 * V * 4)


def test_student_specs(manifest_7b_path):
    teacher = planner.open_teacher(manifest_7b_path).config
    parse = planner.parse_student_spec
    assert parse("layers=4") == {"layers": [4]} == parse([4])
    assert parse("layers=0,9,18,27") == {"layers": [0, 9, 18, 27]}
    assert planner.student_config(teacher, parse("layers=0,9,18,27")).n_layers == 4
    # layers= always names teacher blocks (distill --student-layers 5: one block, teacher block 5)
    assert planner.student_config(teacher, parse("layers=5")).n_layers == 1
    four = planner.student_config(teacher, parse("n_layers=4"))
    assert (four.n_layers, four.head_dim, four.n_kv_heads) == (4, teacher.head_dim, teacher.n_kv_heads)
    cfg = planner.student_config(teacher, parse("d_model=1024,n_layers=6,d_ff=2816,n_heads=16,n_kv_heads=4,tied=1"))
    assert (cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.head_dim, cfg.tied_output) == (1024, 6, 2816, 64, True)
    assert cfg.vocab_size == teacher.vocab_size and cfg.architecture == "qwen2"
    for target in (0.1e9, 0.5e9, 1.5e9):
        cfg = planner.student_config(teacher, parse(f"params={target}"))
        assert abs(planner.count_params(cfg) / target - 1) < 0.1
        assert cfg.n_heads % cfg.n_kv_heads == 0 and cfg.d_model == cfg.n_heads * cfg.head_dim
    small = planner.student_config(teacher, parse("d_model=64,n_layers=2,d_ff=96,n_heads=4,n_kv_heads=2"))
    assert planner.count_params(small) == Student(small, xp=np).n_params
    for bad in ("width=3", "layers=x", "d_model=64,,oops", "n_heads=6,n_kv_heads=4", "layers=28", "layers=1,n_layers=2", []):
        with pytest.raises(Q4KError):
            planner.student_config(teacher, parse(bad))


def test_plan_command_json(manifest_7b_path, capsys):
    assert cli.main(["plan", "--teacher", manifest_7b_path, "--batch", "8", "--seq", "512",
                     "--student-params", "0.5e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["teacher_resident_bytes"]) == {"native", "dequant-f32", "dequant-bf16"}
    assert out["teacher_resident_bytes"]["native"] == B7_BYTES
    assert out["teacher_forward_peak_bytes"] > B7_BYTES and out["distill_step_peak_bytes"] > out["teacher_forward_peak_bytes"]
    assert all({"name", "predicted_bytes"} <= set(r) for r in out["rows"])
    assert cli.main(["plan", "--teacher", manifest_7b_path, "--student", "layers=4"]) == 0
    assert "teacher resident (native)" in capsys.readouterr().out
    assert cli.main(["plan", "--teacher", manifest_7b_path, "--student", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_plan_of_the_real_gemma_file(gemma_path):
    plan = planner.make_plan(gemma_path, 2, 128, "layers=0,5,11,17")
    info = planner.open_teacher(gemma_path)
    assert plan.teacher_resident_bytes["native"] == sum(planner.kept_bytes(t, "native") for t in info.tensors.values())
    assert plan.student["config"]["tied_output"] and plan.student["config"]["vocab_size"] == 262144


def test_distill_student_layers_reach_the_planner_as_blocks(manifest_7b_path):
    """distill's student_layers (a list) and the 'layers=' spec name teacher blocks, never a count."""
    one = planner.make_plan(manifest_7b_path, 1, 64, [5])
    assert one.student["config"]["n_layers"] == 1 and one.student["spec"] == {"layers": [5]}
    assert planner.make_plan(manifest_7b_path, 1, 64, "layers=5").student == one.student
    assert planner.make_plan(manifest_7b_path, 1, 64, "n_layers=5").student["config"]["n_layers"] == 5
    default = planner.make_plan(manifest_7b_path, 1, 64)
    assert default.student["n_params"] == planner.make_plan(manifest_7b_path, 1, 64, [0, 9, 18, 27]).student["n_params"]


def test_a_gpu_plan_counts_the_cublas_workspace(monkeypatch):
    """kernels.blas keeps its own cuBLAS workspace from the first product on (measured on an H200: the
    decode-scratch row was 32 MiB short without it); a CPU plan has none."""
    from kernels.blas import WORKSPACE
    from q4kdistill.teacher import model as teacher_model

    monkeypatch.setattr(teacher_model, "HEAD_SPAN_TOKENS", 0)      # the GPU's other difference (its own test)

    manifest = "q4kdistill/data/deepseek-r1-distill-qwen-7b-q4_k_m.manifest.json"
    gpu, cpu = (planner.make_plan(manifest, 8, 512, "qwen2-0.5b", precision="bf16", fused_ops=True, gpu=g)
                for g in (True, False))
    assert gpu.blas_workspace == WORKSPACE == 32 << 20 and cpu.blas_workspace == 0
    for name in ("teacher decode scratch (native)", "teacher forward peak (native)", "distill: teacher trunk peak",
                 "distill step peak", "distill: optimizer step peak"):
        assert gpu.row(name).predicted_bytes - cpu.row(name).predicted_bytes == WORKSPACE, name
    assert gpu.row("teacher resident (native)").predicted_bytes == cpu.row("teacher resident (native)").predicted_bytes


def test_step_head_span_widens_where_the_step_peak_is_elsewhere(manifest_7b_path, monkeypatch):
    """memory.planner.step_head_span: blocks cut from the 7B have their step peak in the block backward,
    so the widest span (2048 tokens) leaves the planned peak where it is; the 0.5B-layout student's peak
    is its loss, so it keeps the default span. Both as bench step and distill plan them."""
    from q4kdistill.teacher.model import HEAD_SPAN_TOKENS, SPAN_ENV

    monkeypatch.delenv(SPAN_ENV, raising=False)
    kw = dict(chunk_tokens=256, precision="bf16", fused_ops=True, checkpoint=False)   # distill's defaults
    cut = planner.step_head_span(manifest_7b_path, 8, 512, [0, 27], sparse_embedding_grad=True, **kw)
    fresh = planner.step_head_span(manifest_7b_path, 8, 512, "qwen2-0.5b", **kw)
    assert (cut, fresh) == (2048, HEAD_SPAN_TOKENS)
    wide = planner.make_plan(manifest_7b_path, 8, 512, [0, 27], gpu=True, head_span_tokens=cut, sparse_embedding_grad=True, **kw)
    base = planner.make_plan(manifest_7b_path, 8, 512, [0, 27], gpu=True, sparse_embedding_grad=True, **kw)
    assert wide.head_span == (2048, 2) and base.head_span == (HEAD_SPAN_TOKENS, 2)
    assert wide.row("distill step peak").predicted_bytes == base.row("distill step peak").predicted_bytes
    assert planner.step_head_span(manifest_7b_path, 1, 256, [0, 27], sparse_embedding_grad=True, **kw) == HEAD_SPAN_TOKENS
