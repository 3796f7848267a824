// stb.qgroup.v1 weights re-laid so a SIMD lane accumulates one output row (as int8_tiles.h does for int8 weights):
// tiles of 16 rows, and per tile units of 16 input columns. A unit holds its 256 codes (same bit width as the file)
// so that each quad of 4 columns s = 0..3 decodes, with a few shifts and masks, into one 64-byte vector whose byte
// 4r + k is the code of row r, column 4s + k — the u8 operand of a vpdpbusd whose s8 operand broadcasts those 4
// activations. Lane r then sums its row's products, so per 32 or 64 columns one conversion and one FMA serve 16
// rows (the row kernel needs both per row), for one activation row or up to 8 sharing each decoded unit.
//   k = 4: 128 bytes, two vectors (quads 0-1, 2-3): byte L = 4r + k of vector h holds quad 2h in its low nibble
//          and quad 2h + 1 in its high nibble;
//   k = 2: 64 bytes: bits 2s, 2s + 1 of byte L hold quad s;
//   k = 3: the k = 2 layout of the low two bits (64 bytes), then per quad s a little-endian u64 whose bit L is bit 2
//          of quad s's code at byte L.
// Scales and offsets follow per (tile, group) as 16 fp16, one per row. Padding rows and columns hold code 0 and
// scale 0. Built once at load; a tied table's embedding lookups read their rows back from the tiles.
#pragma once
#include <cstdint>
#include <vector>

#include "stbllm/backend.h"

namespace stb::cpu {

constexpr int kQGroupTileRows = 16;
constexpr int kQGroupUnitCols = 16;

struct QGroupTiles {
  int64_t rows = 0, cols = 0, tiles = 0, units = 0;  // units: of 16 columns, 2 per 32-column chunk of the format
  int bits = 0, group = 0;
  int64_t groups = 0;             // ⌈cols / group⌉
  std::vector<uint8_t> codes;     // [tiles][units][unit_bytes()]
  std::vector<uint16_t> scales;   // [tiles][groups][16] fp16
  std::vector<uint16_t> offsets;  // [tiles][groups][16] fp16
  int64_t unit_bytes() const { return 16 * bits * 2; }  // 256 codes of `bits` bits
  uint64_t bytes() const { return codes.size() + (scales.size() + offsets.size()) * sizeof(uint16_t); }
};

// From a QGroup Matrix (the file's codes, scales and offsets).
QGroupTiles build_qgroup_tiles(const Matrix& m);
// The inverse for one row: its codes, one per byte, for the padded columns (units × 16): a tied table's lookups.
void qgroup_tile_row_codes(const QGroupTiles& w, int64_t row, uint8_t* codes);

struct QGroupTileKernels {
  // out[t · out_stride + r] = Σ_j scale_g(j)[r] · code[r, j] · d_t[j / 64] · q_t[j] + Σ_g offset_g[r] · xsum_t[g]
  // for the rows of tiles [tile0, tile1) and t < n (q, d: quantized activation rows; xsum: qgroup_activation_sums).
  void (*rows)(const QGroupTiles& w, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
               const float* xsum, int n, float* out, int64_t out_stride);
};

const QGroupTileKernels* avx2_qgroup_tiles();    // null when the build has no AVX2 path
const QGroupTileKernels* avx512_qgroup_tiles();  // null without an AVX-512 VNNI path or CPU

}  // namespace stb::cpu
