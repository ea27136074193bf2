"""ptxas's verdict on a linked-C kernel as numba-cuda builds it for a GPU, read without one.

On a GPU, a Numba kernel that calls a csrc/ device function is built in three steps: NVRTC compiles the C
(LTO-IR when nvJitLink is there), NVVM compiles the Numba kernel (LTO-IR too), and nvJitLink links the two
and runs ptxas on the result. This module runs the same three steps for a chosen compute capability and
returns what ptxas said about the kernel: its registers, spills, stack frame and any note that it
serialised a wgmma pipeline (C7509-C7519). Compiling the C file alone with nvcc, as tests/_helpers_nvcc.py
does, checks the C in whole-program mode; only this checks the link the GPU actually runs (compiled as the
separate ABI function a link without LTO makes of it, the wgmma attention forward spills and ptxas serialises
its pipeline; with LTO, as on the H200 image, neither).

    available()                        NVRTC, NVVM and nvJitLink all load here
    verdict(path, name, c_sig, cc)     {"registers", "spill_bytes", "stack_bytes", "notes", "log"}

Needs the nvidia-cuda-nvrtc and nvidia-nvjitlink wheels (the test extra has them) or a CUDA toolkit; no
GPU, no driver.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

# The link runs in a child process: the Numba simulator, which the CPU suite switches on, has no NVVM, so
# this file doubles as a script that imports numba.cuda with the simulator off and nothing of the package.


def _child(payload: dict) -> dict:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(payload), capture_output=True,
                       text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"link_check child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether NVRTC, NVVM and nvJitLink load here (the verdict needs all three, no GPU)."""
    try:
        return bool(_child({"what": "available"})["ok"])
    except Exception:
        return False


def verdict(path: str, name: str, c_sig, cc=(9, 0, "a"), cubin: str | None = None, max_registers=None) -> dict:
    """Link a Numba kernel that passes its arguments to the C function `name` (file `path`, signature
    `c_sig`, e.g. ``types.int32(types.voidptr, types.int32)``) as numba-cuda does with LTO, for compute
    capability `cc`, and return ptxas's report on the kernel; `cubin`: also write the linked cubin there
    (for nvdisasm / cuobjdump -sass); `max_registers`: the cap a kernel is built with (cuda.jit(max_registers=))."""
    return _child({"what": "verdict", "path": str(path), "name": name, "cc": list(cc), "cubin": cubin,
                   "args": [_type_name(t) for t in c_sig.args], "ret": _type_name(c_sig.return_type),
                   "max_registers": max_registers})


def _type_name(t) -> str:
    """The numba.types attribute that names t (void* prints as "void*", is types.voidptr)."""
    return "voidptr" if str(t) == "void*" else str(t)


def _available_here() -> bool:
    """The whole chain once, on a one-line C function: any library missing makes it raise."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".cu", delete=False) as f:
        f.write('extern "C" __device__ int link_probe(int* p) { *p = 1; return 0; }\n')
    try:
        return _verdict_here(f.name, "link_probe", ["voidptr"], "int32", (9, 0, "a"))["registers"] is not None
    except Exception:
        return False
    finally:
        os.unlink(f.name)


def _verdict_here(path: str, name: str, args: list, ret: str, cc: tuple, cubin: str | None = None,
                  max_registers=None) -> dict:
    from numba import cuda, types
    from numba.cuda.cudadrv import nvrtc

    try:
        from cuda.core import Linker, LinkerOptions, ObjectCode
    except ImportError:   # cuda-core < 0.4
        from cuda.core.experimental import Linker, LinkerOptions, ObjectCode
    argtypes = [getattr(types, a) for a in args]
    with open(path) as f:
        obj, _ = nvrtc.compile(f.read(), name, cc, ltoir=True)
    fn = cuda.declare_device(name, getattr(types, ret)(*argtypes), abi="c")
    names = ", ".join(f"a{i}" for i in range(len(argtypes)))
    scope = {"fn": fn}
    exec(f"def kernel({names}):\n    fn({names})\n", scope)
    ir, _ = cuda.compile(scope["kernel"], types.void(*argtypes), device=False, cc=cc[:2], output="ltoir",
                         abi="numba")
    arch = f"sm_{cc[0]}{cc[1]}{cc[2] if len(cc) > 2 else ''}"
    linker = Linker(ObjectCode.from_ltoir(ir, name="kernel"), obj,
                    options=LinkerOptions(arch=arch, link_time_optimization=True, verbose=True, ptxas_options=["-v"],
                                          max_register_count=max_registers))
    code = linker.link("cubin")
    log = linker.get_info_log()
    if cubin:
        with open(cubin, "wb") as f:
            f.write(bytes(code.code))
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs[-1]) if regs else None, "spill_bytes": sum(int(s) for s in spills),
            "stack_bytes": sum(int(s) for s in stack), "notes": re.findall(r"\(C75\d\d\)[^\n]*", log), "log": log}


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    if job["what"] == "available":
        out = {"ok": _available_here()}
    else:
        out = _verdict_here(job["path"], job["name"], job["args"], job["ret"], tuple(job["cc"]), job.get("cubin"),
                            job.get("max_registers"))
    print(json.dumps(out))
