"""Instruction data: JSONL records, the chat template (Jinja2, sandboxed), response spans, the
"trained" mask through packing, the loss and evaluation, `tokenize --chat`, and a distillation run."""
import json
import re

import numpy as np
import pytest

from q4kdistill import cli
from q4kdistill.errors import Q4KError
from q4kdistill.formats import synthetic
from q4kdistill.formats.tokenizer import Tokenizer
from q4kdistill.student.losses import LossConfig, distill_loss, token_weights
from q4kdistill.train import chat, checkpoint
from q4kdistill.train.corpus import TokenDataset, load_datasets, tokenize_files_masked

CONVERSATION = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."}]}


@pytest.fixture(scope="module")
def gemma_tok(gemma_path):
    return Tokenizer.from_gguf(gemma_path)


@pytest.fixture(scope="module")
def gemma_template(gemma_tok):
    return chat.ChatTemplate.for_teacher(gemma_tok, {}, chat.GEMMA_TEMPLATE)


def test_gemma_file_has_no_template_so_the_shipped_one_is_needed(gemma_path, gemma_tok, tmp_path, capsys):
    assert chat.load_template(gemma_path, gemma_tok, required=False) is None
    rec = tmp_path / "one.json"
    rec.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!"}))
    assert cli.main(["tokenize", "--teacher", gemma_path, "--chat", str(rec)]) == 2
    assert "--chat-template" in capsys.readouterr().err


def test_spans_are_the_assistant_turns_on_the_real_tokenizer(gemma_tok, gemma_template):
    messages = chat.record_messages(CONVERSATION, "test")
    ids, trained, text = chat.encode_conversation(gemma_tok, gemma_template, messages)
    assert text.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is")
    # the ids are the teacher's own tokenisation of the whole rendered text (cuts fall on turn markers)
    assert ids.tolist() == gemma_tok.encode(text, add_bos=False, parse_special=True)
    runs = [gemma_tok.decode(ids[m].tolist(), special=True) for m in _runs(trained)]
    assert runs == ["Paris.<end_of_turn>\n", "Rome, since 1871.<end_of_turn>\n"]
    assert ids[0] == gemma_tok.bos_id and trained[0] == 0 and len(ids) == len(trained)


def _runs(mask):
    """Index arrays of the runs of 1 in mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [np.arange(a, b) for a, b in zip(edges[::2], edges[1::2])]


def test_spans_match_transformers_generation_markers(gemma_template):
    """transformers' renderer (the outside reference) marks assistant text with {% generation %};
    our prefix/diff method must find the same character spans, from the template without markers."""
    rjt = pytest.importorskip("transformers.utils.chat_template_utils")
    marked = gemma_template.source.replace(
        "{{- '<start_of_turn>' ~ role ~ '\\n' ~ (first_user_prefix if loop.first else '') ~ (message['content'] | trim) ~ '<end_of_turn>\\n' -}}",
        "{{- '<start_of_turn>' ~ role ~ '\\n' ~ (first_user_prefix if loop.first else '') -}}"
        "{%- if message['role'] == 'assistant' -%}{%- generation -%}{{- (message['content'] | trim) ~ '<end_of_turn>\\n' -}}{%- endgeneration -%}"
        "{%- else -%}{{- (message['content'] | trim) ~ '<end_of_turn>\\n' -}}{%- endif -%}")
    assert marked != gemma_template.source
    messages = chat.record_messages(CONVERSATION, "test")
    rendered, indices = rjt.render_jinja_template([messages], chat_template=marked, return_assistant_tokens_mask=True,
                                                  bos_token="<bos>", eos_token="<eos>")
    text, spans = chat.response_spans(gemma_template, messages)
    assert rendered[0] == text
    assert [tuple(s) for s in indices[0]] == spans


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"', "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"text": "a"}', "needs 'messages' or both"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 must be"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "p", "completion": "c"}\n\n' + line + "\n")
    with pytest.raises(Q4KError, match=re.escape(f"{f}:3") + ".*" + re.escape(message)):
        chat.read_jsonl(f)


def test_template_errors_are_one_line(gemma_tok, gemma_template, tmp_path):
    with pytest.raises(Q4KError, match="failed to render.*roles must alternate"):
        chat.encode_conversation(gemma_tok, gemma_template, [{"role": "assistant", "content": "x"}], where="f:1")
    with pytest.raises(Q4KError, match="not a valid Jinja2 template"):
        chat.ChatTemplate("{% for %}")
    rewriting = chat.ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}"
                                  "{% if add_generation_prompt %}>>{% endif %}{{ messages | length }}")
    with pytest.raises(Q4KError, match="turn by turn"):
        chat.response_spans(rewriting, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    sandboxed = chat.ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Q4KError, match="failed to render"):   # the sandbox refuses attribute escapes
        sandboxed.render([{"role": "user", "content": "x"}])


# -- a synthetic teacher with a plain-word template ------------------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}you say {{ m.content }}\n"
            "{% else %}model says {{ m.content }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}model says {% endif %}")
SMALL = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    tok = synthetic.default_tokenizer("gemma3", synthetic.tiny_config("gemma3", **SMALL).vocab_size)
    tok["tokenizer.chat_template"] = TEMPLATE
    path = tmp_path_factory.mktemp("teacher") / "t.gguf"
    return synthetic.write_gguf(path, synthetic.tiny_config("gemma3", **SMALL), qtypes={"*": "F32"}, seed=2,
                                tokenizer=tok)


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)
    words = synthetic._WORDS
    for i in range(4):
        with open(root / f"c{i}.jsonl", "w") as f:
            for _ in range(12):
                say = lambda n: " ".join(rng.choice(words, n))   # noqa: E731
                f.write(json.dumps({"prompt": say(6), "completion": say(4)}) + "\n")
    (root / "plain.txt").write_text(" ".join(rng.choice(words, 200)))
    return root


def test_masks_flow_through_packing(chat_teacher, chat_corpus):
    tok = Tokenizer.from_gguf(chat_teacher)
    tmpl = chat.load_template(chat_teacher, tok)
    train, held = load_datasets(str(chat_corpus), 12, tok, held_out_paths=[str(chat_corpus / "c3.jsonl")], chat=tmpl)
    assert train.masks is not None and train.masks.shape == train.sequences.shape
    assert held.masks is not None and 0 < held.n_trained < held.n_tokens
    says = tok.encode("model says", add_bos=False)
    for seq, m in zip(train.sequences, train.masks):
        assert m[0] == 0                                        # BOS, inserted or not, is never a target
        for j in range(len(seq) - len(says)):
            if seq[j:j + len(says)].tolist() == says:
                assert not m[j:j + len(says)].any()              # the generation prompt is not trained
    ids, mask = chat.tokenize_chat_file(chat_corpus / "c0.jsonl", tok, tmpl)
    assert 0 < mask.sum() < len(mask)
    stream, both = tokenize_files_masked([chat_corpus / "plain.txt", chat_corpus / "c0.jsonl"], tok, chat=tmpl)
    n_plain = len(stream) - len(ids)
    assert np.all(both[:n_plain] == 1) and np.array_equal(both[n_plain:], mask)   # plain text: every id trained
    assert tokenize_files_masked([chat_corpus / "plain.txt"], tok, chat=tmpl)[1] is None
    same = TokenDataset(train.sequences.reshape(-1), 12, None)
    assert same.fingerprint != train.fingerprint                # the mask is part of the data identity


def test_loss_counts_only_positions_before_trained_ids():
    rng = np.random.default_rng(3)
    B, T, V = 2, 6, 7
    s, t = rng.standard_normal((B, T, V)), rng.standard_normal((B, T, V))
    ids = rng.integers(0, V, (B, T))
    lm = np.array([[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], np.uint8)
    w = token_weights(ids, None, LossConfig(alpha=0.5), lm)
    want = np.zeros((B, T), bool)
    want[:, :-1] = lm[:, 1:].astype(bool)
    assert np.array_equal(w["kd_mask"], want.reshape(-1)) and np.array_equal(w["ce_mask"], want.reshape(-1))
    loss, ds, parts = distill_loss(s, t, ids, None, LossConfig(alpha=0.5), loss_mask=lm)
    assert np.all(ds[~want] == 0) and np.any(ds[want] != 0)
    poisoned = s.copy()
    poisoned[~want] = 1e6                                       # untrained positions do not matter at all
    assert distill_loss(poisoned, t, ids, None, LossConfig(alpha=0.5), loss_mask=lm)[0] == pytest.approx(loss, rel=1e-12)
    full = distill_loss(s, t, ids, None, LossConfig(alpha=0.5))[0]
    assert full != pytest.approx(loss)


def test_tokenize_chat_json(chat_teacher, tmp_path, capsys):
    rec = tmp_path / "one.json"
    rec.write_text(json.dumps({"messages": [{"role": "user", "content": "hello world"},
                                            {"role": "assistant", "content": "the model"}]}))
    assert cli.main(["tokenize", "--teacher", chat_teacher, "--chat", str(rec), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ids", "trained", "text"} and len(out["ids"]) == len(out["trained"])
    assert out["text"] == "<bos>you say hello world\nmodel says the model\n"
    tok = Tokenizer.from_gguf(chat_teacher)
    trained = [i for i, t in zip(out["ids"], out["trained"]) if t]
    assert tok.decode(trained) == "the model\n"
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert cli.main(["tokenize", "--teacher", chat_teacher, "--chat", str(bad)]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err


def test_distill_on_chat_data_counts_only_responses(chat_teacher, chat_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["distill", "--teacher", chat_teacher, "--data", str(chat_corpus), "--out", str(out), "--student-layers", "1",
            "--steps", "3", "--batch", "2", "--seq", "12", "--eval-every", "3", "--eval-batches", "2",
            "--heldout", "0.4", "--no-progress", "--loss", "skl"]
    assert cli.main(argv) == 0
    assert "responses (trained)" in capsys.readouterr().out
    ck = checkpoint.load(out)
    ev = ck.state["evals"]["3"]
    assert 0 < ev["tokens"] < 2 * 2 * 12                      # only positions before response ids
    assert cli.main(argv[:-2] + ["--loss", "tvd", "--out", str(tmp_path / "tvd"), "--chat-template", str(tmp_path / "none.jinja")]) == 2
    assert "cannot read the chat template" in capsys.readouterr().err


def test_chat_data_through_a_teacher_cache(chat_teacher, chat_corpus, tmp_path, capsys):
    """The masks are stored in the cache with the sequences; training from it counts the same positions."""
    from q4kdistill.train.teacher_cache import TeacherCache

    cache = tmp_path / "cache"
    assert cli.main(["cache-teacher", "--teacher", chat_teacher, "--data", str(chat_corpus), "--out", str(cache),
                     "--top-k", "8", "--seq", "12", "--heldout", "0.4", "--no-progress"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    tok = Tokenizer.from_gguf(chat_teacher)
    train, held = load_datasets(str(chat_corpus), 12, tok, held_out=0.4, chat=chat.load_template(chat_teacher, tok))
    c = TeacherCache.open(cache)
    for name, d in (("train", train), ("heldout", held)):
        stored = c.dataset(name)
        assert np.array_equal(stored.sequences, d.sequences) and np.array_equal(stored.masks, d.masks)
    out = tmp_path / "run"
    assert cli.main(["distill", "--teacher", chat_teacher, "--teacher-cache", str(cache), "--out", str(out),
                     "--student-layers", "1", "--steps", "2", "--batch", "2", "--seq", "12", "--eval-every", "2",
                     "--eval-batches", "2", "--no-progress"]) == 0
    ev = checkpoint.load(out).state["evals"]
    want = sum(int(b.loss_mask[:, 1:].sum()) for b in held.in_order_batches(2, limit=4))
    assert ev["2"]["tokens"] == ev["0"]["tokens"] == want
