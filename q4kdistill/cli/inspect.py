"""`q4kdistill inspect FILE|MANIFEST [--json]`: what a teacher file holds and what it costs on a GPU.

Reads the header only, so a truncated file works (it is reported as such, not refused).
"""
from __future__ import annotations

NAME = "inspect"
HELP = "show a GGUF/APR file's or manifest's architecture, config, tensor types and predicted GPU bytes"


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE|MANIFEST", help="GGUF or APR file (a truncated one is fine), or manifest JSON")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of tables")


def run(args) -> int:
    import json

    from ..errors import FileFormatError
    from ..formats.model_file import ModelFile

    mf = ModelFile.open(args.file, header_only=True)
    truncated = None
    if mf.kind != "manifest":
        try:
            mf.check_complete()
        except FileFormatError as exc:
            truncated = exc.problem
    report = summary(mf, truncated)
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


def summary(mf, truncated=None) -> dict:
    from ..memory.planner import teacher_resident

    hist = mf.dtype_histogram()
    resident = teacher_resident(mf.tensors.values())
    return {
        "file": mf.path, "kind": mf.kind, "architecture": mf.architecture, "config": mf.config.to_dict(),
        "tensor_count": len(mf.tensors),
        "bytes_by_type": {t: h["bytes"] for t, h in hist.items()},
        "count_by_type": {t: h["count"] for t, h in hist.items()},
        "total_tensor_bytes": mf.total_tensor_bytes,
        "predicted_gpu_bytes": {"native": resident["native"], "f32": resident["dequant-f32"],
                                "bf16": resident["dequant-bf16"]},
        "truncated": truncated,
    }


def table(r: dict) -> str:
    c = r["config"]
    total = r["total_tensor_bytes"]
    lines = [
        f"file          {r['file']} ({r['kind']})" + (f"\n              header only: {r['truncated']}" if r["truncated"] else ""),
        f"architecture  {r['architecture']}: {c['n_layers']} layers, d_model {c['d_model']}, "
        f"{c['n_heads']}/{c['n_kv_heads']} heads of {c['head_dim']}, d_ff {c['d_ff']}, vocab {c['vocab_size']}",
        f"              rope {c['rope_style']} base {c['rope_base']:g}, {c['act']}, norm eps {c['norm_eps']:.3g}, "
        f"tied output {'yes' if c['tied_output'] else 'no'}, qkv bias {'yes' if c['qkv_bias'] else 'no'}"
        + (f", sliding window {c['sliding_window']} on {len(c['swa_layers'])} layers" if c["sliding_window"] else ""),
        f"tensors       {r['tensor_count']}, {total:,} bytes ({_gib(total)})",
        "",
        f"{'type':<8}{'count':>7}{'bytes':>17}{'share':>8}",
    ]
    for t, b in r["bytes_by_type"].items():
        lines.append(f"{t:<8}{r['count_by_type'][t]:>7}{b:>17,}{100 * b / max(total, 1):>7.1f}%")
    lines += ["", "predicted GPU bytes of the resident teacher weights (norms and biases kept as F32)"]
    labels = {"native": "kept as stored (native)", "f32": "dequantized to F32", "bf16": "dequantized to BF16"}
    for key, label in labels.items():
        b = r["predicted_gpu_bytes"][key]
        lines.append(f"  {label:<25}{b:>17,}  {_gib(b)}")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
