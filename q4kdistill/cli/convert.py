"""`q4kdistill convert IN OUT`: a teacher file as APR v2 (OUT.apr) or as a manifest (OUT.json).

IN is a GGUF, APR or manifest. Writing an APR needs all of IN's tensor data (a manifest gives
random valid blocks); writing a manifest needs only IN's header (a truncated file works).
The APR is one aprender and realizar read (docs/apr.md): tensors of GGML types they lack (Q8_0,
Q5_0, Q4_0) are written as F32 -- exact, larger; the growth is said on stderr.
"""
from __future__ import annotations

NAME = "convert"
HELP = "convert a GGUF/APR/manifest into an APR v2 file (OUT.apr) or a manifest (OUT.json)"


def add_arguments(p) -> None:
    p.add_argument("input", metavar="IN", help="GGUF, APR or manifest JSON")
    p.add_argument("output", metavar="OUT", help="OUT.apr (APR v2, uncompressed) or OUT.json (manifest)")


def run(args) -> int:
    import os
    import sys

    from ..formats import apr

    from ..formats import manifest
    from ..errors import Q4KError
    from ..formats.model_file import ModelFile
    from ..interrupts import partial
    from ..train.outputs import output_file, writing

    kind = os.path.splitext(args.output)[1].lower()
    if kind not in (".apr", ".json"):
        raise Q4KError(f"{args.output}: the output must end in .apr or .json")
    output_file(args.output, "OUT")
    if os.path.exists(args.output) and os.path.exists(args.input) and os.path.samefile(args.input, args.output):
        raise Q4KError(f"{args.output}: refusing to overwrite the input")
    mf = ModelFile.open(args.input, header_only=(kind == ".json"))
    mf.config                                        # a file that is not a valid model is not converted
    tmp = args.output + ".part"
    try:
        with writing(args.output), partial(tmp):
            if kind == ".json":
                manifest.save(mf.to_manifest(), tmp)
            else:
                apr.write(mf, tmp, log=lambda line: print(f"convert: {line}", file=sys.stderr))
            os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes, {len(mf.tensors)} tensors)")
    return 0
