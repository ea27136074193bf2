"""Teacher audit: how far a (quantized) teacher's next-token distributions are from a reference's.

    report = audit("model-q4_k_m.gguf", "model-f16.gguf", "my_data/", seq=128)

Both files run over the same token sequences (the data of ``distill --data``, tokenised by their
shared tokenizer and packed the same way). Per position, with p the reference's softmax and q the
teacher's (T = 1, the whole vocabulary, float64):

    KL(p || q) = sum p (log p - log q)        (llama.cpp's --kl-divergence direction)
    top-1 agreement: argmax p == argmax q
    perplexity: exp(mean -log prob of the actual next token), for each model

-> {"tokens", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agreement", "ppl_teacher",
    "ppl_reference", ...}. With chat data (JSONL) only the positions whose next id is a response
token count, as in training.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from ..errors import Q4KError

CHUNK_TOKENS = 256          # [chunk, V] float64 log-probs at a time (V = 152k: 311 MB)


def load_audit_data(tokenizer, data, seq: int, max_tokens=None, chat_template_file=None, teacher_path=None, progress=False):
    """Every file of ``data`` ("demo": the stdlib corpus' held-out side) -> a TokenDataset of up to
    ``max_tokens`` tokens (whole sequences)."""
    from ..train.chat import load_template
    from ..train.corpus import TokenDataset, demo_corpus, find_files, tokenize_files_masked

    chat = (load_template(teacher_path, tokenizer, chat_template_file, required=False)
            if teacher_path or chat_template_file else None)
    files = find_files(demo_corpus()[1] if data == "demo" else data)
    stream, mask = tokenize_files_masked(files, tokenizer, progress=progress, chat=chat)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    d = TokenDataset(stream, seq, bos, loss_mask=mask)
    if max_tokens is not None:
        n = max(1, int(max_tokens) // seq)
        d = TokenDataset.from_sequences(d.sequences[:n], None if d.masks is None else d.masks[:n])
    return d


def compare_chunk(lr, lt, targets, sel):
    """Reference and teacher logits [n, V] of one chunk -> (KL [m], agree [m] bool, nll_ref [c],
    nll_teacher [c]) over the m selected positions and the c of them with a next token."""
    from ..backend import array_module, to_host
    from ..student.losses import log_softmax

    xp = array_module(lr)
    lp, lq = log_softmax(lr.astype(xp.float64)), log_softmax(lt.astype(xp.float64))
    kl = (xp.exp(lp) * (lp - lq)).sum(axis=-1)
    agree = lr.argmax(axis=-1) == lt.argmax(axis=-1)
    has = (targets >= 0) & sel
    r = xp.arange(len(targets))
    tg = xp.where(has, targets, 0)
    return (to_host(kl[sel]), to_host(agree[sel]), to_host(-lp[r, tg][has]), to_host(-lq[r, tg][has]))


def audit(teacher, reference, data, seq=128, batch=4, max_tokens=None, chat_template=None,
          teacher_backend="auto", progress=True, log=print) -> dict:
    """Run ``teacher`` and ``reference`` (model files) over ``data``; see the module docstring."""
    from ..formats.tokenizer import Tokenizer
    from .model import Teacher

    for path in (teacher, reference):
        if not os.path.exists(path):
            raise Q4KError(f"{path}: no such model file")
    if seq < 2 or batch < 1:
        raise Q4KError(f"--seq must be >= 2 and --batch >= 1 (got {seq}, {batch})")
    tok_t, tok_r = Tokenizer.from_gguf(teacher), Tokenizer.from_gguf(reference)
    if tok_t.fingerprint != tok_r.fingerprint:
        raise Q4KError(f"{teacher} and {reference} have different tokenizers ({tok_t.vocab_size} and "
                       f"{tok_r.vocab_size} tokens): an audit compares two versions of one model")
    d = load_audit_data(tok_r, data, seq, max_tokens, chat_template, reference, progress)
    ref = Teacher.load(reference, backend=teacher_backend, log=log)
    tea = Teacher.load(teacher, backend=teacher_backend, log=log)
    return audit_models(tea, ref, d, batch, progress, teacher=str(teacher), reference=str(reference))


def audit_models(tea, ref, dataset, batch=4, progress=True, **extra) -> dict:
    """The audit of two loaded Teachers over a TokenDataset's sequences (in order) -> the report."""
    from tqdm.auto import tqdm

    from ..student.losses import LossConfig, token_weights

    if tea.vocab_size != ref.vocab_size:
        raise Q4KError(f"the teacher has {tea.vocab_size} logits per token, the reference {ref.vocab_size}")
    xp = ref.xp
    kls, agrees, nll_r, nll_t = [], [], [], []
    t0 = time.perf_counter()
    bar = tqdm(total=dataset.n_tokens, unit="tok", unit_scale=True, disable=not progress, desc="audit", dynamic_ncols=True)
    for b in dataset.in_order_batches(batch):
        w = token_weights(xp.asarray(b.ids), None, LossConfig(), None if b.loss_mask is None else xp.asarray(b.loss_mask))
        fr, ft = ref.logits_fn(b.ids, spans=False), tea.logits_fn(b.ids, spans=False)
        for start in range(0, b.ids.size, CHUNK_TOKENS):
            stop = min(start + CHUNK_TOKENS, b.ids.size)
            out = compare_chunk(fr(start, stop), ft(start, stop), w["targets"][start:stop], w["kd_mask"][start:stop])
            for acc, x in zip((kls, agrees, nll_r, nll_t), out):
                acc.append(x)
        bar.update(b.ids.size)
    bar.close()
    return summarize(np.concatenate(kls), np.concatenate(agrees), np.concatenate(nll_r), np.concatenate(nll_t),
                     seconds=time.perf_counter() - t0, **extra)


def summarize(kl, agree, nll_ref, nll_teacher, **extra) -> dict:
    """Per-token arrays -> the report (KL clipped at 0: float rounding can make an exact 0 a -1e-17)."""
    if kl.size == 0:
        raise Q4KError("no token to audit (the data is empty, or no position is before a response token)")
    kl = np.maximum(kl, 0.0)
    ppl = lambda nll: math.exp(min(float(np.mean(nll)), 700.0)) if nll.size else float("nan")   # noqa: E731
    report = {"tokens": int(kl.size), "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
              "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
              "top1_agreement": float(np.mean(agree)), "ppl_teacher": ppl(nll_teacher), "ppl_reference": ppl(nll_ref)}
    report.update(extra)
    if "seconds" in extra:
        report["tokens_per_s"] = report["tokens"] / max(extra["seconds"], 1e-9)
    return report


def report_text(r: dict) -> str:
    """The human form of the report."""
    return "\n".join([
        f"teacher   {r['teacher']}", f"reference {r['reference']}",
        f"tokens                   {r['tokens']:,}",
        f"KL(reference || teacher) mean {r['kl_mean']:.6f}  median {r['kl_median']:.6f}  "
        f"p99 {r['kl_p99']:.6f}  max {r['kl_max']:.6f} nats/token",
        f"top-1 agreement          {100 * r['top1_agreement']:.2f} %",
        f"perplexity               teacher {r['ppl_teacher']:.4f}  reference {r['ppl_reference']:.4f}"])
