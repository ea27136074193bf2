"""`q4kdistill distill`: train a student on a frozen teacher's logits.

Every setting of ``DistillConfig`` is a flag (``student_layers`` -> ``--student-layers``), and
``--config FILE`` reads the same keys from JSON; flags given on the command line win.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

NAME = "distill"
HELP = "distil a frozen GGUF teacher into a small student (checkpoints, --resume, metrics.jsonl)"

HELPS = {
    "teacher": "teacher GGUF (or APR file, or manifest JSON)",
    "data": "text file or folder, .jsonl chat data (loss on the responses only), .bin (uint32) / .npy token shards, "
            "or 'demo' (Python's own sources and docs)",
    "chat_template": "Jinja2 chat template for .jsonl data, for a GGUF without tokenizer.chat_template "
                     "(q4kdistill/data/gemma_chat_template.jinja for a Gemma base model)",
    "teacher_cache": "train from a `q4kdistill cache-teacher` folder: data and teacher top-k from it, the teacher "
                     "file only initialises the student (sparse KD over the k ids + the rest)",
    "out": "run directory: checkpoint.npz and metrics.jsonl (default ./out)",
    "student_layers": "teacher blocks copied into the student, e.g. 0,3,6,9 (default: 4 spread out)",
    "student_init": "start the student from this GGUF instead (e.g. a smaller model of the family)",
    "student_shape": "a fresh random student of this shape with the teacher's vocabulary: a preset (qwen2-0.5b, "
                     "qwen2-1.5b, qwen2-3b, tiny) and/or widths, e.g. layers=24,d_model=896,heads=14,kv_heads=2,"
                     "head_dim=64,d_ff=4864 (layers = a count here)",
    "precision": "student matrix products: bf16 (fp32 master weights and AdamW moments) or fp32; "
                 "auto: bf16 on a GPU, fp32 on the CPU",
    "steps": "optimizer steps", "batch": "sequences per step (B)", "seq": "tokens per sequence (T)",
    "lr": "peak learning rate", "warmup": "linear warm-up steps", "min_lr_ratio": "cosine ends at lr x this",
    "weight_decay": "AdamW weight decay (matrices only)", "clip": "global gradient-norm clip (0: off)",
    "loss": "kl | rkl | jsd | skl (skew KL) | srkl (skew reverse KL) | tvd (total variation)", "temperature": "softmax temperature of the KD loss",
    "alpha": "weight of the hard-label CE: alpha CE + (1 - alpha) KD", "beta": "JSD mixture weight",
    "skew_alpha": "skew of skl / srkl: KL(p || a p + (1-a) q), in [0, 1) (DistiLLM uses 0.1)",
    "top_k": "keep only the teacher's k largest logits",
    "chunk_tokens": "tokens per [chunk, vocab] logits slab (lower it if memory runs out)",
    "checkpoint_activations": "recompute block activations in the backward (less memory)",
    "eval_every": "held-out evaluation every N steps", "eval_batches": "held-out batches per evaluation",
    "save_every": "checkpoint every N steps", "seed": "data order and initialisation seed",
    "truncate_vocab": "allow a teacher/student vocabulary mismatch by cutting both to the smaller",
    "heldout": "share of the data files held out for evaluation",
    "teacher_backend": "auto | native | dense | dequant-f32 | dequant-bf16 | dequant-f16",
    "gpus": "data-parallel ranks, one process per GPU of this host; --batch is the global batch and must split "
            "evenly (several hosts: start each rank with torchrun-style RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)",
    "cuda_graph": "replay each step as a CUDA graph where it applies (GPU, live teacher, one GPU, no loss mask): "
                  "the host issues one launch instead of ~2,000 (default: on)",
    "gpu_memory": "fit this GPU memory (24GB, 24GiB, or auto = the free memory now): batch, --chunk-tokens and "
                  "--checkpoint-activations not given are chosen by the planner (q4kdistill plan --fit)",
}


def add_config_arguments(p) -> None:
    """One flag per DistillConfig field, default None (= not given: the config file or default decides).
    Values stay text here: train.options.typed_settings types and checks them (one-line errors)."""
    from ..train.loop import DistillConfig

    for f in dataclasses.fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELPS.get(f.name))
        else:
            p.add_argument(flag, default=None, metavar=f.name.split("_")[-1].upper(), help=HELPS.get(f.name))


def add_arguments(p) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON file with the same settings (flags override it)")
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args, with_explicit=False):
    """The config file's settings (JSON-typed), overridden by the flags given (typed from text);
    ``with_explicit``: also the names of the settings given."""
    from ..train.loop import DistillConfig, load_config_file
    from ..train.options import typed_settings

    settings = typed_settings(load_config_file(args.config), args.config) if args.config else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if getattr(args, f.name) is not None}
    settings.update(typed_settings(flags, "flags", from_text=True))
    cfg = DistillConfig.from_dict(settings, source=args.config or "flags")
    return (cfg, set(settings)) if with_explicit else cfg


def finish(summary) -> int:
    """Print what was learned; exit status 130 after Ctrl-C (the checkpoint is saved)."""
    import sys

    from ..train.loop import summary_table

    if summary.get("rank", 0) != 0:                  # rank 0 alone prints what was learned
        return 130 if summary["interrupted"] else 0
    print(summary_table(summary["evals"]))
    if summary["interrupted"]:
        print(f"q4kdistill: interrupted at step {summary['step']}; checkpoint saved to {summary['checkpoint']}; "
              "run the same command with --resume to continue", file=sys.stderr)
        return 130
    print(f"checkpoint: {summary['checkpoint']} (export it: q4kdistill export --checkpoint "
          f"{summary['checkpoint']} --out student.gguf --type q4_k)")
    return 0


def run(args) -> int:
    from ..train import distributed as dist
    from ..train.loop import distill

    cfg, explicit = config_from_args(args, with_explicit=True)
    if cfg.gpus > 1 and "WORLD_SIZE" not in os.environ:        # spawn the ranks; each is this command again
        return launch_ranks(cfg, explicit, args)
    try:
        return finish(distill(cfg, resume=args.resume, progress=not args.no_progress, explicit=explicit))
    except dist.StoppedByPeer:                                # the rank at fault has said why
        return 2


def launch_ranks(cfg, explicit, args) -> int:
    """``--gpus N`` on one host: N processes (distributed.launch) that read the settings given here
    from a JSON file; the batch is checked first, so a bad split is one line, not N."""
    import json
    import tempfile

    from ..errors import Q4KError
    from ..train import distributed as dist

    dist.check_split(cfg.batch, cfg.gpus)
    if cfg.gpu_memory:
        raise Q4KError(f"--gpu-memory does not apply to {cfg.gpus} GPUs: give --batch (the global batch); "
                       "`q4kdistill plan --fit` finds one GPU's batch, to multiply by the GPUs")
    given = {k: getattr(cfg, k) for k in explicit}
    with tempfile.TemporaryDirectory(prefix="q4kdistill-launch-") as tmp:
        path = os.path.join(tmp, "settings.json")
        with open(path, "w") as f:
            json.dump(given, f)
        argv = ["distill", "--config", path] + ["--resume"] * args.resume + ["--no-progress"] * args.no_progress
        return dist.launch(cfg.gpus, argv)
