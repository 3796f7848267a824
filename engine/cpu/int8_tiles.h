// stb.int8-group.v1 weights re-laid so a SIMD lane accumulates one output row: tiles of 16 rows; per tile and per
// 4 input columns one 64-byte vector holds those 4 values of each of the 16 rows (row r at bytes 4r..4r+3). The
// activations are then broadcast 4 at a time and no horizontal sum is needed, so the same loop serves one
// activation row (GEMV) and many (GEMM: each weight vector is loaded once for up to 8 activation rows).
// Built once at load; the embedding lookup keeps reading the file's row-major values.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace stb::cpu {

constexpr int kInt8TileRows = 16;

struct Int8Tiles {
  int64_t rows = 0, cols = 0, tiles = 0, groups = 0;  // groups = q8_groups(cols)
  std::vector<int8_t> values;    // [tiles][groups · 16 steps of 4 columns][16 rows][4], zero padded
  std::vector<uint16_t> scales;  // [tiles][groups][16 rows] fp16
  uint64_t bytes() const { return values.size() + scales.size() * sizeof(uint16_t); }
};

// values: [rows, groups · 64] int8 (the file's layout), scales: [rows, groups] fp16.
Int8Tiles build_int8_tiles(const int8_t* values, const uint16_t* scales, int64_t rows, int64_t cols);

struct Int8TileKernels {
  // out[t · out_stride + r] = Σ_g ws[r, g] · d_t[g] · Σ_j w[r, j] · q_t[j] for the rows of tiles [tile0, tile1)
  // and t < n — in the scalar reference's order of float operations, so the results are bit-identical to it.
  // qsum[t · groups + g] = Σ_j q_t[j] over group g (kernels that offset the weights to unsigned bytes need it).
  void (*rows)(const Int8Tiles& w, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
               const int32_t* qsum, int n, float* out, int64_t out_stride);
};

const Int8TileKernels* avx2_int8_tiles();    // null when the build has no AVX2 path
const Int8TileKernels* avx512_int8_tiles();  // null without an AVX-512 VNNI path or CPU

}  // namespace stb::cpu
