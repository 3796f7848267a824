// AVX-512 stb.qgroup.v1 kernel: one 512-bit vector per pair of 32-column chunks (one 64-column activation group),
// decoded with the same shifts and masks as the AVX2 chunk (qgroup_simd.h); an odd last chunk takes the AVX2 path.
#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include "cpu/qgroup_simd.h"

namespace stb::cpu {

namespace {

// Lanes 0-31: chunk c, lanes 32-63: chunk c + 1, in column order.
template <int Bits>
inline __m512i pair_codes(const uint8_t* p) {
  if constexpr (Bits == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), low4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    // 128-bit lanes [c lo, c+1 lo, c hi, c+1 hi] -> [c lo, c hi, c+1 lo, c+1 hi]
    const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(3, 1, 2, 0));
  } else {
    int64_t low0, low1;
    std::memcpy(&low0, p, 8);
    std::memcpy(&low1, p + 4 * Bits, 8);
    const __m512i words = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1),
                                                   _mm512_castsi128_si512(_mm_set_epi64x(low1, low0)));
    __m512i codes = _mm512_and_si512(_mm512_srlv_epi64(words, _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6)),
                                     _mm512_set1_epi8(3));
    if constexpr (Bits == 3) {
      uint32_t high0, high1;
      std::memcpy(&high0, p + 8, 4);
      std::memcpy(&high1, p + 20, 4);
      codes = _mm512_or_si512(codes, _mm512_maskz_set1_epi8(__mmask64(high0) | (__mmask64(high1) << 32), 4));
    }
    return codes;
  }
}

template <int Bits, int NT>
void qgroup_pass(const uint8_t* codes, const uint16_t* scales, int group, int64_t chunks, const int8_t* q,
                 int64_t q_stride, const float* d, int64_t d_stride, float (&sums)[NT]) {
  __m512 acc[NT];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512i ones = _mm512_set1_epi16(1);
  QGroupCursor cursor(group);
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2, cursor.advance(2)) {
    const __m512i w = pair_codes<Bits>(codes + c * 4 * Bits);
    const int64_t g0 = cursor.group, g1 = cursor.next_group();
    const float s0 = _cvtsh_ss(scales[g0]);
    const __m512 s = g0 == g1 ? _mm512_set1_ps(s0)
                              : _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(_cvtsh_ss(scales[g1])), 1);
    for (int t = 0; t < NT; ++t) {
      const __m512i x = _mm512_loadu_si512(q + t * q_stride + c * kQGroupChunk);
      const __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), ones);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(s, _mm512_set1_ps(d[t * d_stride + c / 2])),
                               acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) sums[t] = _mm512_reduce_add_ps(acc[t]);
  if (c < chunks) {  // an odd last chunk
    const __m256i w = qgroup_chunk_codes<Bits>(codes + c * 4 * Bits);
    const float s = _cvtsh_ss(scales[cursor.group]);
    for (int t = 0; t < NT; ++t)
      sums[t] += s * d[t * d_stride + c / 2] *
                 qgroup_hsum(_mm256_cvtepi32_ps(qgroup_chunk_dot(w, q + t * q_stride + c * kQGroupChunk)));
  }
}

template <int Bits>
void qgroup_row_bits(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int group, int64_t cols,
                     const int8_t* q, const float* d, const float* xsum, int n, float* out, int64_t out_stride) {
  const int64_t chunks = qgroup_chunks(cols), q8 = q8_groups(cols), groups = (cols + group - 1) / group;
  constexpr int kPass = 4;  // activation rows per decoded pair of chunks
  int t = 0;
  for (; t + kPass <= n; t += kPass) {
    float sums[kPass];
    qgroup_pass<Bits, kPass>(codes, scales, group, chunks, q + t * q8 * kQ8Group, q8 * kQ8Group, d + t * q8, q8,
                             sums);
    for (int i = 0; i < kPass; ++i)
      out[(t + i) * out_stride] = sums[i] + qgroup_offset_term(offsets, xsum + (t + i) * groups, groups);
  }
  for (; t < n; ++t) {
    float sums[1];
    qgroup_pass<Bits, 1>(codes, scales, group, chunks, q + t * q8 * kQ8Group, 0, d + t * q8, 0, sums);
    out[t * out_stride] = sums[0] + qgroup_offset_term(offsets, xsum + t * groups, groups);
  }
}

}  // namespace

void avx512_qgroup_row_q8(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int bits, int group,
                          int64_t cols, const int8_t* q, const float* d, const float* xsum, int n, float* out,
                          int64_t out_stride, uint8_t*) {
  auto row = bits == 4 ? qgroup_row_bits<4> : bits == 3 ? qgroup_row_bits<3> : qgroup_row_bits<2>;
  row(codes, scales, offsets, group, cols, q, d, xsum, n, out, out_stride);
}

}  // namespace stb::cpu
#endif
