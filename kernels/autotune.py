"""Autotune: benchmark the variants on this GPU and write the dispatch table (see dispatch.py).

For each quant type and M bucket (M <= 1, 8, 16, 64, 512, any), the variant with the smallest
sum over shapes of time / best time at that shape wins. The table keeps other GPUs' entries.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .bench import BASELINE

BUCKETS = (1, 8, 16, 64, 512, None)


def _bucket(M: int):
    return next(b for b in BUCKETS if b is None or M <= b)


def entries_from_rows(rows, max_rel_err=2e-3) -> dict:
    """{qtype: [{"m_max": b, "variant": name, "score": s}, ...]} from bench rows."""
    from .registry import get

    best = {}
    rows = [r for r in rows if "[" not in r["variant"]]     # "[x16]" rows: fp16 activations, not a dispatch choice
    rows = [r for r in rows if not r.get("wrong")]          # outputs off the cuBLAS product (bench.run checks)
    for r in rows:
        if r["variant"] == BASELINE:
            continue
        key = (r["qtype"], r["K"], r["N"], r["M"])
        best[key] = min(best.get(key, float("inf")), r["time_us"])
    score = defaultdict(lambda: defaultdict(float))          # (qtype, bucket) -> variant -> score
    count = defaultdict(lambda: defaultdict(int))
    for r in rows:
        if r["variant"] == BASELINE or get(r["variant"]).rel_err > max_rel_err:
            continue
        qb = (r["qtype"], _bucket(r["M"]))
        score[qb][r["variant"]] += r["time_us"] / best[(r["qtype"], r["K"], r["N"], r["M"])]
        count[qb][r["variant"]] += 1
    table = defaultdict(list)
    for (q, b), s in sorted(score.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0)):
        full = max(count[(q, b)].values())                    # only variants measured at every shape
        name = min((v for v in s if count[(q, b)][v] == full), key=lambda v: s[v])
        table[q].append({"m_max": b, "variant": name, "score": round(s[name] / full, 3)})
    return dict(table)


def write_table(path, gpu: str, entries: dict, meta: dict) -> dict:
    p = Path(path)
    table = json.loads(p.read_text()) if p.exists() else {}
    table.setdefault("format", 1)
    table.setdefault("gpus", {})[gpu] = {**entries, "_meta": meta}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(table, indent=1) + "\n")
    return table


def pin(source, path, gpu: str, variant: str, m_from: int, qtypes=None) -> dict:
    """Write to `path` the table at `source` (dispatch.table_path() form; missing: empty) with `variant`
    chosen for every M >= m_from of `qtypes` (default: the types it decodes) on `gpu`; the entries
    below m_from stay. For A/B runs of a variant the table does not pick (point $Q4KDISTILL_TUNING at
    `path`, then dispatch.reload_table())."""
    from q4kdistill.errors import Q4KError

    from .registry import get

    v = get(variant)
    src = Path(source)
    table = json.loads(src.read_text()) if src.exists() else {}
    table.setdefault("format", 1)
    per_gpu = table.setdefault("gpus", {}).setdefault(gpu, {})
    for q in qtypes or v.qtypes:
        if q not in v.qtypes:
            raise Q4KError(f"{variant} does not decode {q}")
        keep = [e for e in per_gpu.get(q, []) if e.get("m_max") is not None and e["m_max"] < m_from]
        per_gpu[q] = keep + [{"m_max": None, "variant": variant, "pinned": True}]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(table, indent=1) + "\n")
    return table
