// Table-lookup matmul for stb.sign-block.v1 (the idea of T-MAC, our own layout): a binary weight row splits into
// nibbles, each holding the signs of 4 consecutive inputs; for every 4 int8 activations the 16 possible signed sums
// are computed once per activation row, and the weights then only index that table — 32 lookups per pshufb.
//
// Layout, built once at load from the file's bit planes (the mapped planes are not used afterwards):
//   rows are cut into tiles of 32; within a tile, for each pair of 4-input groups (2p, 2p+1), one 32-byte vector
//   holds byte r = nibble(row r, group 2p) | nibble(row r, group 2p+1) << 4. A nibble's bit i is input 4k+i.
//   Dense rows use one plane of sign nibbles and the table D[idx] = Σ_i (bit i ? +q_i : −q_i).
//   Masked rows use two planes, kept-positive and kept-negative nibbles, and the subset-sum table
//   P[idx] = Σ_{i in idx} q_i: the row's sum is P[plus] − P[minus].
//   Scales are stored as fp16 per (tile, block, row) so 8 rows' scales load (and convert) as one vector.
// Tables hold int16 (|sum| ≤ 4·127) split into a low-byte and a high-byte table, each repeated in both 128-bit lanes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace stb::cpu {

constexpr int kLutTileRows = 32;

struct SignLut {
  int64_t rows = 0, cols = 0, tiles = 0;
  int64_t pairs = 0;             // pairs of 4-input groups per row = q8_groups(cols) · 8
  int block = 0, blocks = 0;
  bool masked = false;
  std::vector<uint8_t> plus;     // [tiles][pairs][32] nibble pairs (dense: the sign nibbles)
  std::vector<uint8_t> minus;    // masked only: kept-negative nibbles, same layout
  std::vector<uint16_t> alpha;   // [tiles][blocks][32] fp16
  uint64_t bytes() const { return plus.size() + minus.size() + alpha.size() * sizeof(uint16_t); }
};

// Builds the layout from the file's planes (portable code; once per matrix at load).
SignLut build_sign_lut(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int64_t rows,
                       int64_t cols, int block);

// Bytes of the lookup tables of one activation row: 64 per group of 4 inputs.
inline int64_t sign_lut_table_bytes(int64_t cols) { return ((cols + 63) / 64) * 16 * 64; }

// The 16 table values for 4 int8 activations q[0..3]: entry idx (bit i = input i) is the subset sum
// Σ_{i in idx} q_i (masked rows) or the signed sum Σ_i (bit i ? +q_i : −q_i) = 2·subset − total (dense rows).
inline void sign_lut_values(const int8_t* q, bool masked, int values[16]) {
  const int total = q[0] + q[1] + q[2] + q[3];
  for (int idx = 0; idx < 16; ++idx) {
    int subset = 0;
    for (int i = 0; i < 4; ++i)
      if (idx & (1 << i)) subset += q[i];
    values[idx] = masked ? subset : 2 * subset - total;
  }
}

struct SignLutKernels {
  // Tables of one quantized activation row (q: q8_groups(cols)·64 int8) -> sign_lut_table_bytes(cols) bytes.
  void (*tables)(const int8_t* q, int64_t cols, bool masked, uint8_t* tables);
  // out[r] for the rows of tiles [tile0, tile1) against one activation row (its tables and group scales d).
  void (*rows)(const SignLut& l, int64_t tile0, int64_t tile1, const uint8_t* tables, const float* d, float* out);
  // Batched (GEMM) form on the same layout, null where the path has none: each weight tile's signs are expanded
  // to bytes once for several activation rows and multiplied with int8 dot products, no tables.
  // out[t · out_stride + r] for the rows of tiles [tile0, tile1) and t < n; q, d: n quantized activation rows;
  // qsum[t · groups + g] = Σ_j q_t[j] over activation group g.
  void (*gemm)(const SignLut& l, int64_t tile0, int64_t tile1, const int8_t* q, const float* d, const int32_t* qsum,
               int n, float* out, int64_t out_stride);
  // When gemm beats rows (measured per path: docs/performance.md): from gemm_min_rows activation rows on, and for
  // any count on matrices of fewer than gemm_below_rows output rows (0: none).
  int gemm_min_rows;
  int64_t gemm_below_rows;
  bool use_gemm(int n, int64_t rows) const { return gemm && (n >= gemm_min_rows || rows < gemm_below_rows); }
};

const SignLutKernels* avx2_sign_lut();  // null when the build has no AVX2 path
// The batched kernels (gemm_avx2.cpp, gemm_avx512vnni.cpp); null without that path or CPU.
using SignGemm = decltype(SignLutKernels::gemm);
SignGemm avx2_sign_gemm();
// Where avx2_sign_gemm starts beating the lookup kernel (docs/performance.md): from 8 activation rows on it was
// 1.1-1.5x faster on SmolLM2's shapes; at 4 it was slower on half of them.
constexpr int kAvx2SignGemmMinRows = 8;
SignGemm avx512_sign_gemm();

}  // namespace stb::cpu
