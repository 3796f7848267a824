// AVX2 table-lookup sign-block matmul (layout: engine/cpu/sign_lut.h). Per 32 rows × 8 inputs: one load, three
// ops for the nibble indices, four pshufb lookups and four unpack/add pairs — about a fifth of the work of
// expanding the signs to bytes and multiplying.
#include "cpu/kernels.h"
#include "cpu/sign_lut.h"
#include "cpu/sign_lut_tiles.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace stb::cpu {

namespace {

// For each group of 4 activations: the 16 sums (dense: signed sums; masked: subset sums) as int16, split into a
// low-byte and a high-byte table, each repeated in both 128-bit lanes: 64 bytes per group.
void sign_lut_tables(const int8_t* q, int64_t cols, bool masked, uint8_t* tables) {
  const int64_t groups4 = q8_groups(cols) * 16;
  for (int64_t k = 0; k < groups4; ++k) {
    int values[16];
    sign_lut_values(q + 4 * k, masked, values);
    uint8_t* lo = tables + 64 * k;
    uint8_t* hi = lo + 32;
    for (int idx = 0; idx < 16; ++idx) {
      lo[idx] = lo[idx + 16] = uint8_t(values[idx] & 0xFF);
      hi[idx] = hi[idx + 16] = uint8_t((values[idx] >> 8) & 0xFF);
    }
  }
}

// Adds the table values selected by one 32-byte vector of nibble pairs (pair p) to the int16 row sums.
inline void lookup_pair(__m256i v, const uint8_t* tables, int64_t p, __m256i& rows_lo, __m256i& rows_hi,
                        bool subtract) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i i0 = _mm256_and_si256(v, low4), i1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  const uint8_t* t0 = tables + 64 * (2 * p);
  const uint8_t* t1 = t0 + 64;
  auto load = [](const uint8_t* a) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)); };
  const __m256i lo0 = _mm256_shuffle_epi8(load(t0), i0), hi0 = _mm256_shuffle_epi8(load(t0 + 32), i0);
  const __m256i lo1 = _mm256_shuffle_epi8(load(t1), i1), hi1 = _mm256_shuffle_epi8(load(t1 + 32), i1);
  // unpacklo: rows 0-7 (lane 0) and 16-23 (lane 1); unpackhi: rows 8-15 and 24-31.
  const __m256i a = _mm256_add_epi16(_mm256_unpacklo_epi8(lo0, hi0), _mm256_unpacklo_epi8(lo1, hi1));
  const __m256i b = _mm256_add_epi16(_mm256_unpackhi_epi8(lo0, hi0), _mm256_unpackhi_epi8(lo1, hi1));
  rows_lo = subtract ? _mm256_sub_epi16(rows_lo, a) : _mm256_add_epi16(rows_lo, a);
  rows_hi = subtract ? _mm256_sub_epi16(rows_hi, b) : _mm256_add_epi16(rows_hi, b);
}

// int16 row sums of one tile over activation group g (8 pairs of 4-input groups).
struct GroupSumsAvx2 {
  void operator()(const uint8_t* plus, const uint8_t* minus, const uint8_t* tables, int64_t g, __m256i& rows_lo,
                  __m256i& rows_hi) const {
    for (int64_t p = 8 * g; p < 8 * g + 8; ++p) {
      lookup_pair(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(plus + p * kLutTileRows)), tables, p, rows_lo,
                  rows_hi, false);
      if (minus)
        lookup_pair(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(minus + p * kLutTileRows)), tables, p,
                    rows_lo, rows_hi, true);
    }
  }
};

void sign_lut_rows(const SignLut& l, int64_t tile0, int64_t tile1, const uint8_t* tables, const float* d,
                   float* out) {
  sign_lut_tiles(l, tile0, tile1, tables, d, out, GroupSumsAvx2{});
}

}  // namespace

const SignLutKernels* avx2_sign_lut() {
  static const SignLutKernels k{sign_lut_tables, sign_lut_rows, avx2_sign_gemm(), kAvx2SignGemmMinRows, 0};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const SignLutKernels* avx2_sign_lut() {
  // The batched kernel's crossover (docs/performance.md): from 8 rows on it was 1.1-1.5x faster than lookups on
  // SmolLM2's shapes; at 4 it was slower on half of them. return nullptr; }
}  // namespace stb::cpu
#endif
