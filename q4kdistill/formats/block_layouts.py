"""Block layouts of the GGML quant types: the one description of where each field of a block sits.

The NumPy codecs (quants.py), the Numba decoders (kernels/decode.py, gemv_chunk.py, gemv_dp4a.py)
and the CUDA C (kernels/csrc/*, through the generated header kernels/csrc/block_layouts.cuh) all
take block sizes and field offsets from LAYOUTS, and the byte diagrams below are the only ones:

    LAYOUTS["Q4_K"].nbytes      144 bytes per block
    LAYOUTS["Q4_K"].weights     256 weights per block
    LAYOUTS["Q4_K"].at("qs")    16, byte offset of the field "qs"
    cuda_header()               the text of kernels/csrc/block_layouts.cuh (Q4_K_BYTES, Q4_K_QS, ...)

Regenerate the header after changing a layout (tests/test_quants.py checks that it is current):

    python -m q4kdistill.formats.block_layouts > kernels/csrc/block_layouts.cuh

Layouts follow ggml-common.h (block_q4_K, ...), gguf-py's quants.py and ggml-quants.c
(dequantize_row_*); the sizes are checked against gguf.GGML_QUANT_SIZES at import.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class Field:
    name: str       # "d", "dmin", "scales", "qs", "qh", "ql"
    size: int       # bytes
    what: str       # one line: its type and meaning


@dataclass(frozen=True)
class BlockLayout:
    name: str                   # "Q4_K", as GGMLQuantizationType names it
    weights: int                # weights per block
    fields: tuple               # Field, in byte order, no gaps
    diagram: str                # where each weight's bits sit, and the weight formula

    @property
    def nbytes(self) -> int:
        """Bytes per block."""
        return sum(f.size for f in self.fields)

    def at(self, field: str) -> int:
        """Byte offset of `field` in the block."""
        off = 0
        for f in self.fields:
            if f.name == field:
                return off
            off += f.size
        raise KeyError(f"{self.name} has no field {field!r} (fields: {', '.join(f.name for f in self.fields)})")

    def size(self, field: str) -> int:
        return next(f.size for f in self.fields if f.name == field)

    @property
    def c_name(self) -> str:
        """The prefix of this type's CUDA C functions: "q4k" for Q4_K."""
        return self.name.lower().replace("_", "")


Q4_K = BlockLayout("Q4_K", 256, (
    Field("d", 2, "fp16, super-block scale of the 6-bit sub-block scales"),
    Field("dmin", 2, "fp16, super-block scale of the 6-bit sub-block mins"),
    Field("scales", 12, "8 (scale, min) pairs of 6 bits, packed as drawn below"),
    Field("qs", 128, "256 4-bit quants, two per byte"),
), """\
8 sub-blocks s of 32 weights; weight = (d * sc[s]) * q - dmin * m[s], q in 0..15.
scales: bits of the 12 bytes (A..H = sc[0..7], a..h = m[0..7], 6 bits each; ggml's get_scale_min_k4):
    0 EEAAAAAA     4 eeaaaaaa     8 eeeeEEEE
    1 FFBBBBBB     5 ffbbbbbb     9 ffffFFFF
    2 GGCCCCCC     6 ggcccccc    10 ggggGGGG
    3 HHDDDDDD     7 hhdddddd    11 hhhhHHHH
  i.e. with q = the 12 bytes:  s < 4:  sc = q[s] & 63,                    m = q[s+4] & 63
                               s >= 4: sc = q[s+4] & 15 | (q[s-4] >> 6) << 4
                                       m  = q[s+4] >> 4 | (q[s]   >> 6) << 4
  As words (scale bytes 0..3, 4..7, 8..11 = w0, w1, w2; one sub-block per byte):
    sc[0..3] = w0 & 0x3F3F3F3F        sc[4..7] = w2 & 0x0F0F0F0F | (w0 >> 2) & 0x30303030
    m[0..3]  = w1 & 0x3F3F3F3F        m[4..7]  = (w2 >> 4) & 0x0F0F0F0F | (w1 >> 2) & 0x30303030
qs: 4 chunks j of 32 bytes; byte l of chunk j holds weight 64j + l in its low nibble (sub-block 2j)
    and weight 64j + 32 + l in its high nibble (sub-block 2j + 1).""")

Q6_K = BlockLayout("Q6_K", 256, (
    Field("ql", 128, "the low 4 bits of the 256 quants, two per byte"),
    Field("qh", 64, "the high 2 bits of the 256 quants, four per byte"),
    Field("scales", 16, "int8 scale of each 16-weight sub-block"),
    Field("d", 2, "fp16, super-block scale"),
), """\
16 sub-blocks of 16 weights; weight = (d * sc[i / 16]) * (q - 32), q in 0..63.
Two halves n of 128 weights, with QL = ql + 64n, QH = qh + 32n, S = scales + 8n; for l in 0..31:
    w[128n + l]      = QL[l]      & 15 | (QH[l] >> 0 & 3) << 4,   scale S[l/16 + 0]
    w[128n + l + 32] = QL[l + 32] & 15 | (QH[l] >> 2 & 3) << 4,   scale S[l/16 + 2]
    w[128n + l + 64] = QL[l]      >> 4 | (QH[l] >> 4 & 3) << 4,   scale S[l/16 + 4]
    w[128n + l + 96] = QL[l + 32] >> 4 | (QH[l] >> 6 & 3) << 4,   scale S[l/16 + 6]
Blocks are 210 bytes: in a row, every other block starts 2-byte (not 4-byte) aligned.""")

Q8_0 = BlockLayout("Q8_0", 32, (
    Field("d", 2, "fp16 scale"),
    Field("qs", 32, "32 int8 quants"),
), "weight j = d * qs[j].")

Q5_0 = BlockLayout("Q5_0", 32, (
    Field("d", 2, "fp16 scale"),
    Field("qh", 4, "the 5th bit of each quant: bit j of this little-endian uint32 for weight j"),
    Field("qs", 16, "the low 4 bits of the 32 quants, two per byte"),
), """\
weight j      (j < 16) = d * ((qs[j] & 15 | (qh >> j        & 1) << 4) - 16)
weight j + 16          = d * ((qs[j] >> 4 | (qh >> (j + 16) & 1) << 4) - 16)""")

Q4_0 = BlockLayout("Q4_0", 32, (
    Field("d", 2, "fp16 scale"),
    Field("qs", 16, "32 4-bit quants, two per byte"),
), """\
weight j      (j < 16) = d * ((qs[j] & 15) - 8)
weight j + 16          = d * ((qs[j] >> 4) - 8)""")

# Every block-quantized type the package reads or writes; quants.py has a codec for each (plus the
# float types F32, F16, BF16), kernels/decode.py a device decoder for those the kernels multiply.
LAYOUTS = {lay.name: lay for lay in (Q4_K, Q6_K, Q8_0, Q5_0, Q4_0)}

for _lay in LAYOUTS.values():
    assert GGML_QUANT_SIZES[GGMLQuantizationType[_lay.name]] == (_lay.weights, _lay.nbytes), _lay.name


def cuda_header() -> str:
    """kernels/csrc/block_layouts.cuh: per type <NAME>_WEIGHTS, <NAME>_BYTES and the byte offset of
    each field (<NAME>_<FIELD>), with the diagrams as comments."""
    lines = ["// Block layouts of the GGML quant types, generated from q4kdistill/formats/block_layouts.py: do not edit.",
             "//     python -m q4kdistill.formats.block_layouts > kernels/csrc/block_layouts.cuh",
             "// <TYPE>_WEIGHTS and <TYPE>_BYTES per block; <TYPE>_<FIELD>: byte offset of that field.",
             "#ifndef Q4KDISTILL_BLOCK_LAYOUTS_CUH", "#define Q4KDISTILL_BLOCK_LAYOUTS_CUH",
             "#pragma nv_diag_suppress 177   // a kernel file uses only some of these", ""]
    for lay in LAYOUTS.values():
        lines.append(f"// --- {lay.name}: {lay.weights} weights in {lay.nbytes} bytes")
        lines += [f"//   {line}" if line else "//" for line in lay.diagram.splitlines()]
        lines.append(f"constexpr int {lay.name}_WEIGHTS = {lay.weights};")
        lines.append(f"constexpr int {lay.name}_BYTES = {lay.nbytes};")
        for f in lay.fields:
            const = f"constexpr int {lay.name}_{f.name.upper()} = {lay.at(f.name)};"
            lines.append(f"{const:<36}// {f.size} bytes: {f.what}")
        lines.append("")
    lines.append("#endif")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(cuda_header(), end="")
