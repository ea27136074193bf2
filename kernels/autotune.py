"""Autotune: benchmark the variants on this GPU and write the dispatch table (see dispatch.py).

For each quant type and M bucket (M <= 1, 8, 16, 64, 512, any), the variant with the smallest
sum over shapes of time / best time at that shape wins. Where one variant wins the wide outputs and
another the rest, by more than SPLIT_GAIN a shape, the bucket gets two entries: {"n_min": N, ...} for
outputs of N or more columns, then the rest's (dispatch.py tries them in order). The table keeps other
GPUs' entries.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from .bench import BASELINE

BUCKETS = (1, 8, 16, 64, 512, None)
SPLIT_GAIN = 0.03      # a bucket splits by N only if that lowers its summed time / best by 3 % of a shape or more


def _bucket(M: int):
    return next(b for b in BUCKETS if b is None or M <= b)


def entries_from_rows(rows, max_rel_err=2e-3) -> dict:
    """{qtype: [{"m_max": b, "variant": name, "score": s}, ...]} from bench rows; a bucket split by output width
    (_split_by_n) holds {"m_max": b, "n_min": n, ...} before its other entry."""
    from .registry import get

    best = {}
    rows = [r for r in rows if "[" not in r["variant"]]     # "[x16]" rows: fp16 activations, not a dispatch choice
    rows = [r for r in rows if not r.get("wrong")]          # outputs off the cuBLAS product (bench.run checks)
    for r in rows:
        if r["variant"] == BASELINE:
            continue
        key = (r["qtype"], r["K"], r["N"], r["M"])
        best[key] = min(best.get(key, float("inf")), r["time_us"])
    ratio = defaultdict(lambda: defaultdict(dict))          # (qtype, bucket) -> (K, N, M) -> {variant: time / best}
    for r in rows:
        if r["variant"] == BASELINE or get(r["variant"]).rel_err > max_rel_err:
            continue
        shape = (r["K"], r["N"], r["M"])
        ratio[(r["qtype"], _bucket(r["M"]))][shape][r["variant"]] = r["time_us"] / best[(r["qtype"],) + shape]
    table = defaultdict(list)
    for (q, b), shapes in sorted(ratio.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0)):
        count = Counter(v for at in shapes.values() for v in at)
        full = max(count.values())                            # only variants measured at every shape
        measured = {v for v in count if count[v] == full}
        shapes = {k: {v: x for v, x in at.items() if v in measured} for k, at in shapes.items()}
        score = {v: sum(at.get(v, 0.0) for at in shapes.values()) for v in count if v in measured}   # row order
        name = min(score, key=score.get)
        split = _split_by_n(shapes, score[name]) if full == len(shapes) else None   # a split compares whole shapes
        if split:
            n_min, wide, wide_score, rest, rest_score = split
            table[q].append({"m_max": b, "n_min": n_min, "variant": wide, "score": round(wide_score, 3)})
            table[q].append({"m_max": b, "variant": rest, "score": round(rest_score, 3)})
        else:
            table[q].append({"m_max": b, "variant": name, "score": round(score[name] / full, 3)})
    return dict(table)


def _split_by_n(shapes: dict, whole: float):
    """shapes: (K, N, M) -> {variant: time / best} of one bucket (the variants measured at all of its shapes);
    whole: the one winner's summed ratio.
    -> (n_min, wide variant, its mean ratio, rest variant, its mean ratio) where outputs of N >= n_min are
    won by another variant than the rest and the two winners' sum beats `whole` by SPLIT_GAIN a shape; else None."""
    def winner(group):
        v = min(sorted(shapes[group[0]]), key=lambda v: sum(shapes[k][v] for k in group))
        return v, sum(shapes[k][v] for k in group)

    best = None
    for n_min in sorted({k[1] for k in shapes})[1:]:
        wide = [k for k in shapes if k[1] >= n_min]
        rest = [k for k in shapes if k[1] < n_min]
        (a, sa), (c, sc) = winner(wide), winner(rest)
        if a != c and sa + sc <= whole - SPLIT_GAIN * len(shapes) and \
                (best is None or sa + sc < best[0]):
            best = (sa + sc, n_min, a, sa / len(wide), c, sc / len(rest))
    return best[1:] if best else None


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
