"""Reference codecs for GGML's block formats, in NumPy and vectorised over blocks.

    dequantize(data, qtype)  raw GGUF bytes uint8 [rows, row_bytes] -> float32 [rows, cols]
    quantize(array, qtype)   float [rows, cols] -> raw GGUF bytes uint8 [rows, row_bytes]
    random_blocks(qtype, rows, cols, rng)  valid random bytes, for synthetic teachers

Organised like gguf-py's quants.py: one codec class per type, named like the
``GGMLQuantizationType`` member and registered by ``__init_subclass__``. Each class works on
``(n_blocks, type_size)`` byte arrays and ``(n_blocks, block_size)`` float arrays only; the
module functions deal with shapes, chunking and errors. Where each field of a block sits (and
the bit diagrams) is block_layouts.py's table, which the kernels share: the codecs read and
write fields by name (``cls.field(blocks, "qs")``, ``cls.assemble(d=..., qs=...)``).

* Decoding is bit-exact against ``gguf.quants.dequantize`` (same float32 operations in the
  same order: ``(d * sc) * q - dmin * m`` for Q4_K, ``(d * sc) * q`` for Q6_K).
* Q4_K and Q6_K encoding are ports of llama.cpp's ``quantize_row_q4_K_ref`` and
  ``quantize_row_q6_K_ref`` (ggml-quants.c; what ``llama-quantize`` runs without an imatrix).
  Sums run left to right in float32 like the C loops (``np.cumsum``; ``np.sum`` is pairwise),
  so the bytes match llama.cpp's (tests/test_quants_quality.py checks against its library).
* Q8_0, Q5_0 and Q4_0 encoding follow ``quantize_row_q8_0_ref`` & co.; F32/F16/BF16 are plain
  casts (BF16 rounds to nearest even, NaNs kept quiet, like ggml).
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import Q4KError
from .block_layouts import LAYOUTS

QK_K = 256                      # weights per K-quant super-block
_CHUNK_WEIGHTS = 1 << 18        # weights decoded/encoded per step (temporaries stay in cache)
_RANDOM_CHUNK_BYTES = 4 << 20   # random_blocks works in pieces that stay in cache
_F32 = np.float32
_TYPE_NUMBERS = {int(t) for t in GGMLQuantizationType}


# ----------------------------------------------------------------------------- type helpers

def qtype(x) -> GGMLQuantizationType:
    """A GGMLQuantizationType from the enum itself, its name ("Q4_K", "q4_k") or its number."""
    supported = ", ".join(t.name for t in QTYPES)
    if isinstance(x, GGMLQuantizationType):
        q = x
    elif isinstance(x, str) and x.upper() in GGMLQuantizationType.__members__:
        q = GGMLQuantizationType[x.upper()]
    elif isinstance(x, (int, np.integer)) and not isinstance(x, bool) and int(x) in _TYPE_NUMBERS:
        q = GGMLQuantizationType(int(x))
    else:
        raise Q4KError(f"unknown quant type {x!r} (supported: {supported})")
    if q not in _CODECS:
        raise Q4KError(f"quant type {q.name} is not supported (supported: {supported})")
    return q


def block_size(q) -> int:
    """Weights per block (256 for K-quants, 32 for Q8_0/Q5_0/Q4_0, 1 for float types)."""
    return GGML_QUANT_SIZES[qtype(q)][0]


def type_size(q) -> int:
    """Bytes per block (Q4_K: 144, Q6_K: 210, Q8_0: 34, F32: 4)."""
    return GGML_QUANT_SIZES[qtype(q)][1]


def row_bytes(q, cols: int) -> int:
    """Bytes of one row of ``cols`` weights; Q4KError unless cols is a whole number of blocks."""
    q = qtype(q)
    bs, ts = GGML_QUANT_SIZES[q]
    if cols < 0 or cols % bs:
        raise Q4KError(f"{q.name} rows need a multiple of {bs} values, got {cols}")
    return cols // bs * ts


def is_quantized(q) -> bool:
    """True for block formats (Q4_K, Q6_K, Q8_0, ...), False for F32/F16/BF16."""
    return qtype(q) not in _FLOAT_TYPES


# ----------------------------------------------------------------------------- shared pieces

def _fp16_bits(x) -> np.ndarray:
    """float32 [n] -> the uint8 [n, 2] of its fp16 (round to nearest even, like GGML_FP32_TO_FP16)."""
    return np.asarray(x, _F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _fp16_at(blocks, offset) -> np.ndarray:
    """The fp16 field at byte ``offset`` of every block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view("<f2").astype(_F32)


def _nibbles(b) -> np.ndarray:
    """uint8 [..., k] -> [..., 2, k]: low nibbles, then high nibbles."""
    return np.stack([b & 0x0F, b >> 4], axis=-2)


def _nearest_int(x) -> np.ndarray:
    """ggml's nearest_int: round half to even (the 12582912.f trick), kept as float32."""
    return np.rint(x)


def _reciprocal(d) -> np.ndarray:
    """The C's ``id = d ? 1.0f/d : 0.0f``, elementwise in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, _F32(0), _F32(1) / d)


def _seq_sum(a) -> np.ndarray:
    """Sum [k, m] -> [m] over the first axis, one row after the other like the C loops.

    NumPy reduces an outer axis row by row (pairwise summation is only used along the
    contiguous axis), so this rounds exactly like ``for (i...) sum += a[i]`` in float32.
    """
    return np.add.reduce(a, axis=0, dtype=_F32)


def _random_bytes(n, rng) -> np.ndarray:
    """n uniformly random bytes (uint32 draws are the fastest path in NumPy's Generator)."""
    words = rng.integers(0, 1 << 32, size=(n + 3) // 4, dtype=np.uint32)
    return words.view(np.uint8)[:n]


def _random_fp16(n, d_range, rng) -> np.ndarray:
    """n positive fp16 scales spread log-uniformly over d_range, as their bits uint16 [n].

    Positive fp16 values sort like their bit patterns, so uniform bit patterns between the
    two ends are valid, finite and roughly log-uniform - and cost one integer draw each.
    """
    lo, hi = (int(v) for v in np.array(d_range, "<f2").view(np.uint16))
    return rng.integers(lo, hi + 1, size=n, dtype=np.uint16)


# ----------------------------------------------------------------------------- codec registry

_CODECS: dict[GGMLQuantizationType, type["Codec"]] = {}


class Codec:
    """One GGML type: decode_blocks / encode_blocks over whole blocks, random_blocks for tests."""

    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    layout = None                          # block_layouts.BlockLayout of a block type (None: float types)
    fp16_offsets: tuple[int, ...] = ()     # byte offsets of the fp16 scales (d, then dmin); d comes first
    d_range: tuple[float, float]           # random_blocks' range for d: decoded std ~ 0.02

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        if qtype.name in LAYOUTS:
            cls.layout = LAYOUTS[qtype.name]
            cls.fp16_offsets = tuple(cls.layout.at(f.name) for f in cls.layout.fields if f.name in ("d", "dmin"))
        _CODECS[qtype] = cls

    @classmethod
    def field(cls, blocks: np.ndarray, name: str) -> np.ndarray:
        """The bytes of field `name` of every block: uint8 [n, size] (a view)."""
        o = cls.layout.at(name)
        return blocks[:, o:o + cls.layout.size(name)]

    @classmethod
    def assemble(cls, **fields) -> np.ndarray:
        """uint8 [n, type_size] from the bytes of every field (uint8 [n, size] each), in layout order."""
        assert set(fields) == {f.name for f in cls.layout.fields}, (cls.__name__, set(fields))
        parts = [fields[f.name] for f in cls.layout.fields]
        assert all(p.shape[-1] == f.size for p, f in zip(parts, cls.layout.fields)), cls.__name__
        return np.concatenate(parts, axis=-1)

    @classmethod
    def decode_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """uint8 [n, type_size] -> float32 [n, block_size]"""
        raise NotImplementedError

    @classmethod
    def encode_blocks(cls, x: np.ndarray) -> np.ndarray:
        """float32 [n, block_size] -> uint8 [n, type_size]"""
        raise NotImplementedError

    @classmethod
    def random_blocks(cls, n: int, rng, d_range=None) -> np.ndarray:
        """n random valid blocks, uint8 [n, type_size]: random quants, finite fp16 scales."""
        blocks = _random_bytes(n * cls.type_size, rng).reshape(n, cls.type_size)
        blocks.view("<u2")[:, cls.fp16_offsets[0] // 2] = _random_fp16(n, d_range or cls.d_range, rng)
        return blocks


class F32(Codec, qtype=GGMLQuantizationType.F32):
    """F32: one little-endian float32 per block."""

    dtype = "<f4"
    d_range = (0.0, 0.02)                  # float types: random values with std d_range[1]

    @classmethod
    def decode_blocks(cls, blocks):
        return blocks.view(cls.dtype).astype(_F32, copy=False)

    @classmethod
    def encode_blocks(cls, x):
        return x.astype(cls.dtype).view(np.uint8)

    @classmethod
    def random_blocks(cls, n, rng, d_range=None):
        """Gaussian values with std d_range[1], never NaN or inf."""
        std = (d_range or cls.d_range)[1]
        x = (rng.standard_normal(n, dtype=_F32) * _F32(std)).reshape(n, 1)
        return cls.encode_blocks(x)


class F16(F32, qtype=GGMLQuantizationType.F16):
    dtype = "<f2"


class BF16(F32, qtype=GGMLQuantizationType.BF16):
    """bfloat16: the top 16 bits of a float32."""

    @classmethod
    def decode_blocks(cls, blocks):
        return (blocks.view("<u2").astype(np.uint32) << 16).view(_F32)

    @classmethod
    def encode_blocks(cls, x):
        # same as ggml_compute_fp32_to_bf16: NaN -> quiet NaN, else round to nearest even
        n = x.astype(_F32).view(np.uint32)
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        rounded = (n.astype(np.uint64) + 0x7FFF + ((n >> 16) & 1)) >> 16
        bits = np.where(nan, (n >> 16) | 0x40, rounded).astype("<u2")
        return bits.view(np.uint8)


class Q8_0(Codec, qtype=GGMLQuantizationType.Q8_0):
    d_range = (1.5e-4, 4e-4)

    @classmethod
    def decode_blocks(cls, blocks):
        d = _fp16_at(blocks, cls.fp16_offsets[0])
        return cls.field(blocks, "qs").view(np.int8).astype(_F32) * d

    @classmethod
    def encode_blocks(cls, x):
        d = np.abs(x).max(axis=-1, keepdims=True) / _F32(127)
        inv = _reciprocal(d)
        v = (x * inv).astype(np.float64)                    # exact; roundf = half away from 0
        qs = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)
        return cls.assemble(d=_fp16_bits(d), qs=qs.view(np.uint8))


class Q4_0(Codec, qtype=GGMLQuantizationType.Q4_0):
    bits, d_range = 4, (2.5e-3, 7e-3)

    @classmethod
    def _unsigned_quants(cls, blocks):
        return _nibbles(cls.field(blocks, "qs")).reshape(-1, 32)     # [n, 32] in 0..15

    @classmethod
    def decode_blocks(cls, blocks):
        q = cls._unsigned_quants(blocks).astype(np.int8) - np.int8(1 << (cls.bits - 1))
        return _fp16_at(blocks, cls.fp16_offsets[0]) * q.astype(_F32)

    @classmethod
    def encode_blocks(cls, x):
        # d = -max/2^(bits-1) where max is the value of largest magnitude; q = (int)(x/d + half + 0.5)
        half = 1 << (cls.bits - 1)
        imax = np.abs(x).argmax(axis=-1)[:, None]
        d = np.take_along_axis(x, imax, axis=-1) / _F32(-half)
        inv = _reciprocal(d)
        q = np.minimum(np.trunc(x * inv + _F32(half + 0.5)), 2 * half - 1).astype(np.uint8)
        return cls.assemble(d=_fp16_bits(d), **cls._pack(q))

    @classmethod
    def _pack(cls, q):
        """Quants uint8 [n, 32] -> the quant fields, {name: uint8 [n, size]}."""
        return {"qs": q[:, :16] | (q[:, 16:] << 4)}


class Q5_0(Q4_0, qtype=GGMLQuantizationType.Q5_0):
    bits, d_range = 5, (1.2e-3, 3.5e-3)

    @classmethod
    def _unsigned_quants(cls, blocks):
        low = _nibbles(cls.field(blocks, "qs")).reshape(-1, 32)
        high = np.unpackbits(cls.field(blocks, "qh"), axis=-1, bitorder="little")   # bit j of qh, LE
        return low | (high << 4)

    @classmethod
    def _pack(cls, q):
        qh = np.packbits(q >> 4, axis=-1, bitorder="little")             # [n, 4] = u32 LE
        return {"qh": qh, **super()._pack(q & 0x0F)}


class Q4_K(Codec, qtype=GGMLQuantizationType.Q4_K):
    d_range = (3e-5, 1.3e-4)

    @staticmethod
    def get_scale_min(scales):
        """uint8 [n, 12] -> 6-bit (sc, m), each uint8 [n, 8]  (ggml's get_scale_min_k4; the bit
        diagram is block_layouts.Q4_K's)."""
        d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
        sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
        mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
        return sc, mn

    @staticmethod
    def pack_scale_min(sc, mn):
        """The inverse of get_scale_min: 6-bit sc, mn uint8 [n, 8] -> uint8 [n, 12]."""
        lo = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6)], axis=-1)
        return np.concatenate([lo, (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=-1)

    @classmethod
    def parts(cls, blocks):
        """(q, D, M): w = D q - M per sub-block; q float32 [n, 8, 32] in 0..15, D = d sc and M = dmin m
        float32 [n, 8, 1] (Q6_K.parts has the same form)."""
        n = blocks.shape[0]
        sc, mn = cls.get_scale_min(cls.field(blocks, "scales"))
        d = (_fp16_at(blocks, cls.fp16_offsets[0]) * sc.astype(_F32))[:, :, None]     # [n, 8, 1]
        dm = (_fp16_at(blocks, cls.fp16_offsets[1]) * mn.astype(_F32))[:, :, None]    # [n, 8, 1]
        q = _nibbles(cls.field(blocks, "qs").reshape(n, 4, 32)).reshape(n, 8, 32).astype(_F32)
        return q, d, dm

    @classmethod
    def decode_blocks(cls, blocks, round_scales=None):
        """round_scales: applied to the sub-block scales d * sc and dmin * m (float32) before use, to
        model a kernel that rounds them (kernels/gemm_wgmma_twin.decoded_as_kernel: to fp16)."""
        q, d, dm = cls.parts(blocks)
        if round_scales is not None:
            d, dm = round_scales(d), round_scales(dm)
        return (d * q - dm).reshape(blocks.shape[0], QK_K)

    @classmethod
    def encode_blocks(cls, x):
        # quantize_row_q4_K_ref: per sub-block a (scale, min) fit, then 6-bit scales/mins
        n = x.shape[0]
        xs = np.ascontiguousarray(x.reshape(n * 8, 32).T)                # [32, n*8]
        av_x = np.sqrt(_seq_sum(xs * xs) / _F32(32))
        weights = av_x + np.abs(xs)
        L, scales, mins = make_qkx2_quants(xs, weights, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
        scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.T.reshape(n, 8, 32)

        max_scale = np.maximum(scales.max(axis=-1), 0)[:, None]         # [n, 1]
        max_min = np.maximum(mins.max(axis=-1), 0)[:, None]
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
            inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
        ls, lm = cls._six_bits(inv_scale * scales), cls._six_bits(inv_min * mins)             # [n, 8]
        d_bits, dmin_bits = _fp16_bits(max_scale / _F32(63)), _fp16_bits(max_min / _F32(63))

        # requantize against the stored (fp16, 6-bit) scales; sub-blocks with d == 0 keep L
        d = (d_bits.view("<f2").astype(_F32) * ls.astype(_F32))[:, :, None]        # [n, 8, 1]
        dm = (dmin_bits.view("<f2").astype(_F32) * lm.astype(_F32))[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            requant = np.clip(_nearest_int((x.reshape(n, 8, 32) + dm) / d), 0, 15)
        L = np.where(d != 0, requant, L).astype(np.uint8)

        qs = L.reshape(n, 4, 2, 32)
        qs = (qs[:, :, 0] | (qs[:, :, 1] << 4)).reshape(n, 128)
        return cls.assemble(d=d_bits, dmin=dmin_bits, scales=cls.pack_scale_min(ls, lm), qs=qs)

    @staticmethod
    def _six_bits(v):
        """C: uint8_t l = nearest_int(v); l = MIN(63, l)  (the uint8 cast wraps, as in C)."""
        return np.minimum(_nearest_int(v).astype(np.int64) & 0xFF, 63).astype(np.uint8)

    @classmethod
    def random_blocks(cls, n, rng, d_range=None):
        # dmin = 7.5 d: with sc and m drawn alike, E[d*sc*q] = E[dmin*m], so weights centre on 0
        blocks = super().random_blocks(n, rng, d_range)
        halves = blocks.view("<u2")                                      # [n, 72]: d, dmin, ...
        d, dmin = (o // 2 for o in cls.fp16_offsets)
        halves[:, dmin] = (halves[:, d].view("<f2").astype(_F32) * _F32(7.5)).astype("<f2").view("<u2")
        return blocks


class Q6_K(Codec, qtype=GGMLQuantizationType.Q6_K):
    # the four lines of a half (block_layouts.Q6_K) are the axis of size 4 below
    d_range = (7e-6, 2e-5)
    _QH_SHIFTS = np.array([0, 2, 4, 6], np.uint8)[:, None]              # [4, 1]

    @classmethod
    def _quants(cls, blocks):
        """The 6-bit quants, 0..63, float32 [n, 16, 16] (sub-block s = 16 weights)."""
        n = blocks.shape[0]
        low = _nibbles(cls.field(blocks, "ql").reshape(n, 2, 64)).reshape(n, 2, 4, 32)      # [n, h, 4, l]
        high = (cls.field(blocks, "qh").reshape(n, 2, 1, 32) >> cls._QH_SHIFTS) & 3        # [n, h, 4, l]
        return (low | (high << 4)).reshape(n, 16, 16).astype(_F32)

    @classmethod
    def _scales(cls, blocks):
        return (_fp16_at(blocks, cls.fp16_offsets[0]) * cls.field(blocks, "scales").view(np.int8).astype(_F32))[:, :, None]

    @classmethod
    def parts(cls, blocks):
        """(q, D, M): w = D q - M per 16-weight sub-block, q float32 [n, 16, 16] in 0..63 (unsigned), D = d S
        float32 [n, 16, 1], M = 32 D (Q4_K.parts' form)."""
        d = cls._scales(blocks)
        return cls._quants(blocks), d, _F32(32) * d

    @classmethod
    def decode_blocks(cls, blocks, round_scales=None):
        """round_scales: as Q4_K's, applied to the sub-block scales d * S."""
        d = cls._scales(blocks)
        if round_scales is not None:
            d = round_scales(d)
        return (d * (cls._quants(blocks) - _F32(32))).reshape(blocks.shape[0], QK_K)

    @classmethod
    def encode_blocks(cls, x):
        # quantize_row_q6_K_ref: per 16-weight sub-block a symmetric scale, then int8 scales
        n = x.shape[0]
        L, scales = make_qx_quants(np.ascontiguousarray(x.reshape(n * 16, 16).T), nmax=32)
        scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)

        imax = np.abs(scales).argmax(axis=-1)[:, None]
        max_scale = np.take_along_axis(scales, imax, axis=-1)            # [n, 1], signed
        zero = np.abs(max_scale[:, 0]) < _F32(1e-15)                     # GROUP_MAX_EPS
        with np.errstate(divide="ignore"):
            iscale = np.where(zero[:, None], _F32(0), _F32(-128) / max_scale)
            d_bits = _fp16_bits(np.where(zero[:, None], _F32(0), _F32(1) / iscale))
        sc = np.minimum(_nearest_int(iscale * scales), 127).astype(np.int64).astype(np.int8)

        # requantize against the stored scales; sub-blocks with d == 0 keep L
        d = (d_bits.view("<f2").astype(_F32) * sc.astype(_F32))[:, :, None]       # [n, 16, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            requant = np.clip(_nearest_int(x.reshape(n, 16, 16) / d), -32, 31) + 32
        L = np.where(d != 0, requant, L).astype(np.uint8).reshape(n, 2, 4, 32)     # [n, h, 4, l]

        ql = (L[:, :, 0:2] & 0x0F) | ((L[:, :, 2:4] & 0x0F) << 4)                # [n, h, 2, l]
        qh = np.bitwise_or.reduce((L >> 4) << cls._QH_SHIFTS, axis=2)            # [n, h, l]
        blocks = cls.assemble(ql=ql.reshape(n, 128), qh=qh.reshape(n, 64), scales=sc.view(np.uint8), d=d_bits)
        blocks[zero] = 0                                                         # memset in the C
        return blocks


# ----------------------------------------------------------------------------- ggml's fitters

def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants (use_mad=false) for m sub-blocks of k weights at once.

    Fits x ~ scale * L - the_min with L in 0..nmax, minimising the w-weighted squared error over
    the starting scale and nstep + 1 nudged ones. x, w: float32 [k, m] (sub-blocks in columns,
    so sums over a sub-block run in C order). Returns (L float32 [k, m], scale [m], the_min [m]).
    """
    xmin = np.minimum(x.min(axis=0), 0)                                  # [m]
    xmax = x.max(axis=0)
    flat = xmax == xmin                                                  # C: all L = 0, scale 0
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)

    def fit(iscale, xmin):
        return np.clip(_nearest_int(iscale * (x - xmin)), 0, nmax)       # [k, m]

    def error(scale, xmin, L):
        return _seq_sum(w * np.square(scale * L + xmin - x))             # [m]

    iscale = _F32(nmax) / np.where(flat, _F32(1), xmax - xmin)
    scale = _F32(1) / iscale
    L = fit(iscale, xmin)
    best = error(scale, xmin, L)
    for step in range(nstep + 1):
        # as in the C, min (and so max - min) moves along with the best fit found so far
        span = np.where(flat, _F32(1), xmax - xmin)
        Laux = fit((_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / span, xmin)
        wl = w * Laux
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * Laux), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, _F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            err = error(this_scale, this_min, Laux)
        better = (D > 0) & (err < best) & ~flat
        L = np.where(better, Laux, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        xmin = np.where(better, this_min, xmin)
    L[:, flat] = 0
    return L, np.where(flat, _F32(0), scale), -xmin


def make_qx_quants(x, nmax):
    """ggml's make_qx_quants with rmse_type=1 (weights x^2) for m sub-blocks of k weights.

    Fits x ~ scale * (L - nmax) with L in 0..2*nmax-1, trying the starting scale -nmax/max
    and 18 nudged ones. x: float32 [k, m]. Returns (L float32 [k, m], scale [m]).
    """
    imax = np.abs(x).argmax(axis=0)[None]                                 # [1, m]
    xmax = np.take_along_axis(x, imax, axis=0)[0]                         # [m], signed
    zero = np.abs(xmax) < _F32(1e-15)                                     # GROUP_MAX_EPS
    xmax = np.where(zero, _F32(1), xmax)
    w = x * x

    def attempt(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)           # [k, m]
        return l, _seq_sum(w * x * l), _seq_sum(w * l * l)

    L, sumlx, suml2 = attempt(_F32(-nmax) / xmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        l, sumlx, suml2 = attempt(-(_F32(nmax) + _F32(0.1) * _F32(step)) / xmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        L = np.where(better, l, L)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    L = np.where(zero, _F32(0), L + nmax)
    return L, np.where(zero, _F32(0), scale)


# ----------------------------------------------------------------------------- public API

QTYPES = tuple(_CODECS)
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _codec(q) -> type[Codec]:
    return _CODECS[qtype(q)]


def _as_bytes(data, q) -> np.ndarray:
    """The raw bytes of ``data`` as uint8 [..., nbytes]: quantized data must be uint8 already;
    float data may also come typed (float32 for F32, float16 for F16, any 2-byte type for BF16)."""
    a = np.asarray(data)
    if a.dtype == np.uint8:
        return a
    if q in _FLOAT_TYPES and a.dtype.itemsize == type_size(q) and a.ndim >= 1:
        return np.ascontiguousarray(a).view(np.uint8)
    typed = f" or {type_size(q)}-byte values" if q in _FLOAT_TYPES else ""
    raise Q4KError(f"{q.name} data must be raw uint8 bytes{typed}, got {a.dtype}")


def dequantize(data, qtype, shape=None, round_scales=None) -> np.ndarray:
    """Raw GGUF bytes -> float32 weights.

    data: uint8 [..., row_bytes] as gguf's GGUFReader gives it (float types may also come as
          typed arrays), or a flat uint8 buffer together with ``shape``.
    shape: optional logical shape, e.g. (rows, cols); defaults to data.shape[:-1] + (cols,).
    round_scales: Q4_K / Q6_K only: a function applied to the float32 sub-block scales before use
          (to model a kernel that rounds them; None: the reference decode).
    """
    codec = _codec(qtype)
    q = codec.qtype
    raw = _as_bytes(data, q)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise Q4KError(f"{q.name}: shape must have at least one dimension")
        rb = row_bytes(q, shape[-1])
        if raw.size != rb * int(np.prod(shape[:-1])):
            raise Q4KError(f"{q.name} data of {raw.size} bytes does not hold shape {shape} ({rb} bytes a row)")
    else:
        if raw.ndim == 0 or raw.shape[-1] % codec.type_size:
            raise Q4KError(f"{q.name} rows must be whole blocks of {codec.type_size} bytes, "
                           f"got data of shape {raw.shape}")
        shape = raw.shape[:-1] + (raw.shape[-1] // codec.type_size * codec.block_size,)
    blocks = raw.reshape(-1, codec.type_size)                            # [n_blocks, type_size]
    out = np.empty((blocks.shape[0], codec.block_size), _F32)
    step = _CHUNK_WEIGHTS // codec.block_size
    if round_scales is not None and q.name not in ("Q4_K", "Q6_K"):
        raise Q4KError(f"round_scales applies to Q4_K and Q6_K, not {q.name}")
    kw = {} if round_scales is None else {"round_scales": round_scales}
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = codec.decode_blocks(blocks[i:i + step], **kw)
    return out.reshape(shape)


def quantize(array, qtype) -> np.ndarray:
    """float weights [..., cols] -> raw GGUF bytes uint8 [..., row_bytes]."""
    codec = _codec(qtype)
    q = codec.qtype
    x = np.asarray(array, dtype=_F32)
    if x.ndim == 0:
        raise Q4KError(f"cannot quantize a scalar to {q.name}: need an array of rows")
    rb = row_bytes(q, x.shape[-1])
    if q not in _FLOAT_TYPES and not np.isfinite(x).all():
        raise Q4KError(f"cannot quantize NaN or infinite values to {q.name}")
    blocks = np.ascontiguousarray(x).reshape(-1, codec.block_size)      # [n_blocks, block_size]
    out = np.empty((blocks.shape[0], codec.type_size), np.uint8)
    step = _CHUNK_WEIGHTS // codec.block_size
    with np.errstate(over="ignore"):                                    # checked just below
        for i in range(0, blocks.shape[0], step):
            out[i:i + step] = codec.encode_blocks(blocks[i:i + step])
    for off in codec.fp16_offsets:
        if not np.isfinite(_fp16_at(out, off)).all():
            raise Q4KError(f"values up to {np.abs(x).max():g} are too large for {q.name}: its fp16 scales overflow")
    return out.reshape(x.shape[:-1] + (rb,))


def random_blocks(qtype, rows: int, cols: int, rng=None, d_range=None) -> np.ndarray:
    """Random valid raw data uint8 [rows, row_bytes] for a (rows, cols) tensor.

    Quants are uniform random bits; the fp16 scale d is finite and spread log-uniformly over
    ``d_range`` (per-type defaults give decoded weights a std near 0.02, like real LLM
    weights; Q4_K's dmin is 7.5 d so they centre on 0). Float types get Gaussian values with
    std d_range[1] (default 0.02). About 1 GB/s on one CPU core.
    """
    codec = _codec(qtype)
    rb = row_bytes(codec.qtype, cols)
    if rows < 0:
        raise Q4KError(f"rows must be >= 0, got {rows}")
    rng = rng if rng is not None else np.random.default_rng()
    out = np.empty((rows * rb // codec.type_size, codec.type_size), np.uint8)   # [n_blocks, type_size]
    step = max(1, _RANDOM_CHUNK_BYTES // codec.type_size)               # cache-sized pieces
    for i in range(0, out.shape[0], step):
        out[i:i + step] = codec.random_blocks(min(step, out.shape[0] - i), rng, d_range)
    return out.reshape(rows, rb)
