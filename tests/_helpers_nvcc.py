"""Compile CUDA C for the H100 / H200 (sm_90a) with nvcc and read ptxas's verdict on each kernel: what the
CPU suite can check of a GPU kernel's register budget and wgmma pipeline without a GPU."""
import re
import shutil
import subprocess

import pytest


def ptxas_sm90a(tmp_path, text: str, names) -> dict:
    """Compile `text` (kernels `names`) for sm_90a; assert it compiles without warnings, that ptxas
    serialised no wgmma pipeline (its notes C7510-C7519), and that every kernel keeps within 255 registers
    without spilling. Returns {kernel: registers}; skips where nvcc is missing."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc")
    src = tmp_path / "k.cu"
    src.write_text(text)
    r = subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c", "-o",
                        str(tmp_path / "k.o"), str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
    assert not re.search(r"C751\d|serializ", r.stderr), "ptxas serialised the wgmma pipeline:\n" + r.stderr[-3000:]
    stats = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                       r.stderr, re.S)
    assert sorted(s[0] for s in stats) == sorted(names)
    for fn, spills, regs in stats:
        assert int(spills) == 0 and int(regs) <= 255, (fn, spills, regs)
    return {fn: int(regs) for fn, _, regs in stats}
