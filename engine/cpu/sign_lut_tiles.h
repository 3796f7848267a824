// The per-tile driver shared by the AVX2 and AVX-512 lookup kernels (included only by files compiled with AVX2 and
// -ffp-contract=off): accumulates each activation group's int16 row sums in float with the group scale d_g and the
// rows' α, and stores the tile's 32 outputs.
#pragma once
#include <immintrin.h>

#include "cpu/kernels.h"
#include "cpu/sign_lut.h"

namespace stb::cpu {

// out[r] for the rows of tiles [tile0, tile1) against one activation row (its tables and group scales d);
// GroupSums(plus, minus, tables, g, rows_lo, rows_hi) adds the int16 sums of activation group g.
template <class GroupSums>
void sign_lut_tiles(const SignLut& l, int64_t tile0, int64_t tile1, const uint8_t* tables, const float* d,
                    float* out, GroupSums group_sums) {
  const int64_t groups = l.pairs / 8, per_block = l.block / kQ8Group;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const uint8_t* plus = l.plus.data() + tile * l.pairs * kLutTileRows;
    const uint8_t* minus = l.masked ? l.minus.data() + tile * l.pairs * kLutTileRows : nullptr;
    const uint16_t* alpha = l.alpha.data() + tile * l.blocks * kLutTileRows;
    // In the scalar reference's order (Σ_b α_b · Σ_g d_g · sum_g, one rounding per operation), so every path
    // gives the same bits and a row's result does not depend on which kernel or batch computed it.
    __m256 acc[4], block_acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = block_acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      // int16 row sums over one activation group (16 lookups of at most 4·127 each: no overflow).
      __m256i rows_lo = _mm256_setzero_si256(), rows_hi = _mm256_setzero_si256();
      group_sums(plus, minus, tables, g, rows_lo, rows_hi);
      const __m256 dg = _mm256_set1_ps(d[g]);
      const __m256i parts[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(rows_lo)),       // rows 0-7
                                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(rows_hi)),       // rows 8-15
                                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(rows_lo, 1)),  // rows 16-23
                                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(rows_hi, 1))}; // rows 24-31
      for (int i = 0; i < 4; ++i)
        block_acc[i] = _mm256_add_ps(block_acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(parts[i]), dg));
      if ((g + 1) % per_block == 0 || g + 1 == groups) {
        const uint16_t* a = alpha + (g / per_block) * kLutTileRows;
        for (int i = 0; i < 4; ++i) {
          const __m256 ai = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 8 * i)));
          acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(ai, block_acc[i]));
          block_acc[i] = _mm256_setzero_ps();
        }
      }
    }
    const int64_t r0 = tile * kLutTileRows, valid = l.rows - r0 < kLutTileRows ? l.rows - r0 : kLutTileRows;
    if (valid == kLutTileRows) {
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + r0 + 8 * i, acc[i]);
    } else {
      alignas(32) float tmp[kLutTileRows];
      for (int i = 0; i < 4; ++i) _mm256_store_ps(tmp + 8 * i, acc[i]);
      for (int64_t r = 0; r < valid; ++r) out[r0 + r] = tmp[r];
    }
  }
}

}  // namespace stb::cpu
