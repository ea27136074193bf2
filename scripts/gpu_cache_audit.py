"""cache-teacher and audit at the 7B manifest's shapes on the GPU: time, tokens/s and bytes.

The teacher is the DeepSeek-R1-Distill-Qwen-7B Q4_K_M manifest (every tensor at its real shape
and type, random blocks: 4.68 GB kept quantized, V = 152,064), the data random token ids.
    cache   write_cache over TOKENS tokens for each --ks: seconds, tokens/s, bytes/token, and
            the teacher forward alone for comparison (the top-k + fp16 + zlib overhead)
    audit   the native (Q4_K kernels) teacher against the same weights decoded to float16
            (cuBLAS; the dequant-f16 backend): seconds, tokens/s, and the KL / agreement, which
            here measure only our kernels' arithmetic against cuBLAS's, not quantization
Random weights give flat distributions: the bytes/token of real models' caches are the same
before zlib (the ids fill ceil(log2 V) bits, the log-probs 2 bytes) and smaller after it.

    python scripts/gpu_cache_audit.py --json $OUT/cache_audit.json     # H200, ~5 min
    python scripts/gpu_cache_audit.py --tiny                           # a tiny manifest on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # q4kdistill/ from this checkout


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768, help="tokens cached (train split; 1/8 of it more held out)")
    p.add_argument("--audit-tokens", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ks", default="16,64,256")
    p.add_argument("--out", default=None, help="cache folder root (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="reproduce-memory's tiny manifest, small sizes (CPU)")
    return p.parse_args(argv)


def random_dataset(n_tokens, seq, vocab, seed):
    import numpy as np
    from q4kdistill.train.corpus import TokenDataset

    rng = np.random.default_rng(seed)
    return TokenDataset.from_sequences(rng.integers(0, vocab, (max(1, n_tokens // seq), seq), dtype=np.uint32))


def main(argv=None) -> int:
    from q4kdistill import backend
    from q4kdistill.formats.model_file import ModelFile
    from q4kdistill.teacher.audit import audit_models
    from q4kdistill.teacher.model import Teacher
    from q4kdistill.train.teacher_cache import write_cache

    args = parse_args(argv)
    if args.tiny:
        from q4kdistill.memory.reproduce import tiny_manifest

        source, args.tokens, args.audit_tokens, args.seq, args.batch = tiny_manifest(), 256, 64, 32, 2
        args.ks = "16,64"
    else:
        from q4kdistill.data import MANIFEST_7B

        source = MANIFEST_7B
    model = ModelFile.open(source)
    teacher = Teacher.load(model, log=lambda m: print(m, file=sys.stderr))
    V = teacher.vocab_size
    train = random_dataset(args.tokens, args.seq, V, 1)
    held = random_dataset(max(args.seq, args.tokens // 8), args.seq, V, 2)
    result = {"device": backend.gpu_name() if backend.on_gpu() else "CPU",
              "teacher": "7B manifest" if not args.tiny else "tiny manifest", "vocab": V, "seq": args.seq,
              "batch": args.batch, "cache": [], "audit": None}

    t0 = time.perf_counter()                                          # the teacher forward alone
    for b in train.in_order_batches(args.batch):
        for _, _, t in teacher.iter_logits(b.ids):
            pass
    backend.synchronize()
    forward_s = time.perf_counter() - t0
    result["forward_only"] = {"tokens": train.n_tokens, "seconds": forward_s, "tokens_per_s": train.n_tokens / forward_s}

    root = args.out or tempfile.mkdtemp(prefix="q4k-cache-")
    for k in (int(x) for x in args.ks.split(",")):
        s = write_cache(teacher, {"train": train, "heldout": held}, os.path.join(root, f"k{k}"), k, batch=args.batch,
                        identity={"teacher": result["teacher"]}, progress=False, log=None)
        tokens = train.n_tokens + held.n_tokens
        result["cache"].append({"k": k, "tokens": tokens, "seconds": s["seconds"], "tokens_per_s": tokens / s["seconds"],
                                "bytes_per_token": s["bytes_per_token"], "shard_bytes": s["shard_bytes"]})

    reference = teacher.with_backend("dequant-f16") if not args.tiny else teacher.with_backend("dequant-f32")
    audit_set = random_dataset(args.audit_tokens, args.seq, V, 3)
    r = audit_models(teacher, reference, audit_set, batch=args.batch, progress=False)
    result["audit"] = {k: r[k] for k in ("tokens", "seconds", "tokens_per_s", "kl_mean", "kl_median", "kl_p99",
                                         "kl_max", "top1_agreement", "ppl_teacher", "ppl_reference")}
    result["audit"]["reference"] = reference.backend

    print(f"{result['teacher']} on {result['device']}: V = {V:,}, {args.batch} x {args.seq} tokens per pass")
    print(f"teacher forward only: {result['forward_only']['tokens_per_s']:,.0f} tokens/s")
    print("| k | tokens | seconds | tokens/s | bytes/token |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for c in result["cache"]:
        print(f"| {c['k']} | {c['tokens']:,} | {c['seconds']:.1f} | {c['tokens_per_s']:,.0f} | {c['bytes_per_token']:.1f} |")
    a = result["audit"]
    print(f"audit native vs {a['reference']}: {a['tokens']:,} tokens in {a['seconds']:.1f} s ({a['tokens_per_s']:,.0f} tokens/s); "
          f"KL mean {a['kl_mean']:.2e} p99 {a['kl_p99']:.2e} max {a['kl_max']:.2e}, top-1 agreement {100 * a['top1_agreement']:.2f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
