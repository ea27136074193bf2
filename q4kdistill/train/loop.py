"""The distillation loop: a frozen (quantized) teacher teaches a small float32 student.

Reads top to bottom, like nanoGPT's train.py:

    cfg = DistillConfig(teacher=..., data=..., student_layers=[0, 3, 6, 9], steps=200, ...)
    summary = distill(cfg)                     # or distill(cfg, resume=True)

    setup     teacher (stays quantized) -> its tokenizer -> train / held-out token data
              -> student (blocks copied from the teacher, or another model file) -> AdamW
              -> checkpoint (resume) or a fresh start
    each step ids [B, T] -> teacher logits, chunk by chunk -> KD (+ CE) loss -> hand-written
              student backward -> finite? -> AdamW (clip, warm-up + cosine)
              -> OUT/metrics.jsonl, tqdm line, held-out evaluation, checkpoint
    end       final evaluation and checkpoint; returns a summary (evaluation before / after)

Faults end in a ``Q4KError`` with one clear line (the CLI exits 2): vocabulary mismatch, no
data, a non-finite loss (the last good checkpoint is kept, never overwritten), out of GPU
memory (with the planner's estimate), a checkpoint made by another configuration.
Ctrl-C finishes the step it is in, saves, and returns ``summary["interrupted"] = True``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .. import backend

from . import checkpoint
from . import cuda_graph
from . import distributed as dist
from .options import typed_settings, typed_value
from .outputs import output_dir, writing
from ..errors import Q4KError
from ..finite import check_finite

# Fields that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = ("out", "steps", "eval_every", "eval_batches", "save_every", "checkpoint_activations",
                     "gpu_memory", "gpus", "cuda_graph")


@dataclass
class DistillConfig:
    teacher: str = ""                     # GGUF / APR / manifest
    data: str = ""                        # text file/folder, .jsonl chat data, .bin/.npy shards, or "demo"
    chat_template: str | None = None      # Jinja2 file for .jsonl data (default: the GGUF's own template)
    teacher_cache: str | None = None      # train from a cache-teacher folder instead of running the teacher
    out: str = "out"                      # run directory: checkpoint.npz, metrics.jsonl
    student_layers: list | None = None    # teacher blocks copied into the student (None: 4 spread out)
    student_init: str | None = None       # or: a GGUF whose weights start the student (another model)
    student_shape: str | None = None      # or: a fresh random student of this shape (spec.parse_student_shape)
    precision: str = "auto"               # student: auto (bf16 on a GPU, fp32 on the CPU) | bf16 | fp32
    steps: int = 200
    batch: int = 4                        # B sequences ...
    seq: int = 64                         # ... of T tokens each
    lr: float = 3e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    clip: float = 1.0                     # global gradient-norm clip (0: off)
    loss: str = "kl"                      # kl | rkl | jsd | skl | srkl | tvd
    temperature: float = 1.0
    alpha: float = 0.0                    # loss = alpha * CE + (1 - alpha) * KD
    beta: float = 0.5                     # jsd mixture weight
    skew_alpha: float = 0.1               # skl / srkl skew (DistiLLM), in [0, 1)
    top_k: int | None = None              # keep only the teacher's k largest logits
    chunk_tokens: int = 256               # tokens per [chunk, V] logits slab (LM head + loss)
    checkpoint_activations: bool = False  # recompute block activations in the backward
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    seed: int = 0
    truncate_vocab: bool = False          # teacher and student vocabularies differ: cut to the smaller
    heldout: float = 0.1                  # share of the data files held out for evaluation
    teacher_backend: str = "auto"
    gpu_memory: str | None = None         # "24GB" or "auto": batch, chunk and checkpointing from the planner
    gpus: int = 1                         # data-parallel ranks (one per GPU); batch is the global batch
    cuda_graph: bool = True               # replay the step as a CUDA graph where it applies (train/cuda_graph.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source="config") -> "DistillConfig":
        """Settings typed and range-checked by options.typed_settings (JSON values: ints are ints)."""
        return cls(**typed_settings(d, source)).validated()

    def validated(self) -> "DistillConfig":
        """This config with every field typed and in range (a Q4KError of one line otherwise)."""
        cfg = dataclasses.replace(self, **typed_settings(self.to_dict(), "settings"))
        if not cfg.teacher:
            raise Q4KError("no teacher given (--teacher FILE)")
        if not cfg.data and not cfg.teacher_cache:
            raise Q4KError("no data given (--data PATH)")
        if cfg.teacher_cache and cfg.top_k is not None:
            raise Q4KError("--top-k does not apply to --teacher-cache (the cache holds the teacher's top k already)")
        if cfg.student_shape and (cfg.student_layers or cfg.student_init):
            other = "--student-layers" if cfg.student_layers else "--student-init"
            raise Q4KError(f"give {other} or --student-shape, not both: each one says where the student comes from")
        if cfg.student_shape:
            from ..student.spec import parse_student_shape

            parse_student_shape(cfg.student_shape)          # a bad shape fails before the teacher loads
        return cfg


def load_config_file(path) -> dict:
    """A JSON file with DistillConfig's keys (``student_layers`` as a list or "0,3,6")."""
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as exc:
        raise Q4KError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Q4KError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise Q4KError(f"{path}: JSON nested too deeply to be a config file") from None
    if not isinstance(d, dict):
        raise Q4KError(f"{path}: expected a JSON object of settings")
    return d


def parse_layers(text) -> list | None:
    """"0,3,6,9" or [0, 3, 6, 9] -> [0, 3, 6, 9] (None stays None); Q4KError otherwise."""
    return typed_value("student_layers", text, "student layers", from_text=True)


def spread_layers(n_layers: int, k: int) -> list:
    """k teacher blocks spread evenly from the first to the last: (18, 4) -> [0, 6, 11, 17]."""
    k = max(1, min(k, n_layers))
    return sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})


# -- setup -------------------------------------------------------------------------------

def load_teacher(cfg: DistillConfig, log):
    from ..teacher.model import Teacher

    if not os.path.exists(cfg.teacher):
        raise Q4KError(f"{cfg.teacher}: no such teacher file")
    return Teacher.load(cfg.teacher, backend=cfg.teacher_backend, log=log)


TOKEN_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "q4kdistill", "tokens")


def load_data(cfg: DistillConfig, log):
    """-> (tokenizer, train, held-out TokenDatasets, data identity). Text goes through the teacher's
    own tokenizer, JSONL conversations through its chat template (or --chat-template); "demo" is
    Python's standard library (held-out modules kept apart)."""
    from .chat import load_template
    from .corpus import demo_corpus, load_datasets
    from ..formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(cfg.teacher) if cfg.teacher.lower().endswith(".gguf") else None
    chat = None if tokenizer is None else load_template(cfg.teacher, tokenizer, cfg.chat_template, required=False)
    paths, held = demo_corpus() if cfg.data == "demo" else (cfg.data, None)
    train, heldout = load_datasets(paths, cfg.seq, tokenizer, held_out=cfg.heldout, held_out_paths=held,
                                   seed=cfg.seed, cache_dir=TOKEN_CACHE, chat=chat)
    if heldout is None:
        raise Q4KError("no held-out data to evaluate on: give --heldout above 0 (a share of the files)")
    trained = "" if train.masks is None else f", {train.n_trained:,} of them responses (trained)"
    log(f"data: {train.n_tokens:,} training tokens ({len(train)} sequences of {cfg.seq}){trained}, "
        f"{heldout.n_tokens:,} held out")
    return tokenizer, train, heldout, {"train": train.fingerprint, "heldout": heldout.fingerprint}


class OnlineTargets:
    """The teacher itself as the source of a batch's targets (its logits, chunk by chunk)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def targets(self, batch, split):
        return finite_logits_fn(self.teacher.logits_fn(batch.ids), batch.ids.shape[1])


def heldout_batches(cfg: DistillConfig, heldout) -> list:
    """The same first ``eval_batches`` held-out batches (corpus.Batch) at every evaluation."""
    return list(heldout.in_order_batches(cfg.batch, limit=cfg.batch * cfg.eval_batches))


def student_precision(cfg: DistillConfig) -> str:
    """The run's student precision: 'auto' is bf16 on a GPU, fp32 on the CPU."""
    from ..student.precision import resolve

    return resolve(cfg.precision, backend.on_gpu())


def build_student(cfg: DistillConfig, teacher):
    """Blocks ``cfg.student_layers`` of the teacher (its widths, embedding and head), a fresh
    random student of ``cfg.student_shape`` (the teacher's family and vocabulary), or the weights
    of another model file (``cfg.student_init``, e.g. a smaller model of the family)."""
    from ..student.model import Student

    kw = dict(checkpoint=cfg.checkpoint_activations, chunk_tokens=cfg.chunk_tokens, precision=student_precision(cfg))
    if cfg.gpus > 1:                  # the data-parallel all-reduce sums the flat grad buffer: a dense embedding grad
        kw["sparse_embedding_grad"] = False
    if cfg.student_shape:
        from ..student.spec import parse_student_shape, student_config

        config = student_config(teacher.config, parse_student_shape(cfg.student_shape))
        return Student.from_config(config, seed=cfg.seed, **kw)
    if not cfg.student_init:
        layers = cfg.student_layers or spread_layers(teacher.config.n_layers, 4)
        return Student.from_teacher(teacher, layers, **kw)
    from .export import read_student

    config, params = read_student(cfg.student_init)
    student = Student(config, **kw)
    missing = sorted(set(student.params) - set(params))
    if missing:
        raise Q4KError(f"{cfg.student_init}: cannot initialise a student from it, missing {', '.join(missing[:3])}")
    for name, view in student.params.items():
        view[...] = student.xp.asarray(params[name])
    return student


def check_vocab(cfg: DistillConfig, teacher, student) -> None:
    """Teacher and student logits must cover one vocabulary (or the teacher's is cut to the student's)."""
    n_student, n_teacher = student.config.vocab_size, teacher.vocab_size
    if n_student > n_teacher:
        raise Q4KError(f"vocabulary mismatch: the student has {n_student} tokens, more than the teacher's "
                       f"{n_teacher}; only a teacher's vocabulary can be truncated (--truncate-vocab)")
    teacher.check_vocab(n_student, truncate=cfg.truncate_vocab)


def check_data_vocab(datasets, vocab_size: int) -> None:
    """Every token id of the data must be a row of the student's embedding."""
    top = max(int(d.sequences.max()) for d in datasets)
    if top >= vocab_size:
        raise Q4KError(f"the data holds token id {top}, outside the student's vocabulary of {vocab_size} "
                       "(data tokenized for another model, or a vocabulary truncated below the data's ids)")


def file_identity(path, head_bytes=1 << 22) -> dict:
    """Cheap identity of a big file: name, size, and a hash of its first 4 MB (header + metadata)."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(head_bytes)).hexdigest()[:16]
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "head_sha256": head}


def fingerprint(cfg: DistillConfig, teacher, student, data_id) -> dict:
    """What a checkpoint must share with this run to be resumed (see checkpoint.check_fingerprint)."""
    skip = RESUMABLE_CHANGES + ("teacher", "data", "teacher_cache", "chat_template")  # content below, not paths
    fp = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    fp["teacher"] = file_identity(cfg.teacher)
    if cfg.teacher_cache:
        fp["teacher_cache"] = teacher.cache_identity
    s = student.config
    fp["student"] = f"{s.architecture} {s.n_layers} blocks d{s.d_model} ff{s.d_ff} V{s.vocab_size}, {student.n_params:,} params"
    fp["data"] = data_id
    return fp


def make_optimizer(cfg: DistillConfig, student):
    """AdamW with the run's warm-up + cosine schedule (down to lr * min_lr_ratio at the last step)."""
    from ..student.optim import AdamW, OptimConfig

    return AdamW.for_student(student, OptimConfig(
        lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio, warmup_steps=cfg.warmup, total_steps=cfg.steps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.clip))


def make_loss_config(cfg: DistillConfig):
    from ..student.losses import LossConfig

    return LossConfig(kind=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta,
                      skew_alpha=cfg.skew_alpha, top_k=cfg.top_k)


# -- evaluation ---------------------------------------------------------------------------

def evaluate(student, teacher, batches) -> dict:
    """Held-out: teacher-KL (nats/token, T = 1), student perplexity, top-1 agreement with the teacher.

    ``teacher``: a Teacher, or a targets source (OnlineTargets, TeacherCache); ``batches``: corpus.Batch
    (or plain id arrays). With a loss mask (instruction data) every number counts only the positions
    whose next id is a target (the responses). From a teacher cache the KL is over its k + 1 classes
    (top k and the rest) and agreement is with the cached most probable id."""
    from .corpus import Batch
    from ..student.losses import LossConfig, SparseTargets, ce_rows, log_softmax, sparse_kd_rows, token_weights

    xp = student.xp
    kl = ce = agree = 0.0
    n_tok = n_ce = 0
    for b in batches:
        b = b if isinstance(b, Batch) else Batch(np.asarray(b), None, None)
        t_fn = teacher.targets(b, "heldout") if hasattr(teacher, "targets") else teacher.logits_fn(b.ids, spans=False)
        w = token_weights(xp.asarray(b.ids), None, LossConfig(), None if b.loss_mask is None else xp.asarray(b.loss_mask))
        for start, stop, s in student.iter_logits(b.ids):
            t, sel = t_fn(start, stop), w["kd_mask"][start:stop]
            if isinstance(t, SparseTargets):
                t = t.to(xp)
                rows, _ = sparse_kd_rows(s, t, LossConfig("kl"))
                hit = s.argmax(axis=-1) == t.ids[:, 0]
            else:
                t = check_finite(xp.asarray(t), "the teacher's logits", start, b.ids.shape[1])   # [n, V]
                lq, lp = log_softmax(s), log_softmax(t)
                rows = (xp.exp(lp) * (lp - lq)).sum(axis=-1)
                hit = s.argmax(axis=-1) == t.argmax(axis=-1)
            kl += float(xp.where(sel, rows, 0.0).sum())
            agree += float((hit & sel).sum())
            ce_r, _ = ce_rows(s, w["targets"][start:stop], need_grad=False)
            ce += float(ce_r.sum())
            n_tok += int(sel.sum())
            n_ce += int((w["targets"][start:stop] >= 0).sum())
    return {"teacher_kl": kl / max(n_tok, 1), "student_ppl": math.exp(min(ce / max(n_ce, 1), 700.0)),
            "top1_agreement": agree / max(n_tok, 1), "tokens": n_tok}


# -- logging ------------------------------------------------------------------------------

class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line (a step, or an evaluation)."""

    def __init__(self, out_dir, resume_step: int | None, log=print):
        self.path, self.log = os.path.join(out_dir, "metrics.jsonl"), log
        with writing(self.path):
            if resume_step is None:
                open(self.path, "w").close()
            else:
                self._truncate_after(resume_step)

    def _truncate_after(self, step):
        """Drop records past the checkpoint we resume from (they will be made again), and lines
        that are not a JSON record (a crash mid-write leaves a partial last line): with a warning."""
        if not os.path.exists(self.path):
            return
        keep, dropped = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                record = _record(line)
                if record is None:
                    dropped += bool(line.strip())
                elif not isinstance(record.get("step", 0), int) or record.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            self.log(f"warning: {self.path}: dropped {dropped} line(s) that are not a JSON record (a partial last line?)")
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, record: dict) -> None:
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _record(line: str):
    """One metrics.jsonl line -> its dict, or None for anything else."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


class PeakMemory:
    """Peak GPU bytes since the last ``take()`` (None on the CPU: there is no GPU to count)."""

    def __init__(self):
        self.counter = None
        if backend.on_gpu():
            from ..memory import meter as memory

            self.counter = memory.install()

    def take(self):
        return None if self.counter is None else self.counter.take_peak()


def progress_line(r: dict) -> str:
    mem = "" if r["peak_gpu_bytes"] is None else f" | peak {r['peak_gpu_bytes'] / 1e9:.2f} GB"
    return f"loss {r['loss']:.4f} kd {r['kd']:.4f} ce {r['ce']:.4f} | {r['tokens_per_s']:,.0f} tok/s{mem}"


def eval_line(e: dict) -> str:
    return (f"teacher-KL {e['teacher_kl']:.4f}, top-1 agreement {100 * e['top1_agreement']:.1f} %, "
            f"student ppl {e['student_ppl']:.1f}")


# -- faults -----------------------------------------------------------------------------------

def raise_non_finite(cfg, step, loss, grad_norm, saved_at):
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    kept = (f"the last good checkpoint (step {saved_at}) is kept in {cfg.out}" if saved_at is not None
            else "no checkpoint had been saved yet")
    raise NonFiniteLoss(f"step {step}: {what}; stopped before updating the student, {kept}; "
                        f"try a lower --lr (now {cfg.lr:g}) or a --clip (now {cfg.clip:g})")


def is_out_of_memory(exc) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def out_of_memory_error(cfg, step, exc) -> Q4KError:
    """One line: what ran out, the planner's estimate for this run, and what to lower."""
    where = "host" if isinstance(exc, MemoryError) or not backend.on_gpu() else "GPU"
    try:
        from ..memory.planner import make_plan

        plan = make_plan(cfg.teacher, cfg.batch, cfg.seq, _plan_spec(cfg), precision=student_precision(cfg),
                         chunk_tokens=cfg.chunk_tokens, checkpoint=cfg.checkpoint_activations)
        estimate = f"the planner predicts {plan.distill_step_peak_bytes / 1e9:.2f} GB of GPU memory for this step"
    except Exception as plan_exc:                      # the estimate is a courtesy; never hide the OOM
        estimate = f"no planner estimate ({plan_exc})"
    if cfg.gpu_memory:
        estimate += f" (settings chosen for --gpu-memory {cfg.gpu_memory})"
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    lower = (f"lower --batch (now {cfg.batch}), --seq (now {cfg.seq}) or --chunk-tokens (now {cfg.chunk_tokens})"
             + ("" if cfg.checkpoint_activations else ", or add --checkpoint-activations"))
    return Q4KError(f"out of {where} memory at step {step + 1} ({first}); {estimate}; {lower}")


def _plan_spec(cfg):
    """The student as memory.planner.make_plan takes it."""
    if cfg.student_shape:
        from ..student.spec import parse_student_shape

        return parse_student_shape(cfg.student_shape)
    return "layers=" + (",".join(map(str, cfg.student_layers)) if cfg.student_layers else "4")


def step_span(cfg, student, log) -> int | None:
    """The teacher-logit span of a GPU step for this student (memory.planner.step_head_span: the widest
    that leaves the planned step peak where it is); None on the CPU (no spans) or where the planner
    cannot plan this run (the default span then)."""
    if not backend.on_gpu():
        return None
    from ..memory.planner import step_head_span

    try:
        return step_head_span(cfg.teacher, cfg.batch, cfg.seq, _plan_spec(cfg), precision=student_precision(cfg),
                              chunk_tokens=cfg.chunk_tokens, checkpoint=cfg.checkpoint_activations,
                              sparse_embedding_grad=student.embedding_rows is not None)
    except (Q4KError, ValueError, KeyError) as exc:
        log(f"teacher logit span: the default ({exc})")
        return None


# -- Ctrl-C ---------------------------------------------------------------------------------

class StopOnInterrupt:
    """First Ctrl-C: let the step finish, then the loop saves and stops. Second: stop at once."""

    def __init__(self, log):
        self.requested, self.log, self.previous = False, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop without saving)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# -- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(run, step, evals) -> str:
    state = {"params": run.student.params, "optimizer": run.opt.state_dict(), "data": run.sampler.state_dict(),
             "evals": evals}
    config = {"distill": run.cfg.to_dict(), "student": run.student.config.to_dict()}
    return checkpoint.save(run.cfg.out, step=step, state=state, config=config, fingerprint=run.fingerprint)


def restore_checkpoint(run):
    """OUT/checkpoint.npz -> the student, optimizer and data sampler; returns (step, evals).

    The sampler's (seed, position) is all the randomness a run has: no dropout, no sampling."""
    ck = checkpoint.load_student(run.cfg.out)             # arrays checked against the student it describes
    checkpoint.check_fingerprint(ck, run.fingerprint)
    if ck.student_config.tensor_shapes() != run.student.config.tensor_shapes():
        raise Q4KError(f"{ck.path} holds another student ({ck.student_config.n_layers} blocks, d_model "
                       f"{ck.student_config.d_model}) than this run builds; use a new --out directory")
    for name, view in run.student.params.items():
        view[...] = run.student.xp.asarray(ck.state["params"][name])
    optim_cfg = run.opt.cfg                               # this run's schedule (--steps may have grown)
    run.opt.load_state_dict({k: v for k, v in ck.state["optimizer"].items() if k != "config"})
    run.opt.cfg = optim_cfg
    run.sampler.load_state_dict(ck.state["data"])
    return ck.step, ck.state["evals"]


# -- the loop ---------------------------------------------------------------------------------

class NonFiniteLoss(Q4KError):
    pass


@dataclass
class Run:
    cfg: DistillConfig
    teacher: object
    tokenizer: object
    train: object                 # TokenDataset
    heldout: object
    sampler: object               # train.batches(B, seed): endless [B, T] batches with state_dict()
    student: object
    opt: object
    loss_cfg: object
    fingerprint: dict
    eval_batches: list = field(default_factory=list)
    step: int = 0                 # optimizer steps taken
    targets: object = None        # where a batch's teacher targets come from: OnlineTargets or TeacherCache
    comm: object = field(default_factory=dist.SingleProcess)   # the data-parallel group (distributed.py)
    stop_agreed: bool = False     # every rank saw a stop request at the last step (Ctrl-C on any rank)
    interrupt: object = None      # StopOnInterrupt while training: .requested after a Ctrl-C
    graph: object = None          # cuda_graph.GraphedStep (GPU, live teacher, one rank), or None: eager steps


def setup(cfg: DistillConfig, log) -> Run:
    if cfg.teacher_cache:
        return setup_from_cache(cfg, log)
    teacher = load_teacher(cfg, log)
    tokenizer, train, heldout, data_id = load_data(cfg, log)
    student = build_student(cfg, teacher)
    check_vocab(cfg, teacher, student)
    check_data_vocab((train, heldout), student.config.vocab_size)
    teacher.span_tokens = step_span(cfg, student, log)
    run = Run(cfg, teacher, tokenizer, train, heldout, train.batches(cfg.batch, seed=cfg.seed), student,
              make_optimizer(cfg, student), make_loss_config(cfg), {}, targets=OnlineTargets(teacher))
    run.fingerprint = fingerprint(cfg, teacher, student, data_id)
    run.eval_batches = heldout_batches(cfg, heldout)
    if cfg.cuda_graph and cuda_graph.enabled():
        run.graph = cuda_graph.GraphedStep(teacher, student, run.loss_cfg, log=log)
    return run


def setup_from_cache(cfg: DistillConfig, log) -> Run:
    """Training from a teacher cache: data and targets from the cache; the teacher file is read
    (on the host, tensor by tensor) only to initialise the student, never uploaded."""
    from .teacher_cache import FileWeights, TeacherCache

    cache = TeacherCache.open(cfg.teacher_cache)
    meta = cache.meta
    if cfg.seq != meta["seq"]:
        raise Q4KError(f"--seq {cfg.seq} differs from the teacher cache's {meta['seq']} (its sequences are packed)")
    if cfg.temperature != meta["temperature"]:
        raise Q4KError(f"--temperature {cfg.temperature:g} differs from the teacher cache's {meta['temperature']:g} "
                       "(its log-probs are at that temperature)")
    if not os.path.exists(cfg.teacher):
        raise Q4KError(f"{cfg.teacher}: no such teacher file (the student is initialised from it)")
    weights = FileWeights(cfg.teacher)
    train, heldout = cache.dataset("train"), cache.dataset("heldout")
    if heldout is None:
        raise Q4KError(f"{cfg.teacher_cache} has no held-out split to evaluate on: make it with --heldout above 0")
    student = build_student(cfg, weights)
    if student.config.vocab_size != meta["vocab_size"]:
        raise Q4KError(f"vocabulary mismatch: the student has {student.config.vocab_size} tokens, the teacher "
                       f"cache {meta['vocab_size']}")
    check_data_vocab((train, heldout), student.config.vocab_size)
    log(f"teacher cache {cfg.teacher_cache}: top-{meta['top_k']} of {meta['vocab_size']:,}, {train.n_tokens:,} training "
        f"tokens, {heldout.n_tokens:,} held out (the teacher is not loaded)")
    weights.cache_identity = cache.identity
    run = Run(cfg, weights, None, train, heldout, train.batches(cfg.batch, seed=cfg.seed), student,
              make_optimizer(cfg, student), make_loss_config(cfg), {}, targets=cache)
    run.fingerprint = fingerprint(cfg, weights, student, {"train": train.fingerprint, "heldout": heldout.fingerprint})
    run.eval_batches = heldout_batches(cfg, heldout)
    return run


def start(run: Run, resume: bool, log) -> dict:
    """Sets run.step (from the checkpoint, or 0) -> evals so far (step 0: the untrained student)."""
    cfg = run.cfg
    output_dir(cfg.out, create=True)
    if resume:
        run.step, evals = restore_checkpoint(run)
        log(f"resumed from {checkpoint.checkpoint_path(cfg.out)} at step {run.step}")
        return evals
    if checkpoint.exists(cfg.out):
        raise Q4KError(f"{cfg.out} already holds a checkpoint: pass --resume to continue it, or choose a new --out")
    run.comm.barrier()                    # every rank has looked for a checkpoint before rank 0 writes files
    if run.comm.rank != 0:                # evaluation, metrics and checkpoints: rank 0's (the others wait)
        run.comm.barrier()
        return {}
    evals = {"0": evaluate(run.student, run.targets, run.eval_batches)}
    MetricsLog(cfg.out, resume_step=None).write({"step": 0, "eval": evals["0"]})
    log(f"step 0: held-out {eval_line(evals['0'])}")
    run.comm.barrier()
    return evals


def finite_logits_fn(fn, seq_len: int):
    """The teacher's fn(start, stop) -> [n, V], each chunk checked finite where the loss reads it
    (a non-finite logit names its batch row and position); a SpanLogits keeps its ``covers``, so the
    loss still writes its gradient over the span's rows (ops/fused_linear_loss.py)."""
    return _CheckedSpans(fn, seq_len) if hasattr(fn, "covers") else \
        (lambda start, stop: check_finite(fn(start, stop), "the teacher's logits", start, seq_len))


class _CheckedSpans:
    def __init__(self, fn, seq_len: int):
        self.fn, self.seq_len = fn, seq_len

    def __call__(self, start, stop):
        return check_finite(self.fn(start, stop), "the teacher's logits", start, self.seq_len)

    def covers(self, start, stop) -> bool:
        return self.fn.covers(start, stop)


def train_step(run: Run, batches) -> dict:
    """One optimizer step; returns its metrics record. Nothing changes if the loss is not finite."""
    t0 = time.perf_counter()
    batch = batches.next_batch()                                          # ids [B, T], loss mask, index
    ids = batch.ids
    if run.comm.world_size > 1:
        loss, parts = data_parallel_backward(run, batch)
    else:
        loss, parts = one_rank_loss(run, batch)
    grad_norm = run.opt.grad_norm()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return {"loss": loss, "grad_norm": grad_norm, "finite": False}
    info = run.opt.step(grad_norm)
    seconds = time.perf_counter() - t0
    return {"loss": loss, "kd": parts["kd"], "ce": parts["ce"], "lr": info["lr"], "grad_norm": grad_norm,
            "tokens_per_s": ids.size / seconds, "seconds": seconds, "finite": True}


def one_rank_loss(run: Run, batch) -> tuple:
    """The batch's loss and grads on one rank -> (loss, parts): a CUDA graph's replay where one applies
    (the live teacher, no loss mask), else eagerly, each teacher chunk checked finite where the loss reads
    it. A replay does not check the chunks; a non-finite loss there runs the step again eagerly, so the
    error names the row and position of the teacher's non-finite logit as it would without the graph."""
    def eager():
        teacher = None if run.loss_cfg.alpha == 1.0 else run.targets.targets(batch, "train")   # CE only: no teacher
        loss, _, parts = run.student.loss_and_grads(batch.ids, teacher, run.loss_cfg, loss_mask=batch.loss_mask)
        return loss, parts

    if run.graph is None or batch.loss_mask is not None or run.loss_cfg.alpha == 1.0:
        return eager()
    loss, parts = run.graph(batch.ids, eager=eager)
    return (loss, parts) if math.isfinite(loss) else eager()


def data_parallel_backward(run: Run, batch) -> tuple:
    """This rank's rows of the global batch -> (loss, parts) of the whole batch, with the grad
    buffer holding the whole batch's gradient on every rank (exactly the 1-rank gradient, summed
    in another order).

    Each rank normalises by the global batch's token counts (known to all: every rank drew the same
    batch), so its loss and grads are its share and a sum over ranks is the batch mean. Before any
    large collective the ranks agree on a status, so one rank's fault stops all and no rank is left
    waiting in an all-reduce. The grad all-reduce runs after the backward, not overlapped with it:
    a 0.5B student's 1.98 GB of fp32 grads take ~5-10 ms over H200 NVLink against a ~0.8 s step at
    8x512 per GPU (docs/distributed.md), so overlap would save under 1.5 %."""
    from .corpus import Batch
    from ..student.losses import token_weights

    comm, xp = run.comm, run.student.xp
    w = token_weights(batch.ids, None, run.loss_cfg, batch.loss_mask)      # host, global [B, T]
    rows = dist.local_rows(batch.ids.shape[0], comm)
    mine = Batch(batch.ids[rows], None if batch.loss_mask is None else batch.loss_mask[rows], batch.index[rows])
    status, failure, loss, parts = dist.STATUS_OK, None, math.nan, {"kd": math.nan, "ce": math.nan}
    try:
        teacher = None if run.loss_cfg.alpha == 1.0 else run.targets.targets(mine, "train")
        loss, _, parts = run.student.loss_and_grads(mine.ids, teacher, run.loss_cfg, loss_mask=mine.loss_mask,
                                                    token_counts=(w["n_kd"], w["n_ce"]))
        status |= 0 if math.isfinite(loss) else dist.STATUS_NONFINITE
    except Exception as exc:                         # incl. out of memory; Ctrl-C twice still ends at once
        status, failure = dist.STATUS_FAILED, exc
    status |= dist.STATUS_STOP if run.stop_agreed or run.interrupt is not None and run.interrupt.requested else 0
    agreed = dist.agree_status(comm, status, xp)
    if agreed & dist.STATUS_FAILED:
        if failure is not None:
            raise failure
        raise dist.StoppedByPeer(f"step {run.step + 1}: another rank failed (its error is its own message); "
                                 f"every rank stopped, the last checkpoint in {run.cfg.out} is kept")
    run.stop_agreed = bool(agreed & dist.STATUS_STOP)
    sums = xp.asarray([float(loss), float(parts["kd"]), float(parts["ce"])], dtype=xp.float64)   # this rank's share
    comm.allreduce(sums)
    loss, kd, ce = (float(v) for v in backend.to_host(sums))
    if agreed & dist.STATUS_NONFINITE:               # the summed loss is then not finite either
        return math.nan if math.isfinite(loss) else loss, {"kd": kd, "ce": ce}
    dist.allreduce_flat(comm, run.student.grad_buffer.flat)
    return loss, {"kd": kd, "ce": ce}


def train(run: Run, evals: dict, progress: bool) -> dict:
    """Steps run.step+1 .. cfg.steps, with logging, evaluation and checkpoints."""
    from tqdm.auto import tqdm

    cfg, comm = run.cfg, run.comm
    lead = comm.rank == 0                         # rank 0 alone evaluates, writes metrics and checkpoints
    metrics, peak = MetricsLog(cfg.out, resume_step=run.step, log=print) if lead else None, PeakMemory()
    saved_at = run.step if checkpoint.exists(cfg.out) else None
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (progress and lead), unit="step", dynamic_ncols=True)
    with StopOnInterrupt(bar.write) as interrupt:
        run.interrupt = interrupt
        # one rank: stop at its own Ctrl-C; several: at the request all agreed on in the step (same step everywhere)
        stopping = (lambda: interrupt.requested) if comm.world_size == 1 else (lambda: run.stop_agreed)
        while run.step < cfg.steps and not stopping():
            with np.errstate(over="ignore", invalid="ignore"):      # a non-finite loss is reported below
                record = train_step(run, run.sampler)
            if not record.pop("finite"):
                if not lead:
                    raise dist.StoppedByPeer(f"step {run.step + 1}: the loss is not finite (rank 0 reports it)")
                raise_non_finite(cfg, run.step + 1, record["loss"], record["grad_norm"], saved_at)
            run.step = step = run.step + 1
            record = {"step": step, **record, "peak_gpu_bytes": peak.take()}
            bar.set_postfix_str(progress_line(record), refresh=False)
            bar.update(1)
            if lead:
                metrics.write(record)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                if run.graph is not None:        # the graph's pool would hold the step's temporaries beside the
                    run.graph.close()            # evaluation's: give them back; the next steps re-capture
                if lead:
                    evals[str(step)] = evaluate(run.student, run.targets, run.eval_batches)
                    metrics.write({"step": step, "eval": evals[str(step)]})
                    bar.write(f"step {step}: held-out {eval_line(evals[str(step)])}")
                comm.barrier()                                       # the others wait for rank 0's evaluation
            if (step % cfg.save_every == 0 or step == cfg.steps or stopping()) and lead:
                save_checkpoint(run, step, evals)
                saved_at = step
    bar.close()
    return {"step": run.step, "evals": evals, "checkpoint": checkpoint.checkpoint_path(cfg.out),
            "interrupted": run.step < cfg.steps, "student": run.student, "rank": comm.rank}


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, log=print, explicit=None,
            comm=None) -> dict:
    """Run (or ``resume``) a distillation.

    ``cfg.gpu_memory`` set: batch, chunk_tokens and checkpoint_activations not in ``explicit`` (the
    settings the user gave; None: those left at their defaults) are chosen by ``memory.fit``; a resume
    keeps the settings its checkpoint was made with.
    ``comm``: this process's rank of a data-parallel group (distributed.py; default: from torchrun-style
    variables, else a world of one). ``cfg.batch`` is the global batch; each rank trains on its share.
    -> {"step", "evals": {step: evaluate(...)} (rank 0's; {} on the others), "checkpoint", "interrupted",
        "student", "rank"}"""
    cfg = cfg.validated()
    output_dir(cfg.out)                                  # a wrong --out costs nothing: checked first
    comm = comm if comm is not None else dist.from_environment()
    if comm.world_size == 1 and cfg.gpus > 1:
        raise Q4KError(f"gpus={cfg.gpus} needs one process per GPU: run `q4kdistill distill --gpus {cfg.gpus}`, "
                       "torchrun, or pass distill(cfg, comm=...) from each rank")
    dist.local_rows(cfg.batch, comm)                     # the global batch must split evenly
    if comm.world_size > 1 and cfg.gpu_memory:           # each rank would fit its own free memory: no agreement
        raise Q4KError(f"--gpu-memory does not apply to {comm.world_size} GPUs: give --batch (the global batch); "
                       "`q4kdistill plan --fit` finds one GPU's batch, to multiply by the GPUs")
    log = log if comm.rank == 0 else (lambda *a, **k: None)
    if cfg.gpu_memory and not (resume and checkpoint.exists(cfg.out)):
        from ..memory.fit import apply_budget

        cfg = apply_budget(cfg, explicit, log)
    elif cfg.gpu_memory:
        cfg = _settings_of_checkpoint(cfg, log)
    run = None
    try:
        run = setup(cfg, log)
        run.comm = comm
        if comm.world_size > 1:           # rank 0 evaluates the same sequences in batches of one rank's share
            run.eval_batches = list(run.heldout.in_order_batches(cfg.batch // comm.world_size,
                                                                 limit=cfg.batch * cfg.eval_batches))
        evals = start(run, resume, log)
        log(f"student: {run.student.config.n_layers} blocks, {run.student.n_params:,} params, {run.student.prec.name}; "
            f"steps {run.step}..{cfg.steps} of {cfg.batch} x {cfg.seq} tokens; loss {cfg.loss}, alpha {cfg.alpha}")
        return train(run, evals, progress)
    except Q4KError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(cfg, run.step if run else 0, exc) from None
        raise


def _settings_of_checkpoint(cfg: DistillConfig, log) -> DistillConfig:
    """On --resume with --gpu-memory: the batch, chunk and checkpointing the run was started with."""
    ck = checkpoint.load(cfg.out)
    saved = ck.config.get("distill", {})
    keep = {k: saved[k] for k in ("batch", "chunk_tokens", "checkpoint_activations") if k in saved}
    log("--gpu-memory: resuming with the checkpoint's settings " + ", ".join(f"{k}={v}" for k, v in keep.items()))
    return dataclasses.replace(cfg, **keep)


def summary_table(evals: dict) -> str:
    """What was learned: held-out numbers at the first and the last evaluation."""
    steps = sorted(evals, key=int)
    a, b = evals[steps[0]], evals[steps[-1]]
    rows = [("teacher-KL (nats/token, lower is better)", "teacher_kl", "{:.4f}"),
            ("top-1 agreement with the teacher", "top1_agreement", "{:.1%}"),
            ("student perplexity", "student_ppl", "{:.4g}")]
    head = f"{'held-out, ' + str(a['tokens']) + ' tokens':<42} {'step ' + steps[0]:>12} {'step ' + steps[-1]:>12}"
    lines = [head, "-" * len(head)]
    lines += [f"{label:<42} {fmt.format(a[key]):>12} {fmt.format(b[key]):>12}" for label, key, fmt in rows]
    return "\n".join(lines)
