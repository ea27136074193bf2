"""Build a CPU emulation of CUDA C kernels (tests/*_emulate.cpp on tests/warp_emulate.h) as a shared
library; the test skips where g++ is missing."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest


def build_emulator(tmp_path_factory, harness: str, sources: dict, include_dirs=(), defines=None) -> ctypes.CDLL:
    """harness: a file name in tests/; sources: macro -> path of the .cu the harness #includes; defines: more
    macros (name -> value)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not installed")
    stem = Path(harness).stem
    out = tmp_path_factory.mktemp(stem) / f"{stem}.so"
    cmd = [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", *(f"-I{d}" for d in include_dirs),
           *(f'-D{macro}="{path}"' for macro, path in sources.items()),
           *(f"-D{k}={v}" for k, v in (defines or {}).items()), str(Path(__file__).with_name(harness)),
           "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return ctypes.CDLL(str(out))
