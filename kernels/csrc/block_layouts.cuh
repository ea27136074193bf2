// Block layouts of the GGML quant types, generated from q4kdistill/formats/block_layouts.py: do not edit.
//     python -m q4kdistill.formats.block_layouts > kernels/csrc/block_layouts.cuh
// <TYPE>_WEIGHTS and <TYPE>_BYTES per block; <TYPE>_<FIELD>: byte offset of that field.
#ifndef Q4KDISTILL_BLOCK_LAYOUTS_CUH
#define Q4KDISTILL_BLOCK_LAYOUTS_CUH
#pragma nv_diag_suppress 177   // a kernel file uses only some of these

// --- Q4_K: 256 weights in 144 bytes
//   8 sub-blocks s of 32 weights; weight = (d * sc[s]) * q - dmin * m[s], q in 0..15.
//   scales: bits of the 12 bytes (A..H = sc[0..7], a..h = m[0..7], 6 bits each; ggml's get_scale_min_k4):
//       0 EEAAAAAA     4 eeaaaaaa     8 eeeeEEEE
//       1 FFBBBBBB     5 ffbbbbbb     9 ffffFFFF
//       2 GGCCCCCC     6 ggcccccc    10 ggggGGGG
//       3 HHDDDDDD     7 hhdddddd    11 hhhhHHHH
//     i.e. with q = the 12 bytes:  s < 4:  sc = q[s] & 63,                    m = q[s+4] & 63
//                                  s >= 4: sc = q[s+4] & 15 | (q[s-4] >> 6) << 4
//                                          m  = q[s+4] >> 4 | (q[s]   >> 6) << 4
//     As words (scale bytes 0..3, 4..7, 8..11 = w0, w1, w2; one sub-block per byte):
//       sc[0..3] = w0 & 0x3F3F3F3F        sc[4..7] = w2 & 0x0F0F0F0F | (w0 >> 2) & 0x30303030
//       m[0..3]  = w1 & 0x3F3F3F3F        m[4..7]  = (w2 >> 4) & 0x0F0F0F0F | (w1 >> 2) & 0x30303030
//   qs: 4 chunks j of 32 bytes; byte l of chunk j holds weight 64j + l in its low nibble (sub-block 2j)
//       and weight 64j + 32 + l in its high nibble (sub-block 2j + 1).
constexpr int Q4_K_WEIGHTS = 256;
constexpr int Q4_K_BYTES = 144;
constexpr int Q4_K_D = 0;           // 2 bytes: fp16, super-block scale of the 6-bit sub-block scales
constexpr int Q4_K_DMIN = 2;        // 2 bytes: fp16, super-block scale of the 6-bit sub-block mins
constexpr int Q4_K_SCALES = 4;      // 12 bytes: 8 (scale, min) pairs of 6 bits, packed as drawn below
constexpr int Q4_K_QS = 16;         // 128 bytes: 256 4-bit quants, two per byte

// --- Q6_K: 256 weights in 210 bytes
//   16 sub-blocks of 16 weights; weight = (d * sc[i / 16]) * (q - 32), q in 0..63.
//   Two halves n of 128 weights, with QL = ql + 64n, QH = qh + 32n, S = scales + 8n; for l in 0..31:
//       w[128n + l]      = QL[l]      & 15 | (QH[l] >> 0 & 3) << 4,   scale S[l/16 + 0]
//       w[128n + l + 32] = QL[l + 32] & 15 | (QH[l] >> 2 & 3) << 4,   scale S[l/16 + 2]
//       w[128n + l + 64] = QL[l]      >> 4 | (QH[l] >> 4 & 3) << 4,   scale S[l/16 + 4]
//       w[128n + l + 96] = QL[l + 32] >> 4 | (QH[l] >> 6 & 3) << 4,   scale S[l/16 + 6]
//   Blocks are 210 bytes: in a row, every other block starts 2-byte (not 4-byte) aligned.
constexpr int Q6_K_WEIGHTS = 256;
constexpr int Q6_K_BYTES = 210;
constexpr int Q6_K_QL = 0;          // 128 bytes: the low 4 bits of the 256 quants, two per byte
constexpr int Q6_K_QH = 128;        // 64 bytes: the high 2 bits of the 256 quants, four per byte
constexpr int Q6_K_SCALES = 192;    // 16 bytes: int8 scale of each 16-weight sub-block
constexpr int Q6_K_D = 208;         // 2 bytes: fp16, super-block scale

// --- Q8_0: 32 weights in 34 bytes
//   weight j = d * qs[j].
constexpr int Q8_0_WEIGHTS = 32;
constexpr int Q8_0_BYTES = 34;
constexpr int Q8_0_D = 0;           // 2 bytes: fp16 scale
constexpr int Q8_0_QS = 2;          // 32 bytes: 32 int8 quants

// --- Q5_0: 32 weights in 22 bytes
//   weight j      (j < 16) = d * ((qs[j] & 15 | (qh >> j        & 1) << 4) - 16)
//   weight j + 16          = d * ((qs[j] >> 4 | (qh >> (j + 16) & 1) << 4) - 16)
constexpr int Q5_0_WEIGHTS = 32;
constexpr int Q5_0_BYTES = 22;
constexpr int Q5_0_D = 0;           // 2 bytes: fp16 scale
constexpr int Q5_0_QH = 2;          // 4 bytes: the 5th bit of each quant: bit j of this little-endian uint32 for weight j
constexpr int Q5_0_QS = 6;          // 16 bytes: the low 4 bits of the 32 quants, two per byte

// --- Q4_0: 32 weights in 18 bytes
//   weight j      (j < 16) = d * ((qs[j] & 15) - 8)
//   weight j + 16          = d * ((qs[j] >> 4) - 8)
constexpr int Q4_0_WEIGHTS = 32;
constexpr int Q4_0_BYTES = 18;
constexpr int Q4_0_D = 0;           // 2 bytes: fp16 scale
constexpr int Q4_0_QS = 2;          // 16 bytes: 32 4-bit quants, two per byte

#endif
