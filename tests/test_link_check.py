"""The wgmma kernels (and the mma.sync attention forward) as the GPU links them (NVRTC -> LTO-IR, Numba kernel, nvJitLink), read on the CPU:
no serialised wgmma pipeline, no spills, <= 255 registers. tests/_helpers_nvcc.py checks the C alone in
whole-program mode; this checks the link the GPU runs (kernels/link_check.py). Skips where NVRTC, NVVM or
nvJitLink do not load (the test extra installs the nvidia-cuda-nvrtc and nvidia-nvjitlink wheels)."""
import pytest
from numba import types

from kernels import link_check, linked
from kernels import flash_attention_mma as fam

pytestmark = pytest.mark.skipif(not link_check.available(), reason="needs NVRTC, NVVM and nvJitLink")

P, I = types.voidptr, types.int32


def _attention(kind, D, bf16, schedule=13, tiles=None):
    if kind == "fwd":
        name, extra = fam.wgmma_forward_source(D, bf16, 0, tiles, schedule=schedule)
        sig = fam._FORWARD_SIG
    else:
        name, extra = fam.wgmma_backward_source(D, bf16, schedule)
        sig = fam._BACKWARD_SIG
    return linked.source_with(extra, "flash_attention_wgmma.cu"), name, sig


def _gemm(qtype, s8, mt=1):
    if s8:
        file, name, extra = linked.gemm_wgmma_s8_source(qtype, False)
        sig = types.int32(P, I, I, I, I, P, P, I, P, I)
    else:
        bn = linked.WGMMA_BN[qtype] if mt == 1 else 128
        file, name, extra = linked.gemm_wgmma_source(qtype, bn, 2, 4, 1, False, mt)
        sig = types.int32(P, I, I, I, I, P, P, I)
    return linked.source_with(extra, file), name, sig


def _gemm_rs(bx, xs, ws, tma=False, mt=1, qtype="Q4_K"):
    file, name, extra = linked.gemm_wgmma_rs_source(bx, xs, ws, False, tma, mt, qtype)
    return linked.source_with(extra, file), name, linked.GR_SIG


def _mma_forward(D, bf16, schedule):
    name, extra = fam.forward_source(D, bf16, 0, None, schedule)
    return fam._source_with(extra), name, fam._FORWARD_SIG


def _mma_backward(D, bf16, schedule):
    name, extra = fam.backward_source(D, bf16, schedule)
    return fam._source_with(extra), name, fam._BACKWARD_SIG


CASES = {
    "attention_mma_fwd_d64_bf16_v13": lambda: _mma_forward(64, True, 13),
    "attention_mma_fwd_d128_fp16_v13": lambda: _mma_forward(128, False, 13),
    "attention_mma_bwd_d64_bf16_v13": lambda: _mma_backward(64, True, 13),
    "attention_fwd_d128_bf16_v13": lambda: _attention("fwd", 128, True, 13),
    "attention_fwd_d64_fp16_v13": lambda: _attention("fwd", 64, False, 13),
    "attention_bwd_d128_bf16_v13": lambda: _attention("bwd", 128, True, 13),
    "attention_fwd_d128_bf16_n64_g1_v13": lambda: _attention("fwd", 128, True, 13, (64, 1, 3)),
    "attention_fwd_d128_bf16_ws": lambda: _attention("fwd", 128, True, 15),
    "attention_fwd_d64_fp16_ws": lambda: _attention("fwd", 64, False, 15),
    "attention_bwd_d64_bf16_v13": lambda: _attention("bwd", 64, True, 13),
    "attention_bwd_d64_fp16_v16": lambda: _attention("bwd", 64, False, 16),
    "attention_bwd_d64_bf16_v17": lambda: _attention("bwd", 64, True, 17),
    "attention_bwd_d64_bf16_v18": lambda: _attention("bwd", 64, True, 18),
    "attention_bwd_d64_fp16_v20": lambda: _attention("bwd", 64, False, 20),
    "attention_bwd_d64_bf16_v20": lambda: _attention("bwd", 64, True, 20),
    "attention_bwd_d128_fp16_v18": lambda: _attention("bwd", 128, False, 18),
    "gemm_wgmma_q4k": lambda: _gemm("Q4_K", False),
    "gemm_wgmma_q6k": lambda: _gemm("Q6_K", False),
    "gemm_wgmma_q4k_m2": lambda: _gemm("Q4_K", False, 2),
    "gemm_wgmma_s8_q4k": lambda: _gemm("Q4_K", True),
    "gemm_wgmma_rs_x256_ws": lambda: _gemm_rs(256, 4, 2),
    "gemm_wgmma_rs_m2_tma_ws": lambda: _gemm_rs(128, 5, 2, True, 2),
    "gemm_wgmma_rs_q6k_m2_tma_ws": lambda: _gemm_rs(128, 5, 2, True, 2, "Q6_K"),
}


CAPS = {c: fam.WS_REGISTERS if c.startswith("attention") else linked.GR_REGISTERS
        for c in CASES if c.endswith("_ws")}   # as flash_attention_mma and linked build them (setmaxnreg then gives
# the consumer warpgroups 232)


# kernels whose spills ptxas keeps out of the main loop: values of the prologue used again after it (schedule 20's
# backward at 255 registers, nvJitLink 13.5: 8 bytes, two stores before the loop, loads after it); checked in the SASS
COLD_SPILLS = {"attention_bwd_d64_fp16_v20": 16, "attention_bwd_d64_bf16_v20": 16}   # case -> most bytes allowed


def _local_memory_in_main_loop(lines) -> list:
    """The LDL / STL instructions between the target and the source of the backward branch that spans the most HGMMA
    instructions (the kernel's main loop), from nvdisasm lines."""
    import re

    ins, where, pending = [], {}, []          # instructions; label or address -> index in ins
    for x in lines:
        label = re.match(r"\s*(\.L_x_\d+):", x)
        addr = re.search(r"/\*([0-9a-f]{4,})\*/", x)
        if label:
            pending.append(label.group(1))
        elif addr and ";" in x:
            for name in pending + [hex(int(addr.group(1), 16))]:
                where[name] = len(ins)
            pending = []
            ins.append(x.strip())
    best, span = None, 0
    for i, x in enumerate(ins):
        target = re.search(r"BRA[^;]*?(0x[0-9a-f]+|\.L_x_\d+)", x)
        j = where.get(hex(int(target.group(1), 16)) if target and target.group(1).startswith("0x")
                      else target.group(1)) if target else None
        if j is not None and j < i and sum("HGMMA" in y for y in ins[j:i]) > span:
            best, span = (j, i), sum("HGMMA" in y for y in ins[j:i])
    assert best, "no loop over HGMMA instructions found"
    return [y for y in ins[best[0]:best[1] + 1] if "LDL" in y or "STL" in y]


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_and_gemm_kernels_linked_as_on_the_gpu(case, tmp_path):
    path, name, sig = CASES[case]()
    cold = COLD_SPILLS.get(case)
    cubin = str(tmp_path / "k.cubin") if cold else None
    v = link_check.verdict(path, name, sig, max_registers=CAPS.get(case), cubin=cubin)
    assert not v["notes"], f"{case}: ptxas serialised the wgmma pipeline: {v['notes']}"
    assert v["registers"] is not None and v["registers"] <= 255, (case, v["registers"])
    if cold is None:
        assert v["spill_bytes"] == 0 and v["stack_bytes"] == 0, (case, v["spill_bytes"], v["stack_bytes"],
                                                                 v["log"][-2000:])
        return
    assert v["spill_bytes"] <= cold and v["stack_bytes"] <= cold, (case, v["spill_bytes"], v["stack_bytes"])
    import shutil
    import subprocess
    tool = shutil.which("nvdisasm") or _wheel_tool("nvdisasm")
    if tool is None:
        pytest.skip("needs nvdisasm to see where the spills are")
    lines = subprocess.run([tool, cubin], capture_output=True, text=True, check=True).stdout.splitlines()
    assert _local_memory_in_main_loop(lines) == [], f"{case}: local memory inside the main loop"


def test_mma_backward_under_its_register_cap():
    """The D = 64 mma.sync backward runs capped (REGISTER_CAP: three blocks an SM measured faster than two with
    spills) and keeps the cap, spilling at most what it did when schedule 12 was deleted (36 bytes with nvJitLink 13;
    12's form spilled 88)."""
    cap = fam.REGISTER_CAP[("bwd", 64)]
    v = link_check.verdict(*_mma_backward(64, True, 13), max_registers=cap)
    assert v["registers"] is not None and v["registers"] <= cap and not v["notes"], v
    assert v["spill_bytes"] <= 36, v


def test_the_check_sees_a_serialised_pipeline(tmp_path):
    """The check can fail: a wgmma group whose accumulator an ordinary instruction writes while it is in flight
    is serialised by ptxas (C7510), and the verdict reports it."""
    src = tmp_path / "bad.cu"
    src.write_text(open(linked.source_with("", "flash_attention_wgmma.cu")).read() + r'''
extern "C" __device__ int bad_wgmma(float* out, int n) {
    __shared__ __align__(1024) unsigned short a[64 * 64], b[64 * 64];
    float d[32];
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    a[threadIdx.x] = 0; b[threadIdx.x] = 0;
    __syncthreads();
    gw_mma_fence();
    gw_mma<64>(d, gw_make_desc(gw_smem(a), 16, 1024, 1), gw_make_desc(gw_smem(b), 16, 1024, 1), 0);
    gw_mma_commit();
    d[n & 31] += 1.f;                      // written while the wgmma that writes it is in flight
    gw_mma_wait<0>();
    for (int i = 0; i < 32; ++i) out[32 * threadIdx.x + i] = d[i];
    return 0;
}
''')
    v = link_check.verdict(str(src), "bad_wgmma", types.int32(P, I))
    assert v["notes"], v["log"][-2000:]


def test_without_lto_the_same_function_spills_and_serialises():
    """Why kernels/linked.linked_jit asks for LTO: compiled as the separate ABI function a plain link makes of
    it (nvcc -rdc), the forward spills and ptxas serialises its pipeline."""
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc")
    path, name, _ = _attention("fwd", 128, True)
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-rdc=true", "-c", "-Xptxas", "-v",
                            "-o", f"{d}/k.o", path], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "C7509" in r.stderr and "spill" in r.stderr, r.stderr[-2000:]


def _wheel_tool(name):
    """A CUDA tool installed as an nvidia-* wheel (site-packages/nvidia/cu13/bin/name), or None."""
    import glob
    import site
    import sys

    for root in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        hits = glob.glob(f"{root}/nvidia/cu*/bin/{name}")
        if hits:
            return hits[0]
    return None


def _sass(tmp_path, kind, D, schedule, **kw) -> list:
    """The linked SASS lines of the wgmma attention kernel (kind "fwd" / "bwd", bf16) in `schedule` (nvdisasm;
    the test skips without it)."""
    import shutil
    import subprocess

    tool = shutil.which("nvdisasm") or _wheel_tool("nvdisasm")
    if tool is None:
        pytest.skip("needs nvdisasm (CUDA toolkit or the nvidia-cuda-nvdisasm wheel)")
    cubin = tmp_path / f"{kind}{D}_{schedule}.cubin"
    link_check.verdict(*_attention(kind, D, True, schedule), cubin=str(cubin), **kw)
    return subprocess.run([tool, str(cubin)], capture_output=True, text=True, check=True).stdout.splitlines()


def _ex2_between_waits(lines) -> float:
    """The share of the MUFU.EX2 that lie between the first wait for all but one wgmma group (DEPBAR.LE gsb0, 0x1)
    and the next wait for all (0x0)."""
    w1 = next(i for i, x in enumerate(lines) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in x)
    w0 = next(i for i, x in enumerate(lines) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in x and i > w1)
    ex2 = [i for i, x in enumerate(lines) if "MUFU.EX2" in x]
    return sum(w1 < i < w0 for i in ex2) / len(ex2)


def test_schedule_13_keeps_the_exponentials_before_the_wait_for_p_v(tmp_path):
    """The thirteenth stop's forward (kernels/csrc/flash_attention_wgmma.cu, SCHED 13): in the linked SASS every
    MUFU.EX2 of the loop lies between the wait for S (WARPGROUP.DEPBAR.LE gsb0, 0x1) and the wait for P V, so the
    exponentials overlap P V on the tensor cores (without gw_schedule_fence, in the deleted schedules 12 and 14,
    ptxas moved them all after it: the test failed on both)."""
    share = _ex2_between_waits(_sass(tmp_path, "fwd", 128, 13))
    assert share > 0.9, share
    lines = _sass(tmp_path, "fwd", 128, 15, max_registers=fam.WS_REGISTERS)   # the warp-specialised forward (15)
    assert _ex2_between_waits(lines) == 1.0                                     # keeps 13's placement
    assert sum("SETMAXREG" in x for x in lines) == 2       # the producer gives registers up, the consumers take them
    assert sum("BAR.SYNC.DEFER_BLOCKING 0x0" in x for x in lines) == 1   # __syncthreads once, after the mbarriers' init
    for what in ("BAR.ARV", "ARRIVES.LDGSTSBAR", "SYNCS.PHASECHK"):   # ping-pong, cp.async's arrivals, the waits
        assert any(what in x for x in lines), what


def test_schedule_18_computes_p_while_dp_is_on_the_tensor_cores(tmp_path):
    """The wgmma backward in schedule 18 (kernels/csrc/flash_attention_wgmma.cu, PSPLIT): S and dP are two wgmma
    groups, and every MUFU.EX2 of the loop lies between the wait for S (WARPGROUP.DEPBAR.LE gsb0, 0x1) and the wait
    for dP (0x0), at D = 64 and 128; in 17 (one group for both) they all follow the one wait."""
    got = {(D, s): _ex2_between_waits(_sass(tmp_path, "bwd", D, s)) for D, s in ((64, 17), (64, 18), (128, 18))}
    assert got[(64, 18)] > 0.9 and got[(128, 18)] > 0.9 and got[(64, 17)] < 0.1, got


def test_warp_specialised_register_split_fits_its_launch():
    """faw_forward_ws's setmaxnreg split (producer / consumer registers) must fit the registers its launch holds
    (WS_REGISTERS x WS_THREADS): setmaxnreg.inc waits for the CTA's pool, and the sixteenth stop's 48 / 232 (1,024 too
    many) hung on an H200. The C asserts it at compile time against FAW_WS_REGS, which must be the launch's cap."""
    import re

    src = (linked.CSRC / "flash_attention_wgmma.cu").read_text()
    cap = int(re.search(r"#define FAW_WS_REGS (\d+)", src).group(1))
    prod, cons = map(int, re.search(r"FAW_WS_PRODUCER_REGS = (\d+), FAW_WS_CONSUMER_REGS = (\d+)", src).groups())
    assert cap == fam.WS_REGISTERS and fam.WS_THREADS == 384
    assert 128 * prod + 256 * cons <= 384 * cap
