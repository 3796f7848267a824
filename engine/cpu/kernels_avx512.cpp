// AVX-512 (F/BW/VL/DQ) kernels; called only after run-time detection. The float and int8 kernels are the AVX2
// ones (every AVX-512 CPU has AVX2; they are memory-bound). The sign-block lookup kernel doubles the AVX2 one's
// width: a 64-byte vector holds two pairs of 4-input groups (p, p+1) for the tile's 32 rows, so its 128-bit lanes
// need the tables of groups (2p, 2p, 2p+2, 2p+2) for low nibbles and (2p+1, 2p+1, 2p+3, 2p+3) for high ones —
// this path builds its tables in that order.
#include "cpu/kernels.h"
#include "cpu/int8_tiles.h"
#include "cpu/qgroup_tiles.h"
#include "cpu/kernels_groups.h"
#include "cpu/sign_lut.h"

#if defined(__x86_64__) || defined(_M_X64)
#include "cpu/sign_lut_tiles.h"
#include "cpu/silu.h"

namespace stb::cpu {

namespace {

// Per two pairs (four 4-input groups 2p..2p+3): 256 bytes = low-nibble lo/hi tables, high-nibble lo/hi tables,
// each 64 bytes laid out per 128-bit lane as above. Same total size as the AVX2 tables.
void sign_lut_tables(const int8_t* q, int64_t cols, bool masked, uint8_t* tables) {
  const int64_t quads = q8_groups(cols) * 4;
  for (int64_t u = 0; u < quads; ++u) {
    uint8_t* out = tables + 256 * u;
    for (int j = 0; j < 4; ++j) {  // group 4u + j
      int values[16];
      sign_lut_values(q + 4 * (4 * u + j), masked, values);
      const int nibble = j & 1, pair = j >> 1;  // low/high nibble table; lanes 0-1 (pair p) or 2-3 (pair p+1)
      for (int idx = 0; idx < 16; ++idx) {
        for (int lane = 2 * pair; lane < 2 * pair + 2; ++lane) {
          out[128 * nibble + 16 * lane + idx] = uint8_t(values[idx] & 0xFF);
          out[128 * nibble + 64 + 16 * lane + idx] = uint8_t((values[idx] >> 8) & 0xFF);
        }
      }
    }
  }
}

inline void lookup_quad(__m512i v, const uint8_t* t, __m512i& rows_lo, __m512i& rows_hi, bool subtract) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i i0 = _mm512_and_si512(v, low4), i1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  const __m512i lo0 = _mm512_shuffle_epi8(_mm512_loadu_si512(t), i0);
  const __m512i hi0 = _mm512_shuffle_epi8(_mm512_loadu_si512(t + 64), i0);
  const __m512i lo1 = _mm512_shuffle_epi8(_mm512_loadu_si512(t + 128), i1);
  const __m512i hi1 = _mm512_shuffle_epi8(_mm512_loadu_si512(t + 192), i1);
  const __m512i a = _mm512_add_epi16(_mm512_unpacklo_epi8(lo0, hi0), _mm512_unpacklo_epi8(lo1, hi1));
  const __m512i b = _mm512_add_epi16(_mm512_unpackhi_epi8(lo0, hi0), _mm512_unpackhi_epi8(lo1, hi1));
  rows_lo = subtract ? _mm512_sub_epi16(rows_lo, a) : _mm512_add_epi16(rows_lo, a);
  rows_hi = subtract ? _mm512_sub_epi16(rows_hi, b) : _mm512_add_epi16(rows_hi, b);
}

struct GroupSumsAvx512 {
  void operator()(const uint8_t* plus, const uint8_t* minus, const uint8_t* tables, int64_t g, __m256i& rows_lo,
                  __m256i& rows_hi) const {
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    for (int64_t p = 8 * g; p < 8 * g + 8; p += 2) {
      const uint8_t* t = tables + 128 * p;
      lookup_quad(_mm512_loadu_si512(plus + p * kLutTileRows), t, lo, hi, false);
      if (minus) lookup_quad(_mm512_loadu_si512(minus + p * kLutTileRows), t, lo, hi, true);
    }
    // Lanes 2-3 hold the same rows as lanes 0-1 (the odd pairs): fold them together.
    rows_lo = _mm256_add_epi16(_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1));
    rows_hi = _mm256_add_epi16(_mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1));
  }
};

void sign_lut_rows(const SignLut& l, int64_t tile0, int64_t tile1, const uint8_t* tables, const float* d,
                   float* out) {
  sign_lut_tiles(l, tile0, tile1, tables, d, out, GroupSumsAvx512{});
}

// engine/cpu/silu.h's exp, 16 lanes, the same operations in the same order as silu::exp_ref.
__m512 exp_ps(__m512 x0) {
  const __m512 hi = _mm512_set1_ps(silu::kExpMax);
  const __m512 x = _mm512_max_ps(_mm512_min_ps(x0, hi), _mm512_set1_ps(silu::kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(silu::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(silu::kLn2Hi))),
                                 _mm512_mul_ps(n, _mm512_set1_ps(silu::kLn2Lo)));
  __m512 p = _mm512_set1_ps(silu::kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(silu::kP[i]));
  const __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x0, hi, _CMP_GT_OQ), _mm512_mul_ps(y, _mm512_castsi512_ps(bits)),
                              _mm512_set1_ps(INFINITY));
}

void silu_gate(const float* gate, float* up, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 u = _mm512_loadu_ps(up + i), a = gate ? _mm512_loadu_ps(gate + i) : u;
    const __m512 act = _mm512_div_ps(a, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(zero, a))));
    _mm512_storeu_ps(up + i, gate ? _mm512_mul_ps(act, u) : act);
  }
  silu::silu_gate_ref(gate, up, i, n);
}

void exp_weights(const float* logits, float temperature, float top, float* out, int64_t n) {
  const auto t = _mm512_set1_ps(temperature), shift = _mm512_set1_ps(top);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, exp_ps(_mm512_sub_ps(_mm512_div_ps(_mm512_loadu_ps(logits + i), t), shift)));
  silu::exp_weights_ref(logits, temperature, top, out, i, n);
}

}  // namespace

const Kernels* avx512_kernels() {
  const Kernels* base = avx2_kernels();
  if (!base) return nullptr;
  // With VNNI the batched kernel beat lookups from 2 activation rows on, and for 1 row on matrices of fewer than
  // 2048 rows, whose lookup tables cost more than the rows amortize (576 x 576: 4.6 vs 7.0 us; 4096 x 4096: 245 vs
  // 231 us; docs/performance.md). Without VNNI the AVX2 batched kernel takes over.
  static const SignLutKernels lut = avx512_sign_gemm()
      ? SignLutKernels{sign_lut_tables, sign_lut_rows, avx512_sign_gemm(), 2, 2048}
      : SignLutKernels{sign_lut_tables, sign_lut_rows, avx2_sign_gemm(), kAvx2SignGemmMinRows, 0};
  // Without VNNI the int8 and qgroup tiles run the AVX2 kernels (AVX-512BW alone would gain little over them).
  static const Int8TileKernels* int8 = avx512_int8_tiles() ? avx512_int8_tiles() : base->int8_tiles;
  static const QGroupTileKernels* qgroup_tiles = avx512_qgroup_tiles() ? avx512_qgroup_tiles() : base->qgroup_tiles;
  static const Kernels k{"avx512",          base->dot_f32,     base->dot_f16_rows, base->f16_to_f32,
                         base->attend,      base->attend_f16,  base->f32_to_f16,   silu_gate,
                         exp_weights,       base->quantize_q8,
                         base->sign_row_q8,
                         base->int8_row_q8, base->qgroup_row_q8, &lut,            avx512_groups(),
                         int8,              qgroup_tiles};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace stb::cpu
#endif
