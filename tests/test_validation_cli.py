"""Issue 14 through the command line: every class of hostile input ends in exit status 2 and one
line naming the problem (or a correct result), never a traceback, a hang or a silent wrong answer.

Each case runs `python -m q4kdistill ...` as a user would; cases run in parallel processes.
Classes: 1 config vs tensors, 2 tokenizer metadata, 3 NaN, 4 checkpoints, 5 configs and flags,
6 metrics.jsonl, 7 output paths, 8 shard ids, 9 Ctrl-C, 10 unbounded work.
"""
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from q4kdistill.formats import synthetic
from q4kdistill.formats.model_file import ModelFile
from q4kdistill.train import checkpoint
from q4kdistill.train.loop import DistillConfig
from conftest import traced_peak

DENSE = dict.fromkeys(("*", "attn_v", "ffn_down", "output", "token_embd"), "F32")
SMALL = dict(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(*args, limit_file_bytes=None):
    def limit():
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))
    return subprocess.Popen([sys.executable, "-m", "q4kdistill", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=limit)


def run_cases(cases, capsys, through_process=1):
    """cases: [(args, phrase)] -> each must exit 2 with one line holding ``phrase``.

    The first ``through_process`` cases run as `python -m q4kdistill` (what a user runs), the rest
    through ``cli.main`` in this process (the same code after start-up, without 2 s of imports each)."""
    from q4kdistill import cli

    procs = [start(*args) for args, _ in cases[:through_process]]
    for i, (args, phrase) in enumerate(cases):
        if i < through_process:
            _, err = procs[i].communicate(timeout=300)
            status = procs[i].returncode
        else:
            capsys.readouterr()
            try:
                status = cli.main([str(a) for a in args])
            except SystemExit as exc:             # argparse's own errors leave through parser.exit
                status = exc.code
            err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if not line.startswith("teacher: ")]
        assert status == 2 and len(lines) == 1, (args, status, err[-2000:])
        assert lines[0].startswith("q4kdistill: error: ") and phrase in lines[0], (args, lines[0])


# -- files ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-block gemma3 teacher, F32 weights, its 384-token tokenizer."""
    d = tmp_path_factory.mktemp("tiny")
    return synthetic.write_gguf(d / "tiny.gguf", synthetic.tiny_config("gemma3", **SMALL), qtypes=DENSE, seed=3)


def variant(src, dst, meta=None, drop=(), tensors=None):
    """A copy of GGUF ``src`` with metadata keys changed (None: removed), tensors dropped or replaced."""
    mf = ModelFile.open(src)
    md = dict(mf.metadata)
    for key, value in (meta or {}).items():
        md.pop(key, None) if value is None else md.__setitem__(key, value)
    out = []
    for name in mf.tensors:
        if name in drop:
            continue
        data = (tensors or {}).get(name, np.array(mf.tensor_data(name)))
        out.append((name, data))
    return synthetic.write_file(dst, md, out)


def student_checkpoint(run_dir, teacher, cfg=None, params=None, meta_edit=None):
    """A distill checkpoint of a 1-block student of ``teacher`` (made directly, no training)."""
    cfg = cfg or ModelFile.open(teacher).config.replace(n_layers=1, swa_layers=[0])
    shapes = cfg.tensor_shapes()
    rng = np.random.default_rng(0)
    params = params or {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    n = sum(int(np.prod(s)) for s in shapes.values())
    state = {"params": params, "optimizer": {"steps": 1, "m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32),
                                             "config": {}},
             "data": {"seed": 0, "position": 3}, "evals": {"0": {"teacher_kl": 1.0, "student_ppl": 9.0,
                                                                 "top1_agreement": 0.1, "tokens": 8}}}
    config = {"distill": DistillConfig(teacher=str(teacher), data="x").to_dict(), "student": cfg.to_dict()}
    path = checkpoint.save(run_dir, step=1, state=state, config=config, fingerprint={"seq": 8})
    if meta_edit is not None:
        rewrite_meta(path, meta_edit)
    return path


def rewrite_meta(path, edit):
    """Rewrite a checkpoint's __meta__ JSON through ``edit(meta)`` (the members stay as they are)."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(np.load(io.BytesIO(members["__meta__.npy"])).tobytes())
    edit(meta)
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(meta).encode(), np.uint8))
    members["__meta__.npy"] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for n, raw in members.items():
            z.writestr(n, raw)


# -- 1 and 2: the model file against itself --------------------------------------------------------

def test_config_tokenizer_and_nan_in_model_files(tiny, tmp_path, capsys):
    a = "gemma3"
    norm = "blk.0.attn_norm.weight"
    nan_norm = np.ones(64, np.float32)
    nan_norm[5] = np.nan
    files = {
        "heads": (variant(tiny, tmp_path / "heads.gguf", {f"{a}.attention.head_count": 8}), "has shape"),
        "keylen": (variant(tiny, tmp_path / "k.gguf", {f"{a}.attention.key_length": 128,
                                                       f"{a}.attention.value_length": 128}), "has shape"),
        "normlen": (variant(tiny, tmp_path / "n.gguf", tensors={norm: np.ones(32, np.float32)}), norm),
        "nohead": (variant(tiny, tmp_path / "e.gguf", drop=("token_embd.weight",)), "missing 1 tensors (token_embd.weight)"),
        "bos_big": (variant(tiny, tmp_path / "b.gguf", {"tokenizer.ggml.bos_token_id": 4_000_000_000}), "bos_token_id"),
        "bos_neg": (variant(tiny, tmp_path / "bn.gguf", {"tokenizer.ggml.bos_token_id": -5}), "bos_token_id"),
        "scores": (variant(tiny, tmp_path / "s.gguf", {"tokenizer.ggml.scores": [0.0] * 10}), "tokenizer.ggml.scores"),
        "tokint": (variant(tiny, tmp_path / "t.gguf", {"tokenizer.ggml.tokens": list(range(384))}), "tokenizer.ggml.tokens"),
        "eps": (variant(tiny, tmp_path / "eps.gguf", {f"{a}.attention.layer_norm_rms_epsilon": -1.0}), "epsilon"),
        "nan": (variant(tiny, tmp_path / "nan.gguf", tensors={norm: nan_norm}), "non-finite value at index 5"),
    }
    cases = []
    for name, (path, phrase) in files.items():
        cases.append((("logits", "--teacher", path, "--tokens", "1,2,3"), phrase))
        if name in ("bos_neg", "tokint", "scores"):            # the tokenizer alone (it printed token -5)
            cases.append((("tokenize", "--teacher", path, "hello"), phrase))
        if name in ("heads", "nohead", "bos_big", "scores"):   # header only: summarised arrays keep their length
            cases.append((("plan", "--teacher", path), phrase))
            cases.append((("inspect", path), phrase))
    # the same through a manifest and an APR file
    manifest = json.loads(json.dumps(ModelFile.open(tiny, header_only=True).to_manifest()))
    manifest["metadata"][f"{a}.attention.head_count"] = 8
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    cases.append((("plan", "--teacher", tmp_path / "m.json"), "has shape"))
    cases.append((("logits", "--teacher", tmp_path / "m.json", "--tokens", "1"), "has shape"))
    cases.append((("convert", files["heads"][0], tmp_path / "h.apr"), "has shape"))
    run_cases(cases, capsys, through_process=1)
    assert not (tmp_path / "h.apr").exists()


def test_the_valid_files_still_work(tiny, tmp_path, capsys):
    """The checks refuse nothing good: the tiny teacher and its APR copy give the same logits."""
    from q4kdistill import cli

    assert cli.main(["convert", str(tiny), str(tmp_path / "t.apr")]) == 0
    got = []
    for src in (tiny, tmp_path / "t.apr"):
        capsys.readouterr()
        assert cli.main(["logits", "--teacher", str(src), "--tokens", "1,2,3", "--json"]) == 0
        got.append(json.loads(capsys.readouterr().out)["positions"])
    assert got[0] == got[1] and len(got[0]) == 3


# -- 4: checkpoints ---------------------------------------------------------------------------------

def test_hostile_checkpoints(tiny, tmp_path, capsys):
    good = student_checkpoint(tmp_path / "good", tiny)
    raw = open(good, "rb").read()
    cases = []

    def case(name, data, phrase):
        d = tmp_path / name
        d.mkdir()
        (d / "checkpoint.npz").write_bytes(data)
        cases.append((("export", "--checkpoint", d, "--out", tmp_path / f"{name}.gguf"), phrase))

    case("cut", raw[: len(raw) // 2], "not a readable q4kdistill checkpoint")
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    case("flip", bytes(flipped), "checkpoint")
    student_checkpoint(tmp_path / "nofp", tiny, meta_edit=lambda m: m.pop("fingerprint"))
    cases.append((("export", "--checkpoint", tmp_path / "nofp", "--out", tmp_path / "nofp.gguf"), "'fingerprint'"))
    cfg = ModelFile.open(tiny).config.replace(n_layers=1, swa_layers=[0])
    shapes = cfg.tensor_shapes()
    wrong = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    wrong["token_embd.weight"] = np.zeros((384, 1), np.float32)
    student_checkpoint(tmp_path / "shape", tiny, params=wrong)
    cases.append((("export", "--checkpoint", tmp_path / "shape", "--out", tmp_path / "shape.gguf"), "token_embd.weight"))
    nan = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    nan["blk.0.ffn_up.weight"][3, 7] = np.inf
    student_checkpoint(tmp_path / "nan", tiny, params=nan)
    cases.append((("export", "--checkpoint", tmp_path / "nan", "--out", tmp_path / "nan.gguf"),
                  "tensor blk.0.ffn_up.weight holds inf at index [3, 7]"))
    # a small file holding a member that inflates to 256 MiB: refused before decompressing
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(bomb / "checkpoint.npz", "w", zipfile.ZIP_DEFLATED) as out:
        for n in z.namelist():
            out.writestr(n, z.read(n), compress_type=zipfile.ZIP_STORED)
        with out.open("/params/extra.npy", "w", force_zip64=True) as f:
            chunk = bytes(1 << 24)
            for _ in range(16):
                f.write(chunk)
    assert os.path.getsize(bomb / "checkpoint.npz") < 8 << 20
    cases.append((("export", "--checkpoint", bomb, "--out", tmp_path / "bomb.gguf"), "compressed"))
    # the teacher path a checkpoint names is opened only if it is a regular file (a FIFO would block)
    fifo = tmp_path / "teacher.fifo"
    os.mkfifo(fifo)
    student_checkpoint(tmp_path / "fifo", tiny, meta_edit=lambda m: m["config"]["distill"].update(teacher=str(fifo)))
    cases.append((("export", "--checkpoint", tmp_path / "fifo", "--out", tmp_path / "fifo.gguf"), "not a regular file"))
    run_cases(cases, capsys, through_process=1)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.part"))
    # and the good one exports
    r = subprocess.run([sys.executable, "-m", "q4kdistill", "export", "--checkpoint", tmp_path / "good", "--out",
                        tmp_path / "good.gguf"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ModelFile.open(tmp_path / "good.gguf").config.tensor_shapes() == cfg.tensor_shapes()


def test_bomb_is_refused_with_little_memory(tiny, tmp_path):
    """The member list is checked before anything is decompressed: a bounded peak in-process."""

    good = student_checkpoint(tmp_path / "good", tiny)
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / "b.npz", "w") as out:
        for n in z.namelist():
            out.writestr(n, z.read(n))
        with out.open("/params/token_embd.weight.npy.x", "w", force_zip64=True) as f:
            f.write(bytes(1 << 20))
    with traced_peak() as traced, pytest.raises(Exception, match="unexpected member"):
        checkpoint.load_student(tmp_path / "b.npz")
    peak = traced()
    assert peak < 4 << 20


# -- 5: configs and flags ------------------------------------------------------------------------------

def test_configs_and_flags_are_typed(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    base = ["distill", "--teacher", tiny, "--data", data, "--out", tmp_path / "o"]
    cases = []
    for i, (settings, phrase) in enumerate([({"steps": "ten"}, "steps"), ({"seq": None}, "seq"),
                                            ({"eval_every": 0}, "eval_every"), ({"truncate_vocab": "no"}, "truncate_vocab"),
                                            ({"lr": float("nan")}, "lr"), ({"stepz": 3}, "unknown setting"),
                                            ({"student_layers": [0, "a"]}, "student_layers")]):
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps(settings))
        cases.append(((*base, "--config", path), phrase))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases.append(((*base, "--config", deep), "nested too deeply"))
    for flags, phrase in [(("--eval-every", "0"), "--eval-every"), (("--seed", "-1"), "--seed"),
                          (("--student-layers", "a,b"), "--student-layers"), (("--steps", "1e3"), "--steps"),
                          (("--no-such-flag",), "unrecognized arguments")]:
        cases.append(((*base, *flags), phrase))
    cases += [(("logits", "--teacher", tiny, "--tokens", "2,99999999999999999999999"), "--tokens"),
              (("logits", "--teacher", tiny, "--tokens", "2,384"), "outside the teacher's vocabulary"),
              (("generate", "--teacher", tiny, "--tokens", "2", "-n", "-3"), "-n"),
              (("plan", "--teacher", tiny, "--student", "n_heads=0"), "n_heads=0"),
              (("plan", "--teacher", tiny, "--batch", "0"), "--batch"),
              (("plan", "--teacher", tiny, "--student", "n_layers=1000000,d_model=64"), "n_layers=1000000")]
    run_cases(cases, capsys, through_process=1)


# -- 6: metrics.jsonl, 8: shard ids (in-process: a real run) ------------------------------------------

def test_partial_metrics_line_and_wide_shard_ids(tiny, tmp_path, capsys):
    from q4kdistill import cli

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(data / f"s{i}.npy", rng.integers(0, 384, 400).astype(np.int64))
    out = tmp_path / "run"
    args = ["distill", "--teacher", tiny, "--data", data, "--out", out, "--student-layers", "0", "--steps", "2",
            "--batch", "2", "--seq", "8", "--eval-every", "1", "--eval-batches", "1", "--save-every", "1",
            "--no-progress"]
    assert cli.main(list(map(str, args))) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')                     # what a crash mid-write leaves
    assert cli.main(list(map(str, args[:-3] + ["--steps", "3", "--resume", "--no-progress"]))) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # a torn checkpoint is one line on --resume too (and the run directory is left as it was)
    ck = out / "checkpoint.npz"
    ck.write_bytes(ck.read_bytes()[:-100])
    capsys.readouterr()
    assert cli.main(list(map(str, args[:-3] + ["--steps", "4", "--resume", "--no-progress"]))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable q4kdistill checkpoint" in err[0], err
    # int64 ids >= 2^32 would wrap to small ids in uint32: refused by value
    np.save(data / "s0.npy", np.array([1, 2, 2 ** 32 + 5] * 100, np.int64))
    assert cli.main(list(map(str, args[:-3] + ["--out", tmp_path / "run2", "--no-progress"]))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token id 4294967301 at index 2 is outside uint32" in err[0], err


# -- 7: output paths ------------------------------------------------------------------------------------

def test_output_paths(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [(("logits", "--teacher", tiny, "--tokens", "1", "--out", folder), "is a folder"),
             (("logits", "--teacher", tiny, "--tokens", "1", "--out", afile / "lg.npy"), "is not a folder"),
             (("logits", "--teacher", tiny, "--tokens", "1", "--out", tmp_path / "missing" / "lg.npy"), "does not exist"),
             (("convert", tiny, afile / "x.apr"), "is not a folder"),
             (("convert", tiny, tmp_path / "missing" / "x.json"), "does not exist"),
             (("distill", "--teacher", tiny, "--data", tiny, "--out", afile), "exists and is not a folder"),
             (("distill", "--teacher", tiny, "--data", tiny, "--out", afile / "run"), "is not a folder")]
    ck = student_checkpoint(tmp_path / "ck", tiny)
    cases.append((("export", "--checkpoint", os.path.dirname(ck), "--out", folder), "is a folder"))
    run_cases(cases, capsys)
    # a full disk (here: a file-size limit) is one line, and the previous output survives
    (tmp_path / "old.apr").write_bytes(b"previous")
    (tmp_path / "old.gguf").write_bytes(b"previous")
    procs = [start("convert", tiny, tmp_path / "old.apr", limit_file_bytes=4096),
             start("export", "--checkpoint", os.path.dirname(ck), "--out", tmp_path / "old.gguf", limit_file_bytes=4096)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], err
    assert (tmp_path / "old.apr").read_bytes() == b"previous" and (tmp_path / "old.gguf").read_bytes() == b"previous"
    assert not list(tmp_path.glob("*.part"))
    # logits --out writes and reports the very path it was given
    r = subprocess.run([sys.executable, "-m", "q4kdistill", "logits", "--teacher", tiny, "--tokens", "1,2",
                        "--out", tmp_path / "lg"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'lg'}:" in r.stdout and np.load(tmp_path / "lg").shape == (2, 384)
    assert not (tmp_path / "lg.npy").exists()


# -- 9: Ctrl-C -------------------------------------------------------------------------------------------

# The console script, with a "go" once the handler that q4kdistill/__init__.py installs first is
# in place (the same function, run from its file): what comes before our first line is Python's.
CONSOLE = ("import runpy, sys; sys.argv[0] = 'q4kdistill'; runpy.run_path('q4kdistill/interrupts.py')['install_early'](); "
           "print('go', file=sys.stderr, flush=True); from q4kdistill.cli import main; sys.exit(main())")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_ctrl_c_at_any_moment(tiny, delay):
    """SIGINT once our first line has run (as the console script), at a spread of moments through
    the imports and the work: exit 130 and the one line, or (too late) a finished run."""
    p = subprocess.Popen([sys.executable, "-c", CONSOLE, "logits", "--teacher", tiny, "--tokens", "1,2,3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stderr.readline() == "go\n"
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    lines = [line for line in err.splitlines() if not line.startswith("teacher: ")]
    if p.returncode == 0:
        assert not lines and "pos" in out
    elif p.returncode == -signal.SIGINT:
        # the signal landed while the interpreter was tearing down (it puts the default handlers back
        # then): killed by SIGINT, which a shell reports as status 130; still no traceback, no line
        assert not [line for line in lines if "Traceback" in line or "Error" in line], err[-2000:]
    else:
        assert p.returncode == 130 and lines == ["q4kdistill: interrupted"], (p.returncode, err[-2000:])


# -- 10: unbounded work from small input ---------------------------------------------------------------

def test_small_input_cannot_ask_for_unbounded_work(tiny, tmp_path, capsys):
    manifest = ModelFile.open(tiny, header_only=True).to_manifest()
    manifest["tensors"].append({"name": "huge", "shape_ggml": [20000, 20000], "type": "F32"})
    manifest.pop("total_tensor_bytes")
    (tmp_path / "huge.json").write_text(json.dumps(manifest))
    wide = ModelFile.open(tiny, header_only=True).to_manifest()
    wide["metadata"]["gemma3.block_count"] = 1_000_000
    wide.pop("total_tensor_bytes")
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    t0 = time.perf_counter()
    run_cases([(("logits", "--teacher", tmp_path / "huge.json", "--tokens", "1"), "huge"),
               (("plan", "--teacher", tmp_path / "wide.json"), "1000000 blocks")], capsys, through_process=0)
    assert time.perf_counter() - t0 < 60
