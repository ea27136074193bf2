"""`q4kdistill autotune`: benchmark the kernel variants on this GPU and save the dispatch table.

The table (JSON) maps (quant type, M bucket) to the fastest variant for this GPU model; 
``kernels.matmul`` reads it. Default location ~/.cache/q4kdistill/kernels_tuning.json
(``$Q4KDISTILL_TUNING`` overrides; kernels/tuning/default.json is the one shipped).
"""
from __future__ import annotations

NAME = "autotune"
HELP = "time the kernel variants on this GPU and write the table kernels.matmul dispatches with"


def add_arguments(p) -> None:
    p.add_argument("--out", metavar="PATH", help="table to write (default: the user table, see kernels/dispatch.py)")
    p.add_argument("--qtypes", nargs="+", metavar="TYPE", help="quant types (default: every type the kernels decode)")
    p.add_argument("--shapes", nargs="+", metavar="KxN", help="shapes K x N (default: the 7B teacher's five)")
    p.add_argument("--m", nargs="+", type=int, metavar="M", help="activation rows (default: 1 8 16 64 512 4096)")
    p.add_argument("--max-rel-err", type=float, default=2e-3,
                   help="only variants whose error bound is at most this (1e-5: FP32-exact variants only)")


def run(args) -> int:
    import sys

    from .. import backend
    from ..errors import Q4KError
    from .bench import parse_shapes

    if not backend.on_gpu():
        raise Q4KError("autotune needs a CUDA GPU (CuPy)")
    import kernels
    from kernels import autotune, bench, dispatch, registry

    rows = bench.run(shapes=parse_shapes(args.shapes), ms=args.m,
                     qtypes=args.qtypes or list(registry.ALL_QTYPES),
                     log=lambda s: print(s, file=sys.stderr))
    entries = autotune.entries_from_rows(rows, args.max_rel_err)
    path = args.out or str(dispatch.USER_TABLE)
    meta = {"date": rows[0]["date"], "copy_GBps": round(rows[0]["copy_GBps"]), "max_rel_err": args.max_rel_err}
    autotune.write_table(path, rows[0]["gpu"], entries, meta)
    kernels.reload_table()
    for q, es in entries.items():
        print(q, "  ".join(f"M<={e['m_max'] or 'any'}" + (f" N>={e['n_min']}" if e.get("n_min") else "") +
                           f": {e['variant']}" for e in es))
    print(f"wrote {path}")
    return 0
