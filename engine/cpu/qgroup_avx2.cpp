// AVX2 stb.qgroup.v1 kernel: one 256-bit vector per chunk of 32 columns (qgroup_simd.h). Chunk pairs that share
// their weight group (and always their 64-column activation group) add their integer sums before the one float
// multiply-add.
#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include "cpu/qgroup_simd.h"

namespace stb::cpu {

namespace {

template <int Bits, int NT>
void qgroup_pass(const uint8_t* codes, const uint16_t* scales, int group, int64_t chunks, const int8_t* q,
                 int64_t q_stride, const float* d, int64_t d_stride, __m256 (&acc)[NT]) {
  QGroupCursor cursor(group);
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2, cursor.advance(2)) {
    const __m256i w0 = qgroup_chunk_codes<Bits>(codes + c * 4 * Bits);
    const __m256i w1 = qgroup_chunk_codes<Bits>(codes + (c + 1) * 4 * Bits);
    const int64_t g0 = cursor.group, g1 = cursor.next_group();
    const float s0 = _cvtsh_ss(scales[g0]);
    for (int t = 0; t < NT; ++t) {
      const int8_t* qt = q + t * q_stride + c * kQGroupChunk;
      const __m256i p0 = qgroup_chunk_dot(w0, qt), p1 = qgroup_chunk_dot(w1, qt + kQGroupChunk);
      const float dt = d[t * d_stride + c / 2];
      if (g0 == g1) {
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), _mm256_set1_ps(s0 * dt), acc[t]);
      } else {
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0 * dt), acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(_cvtsh_ss(scales[g1]) * dt), acc[t]);
      }
    }
  }
  if (c < chunks) {  // an odd last chunk
    const __m256i w = qgroup_chunk_codes<Bits>(codes + c * 4 * Bits);
    const float s = _cvtsh_ss(scales[cursor.group]);
    for (int t = 0; t < NT; ++t) {
      const __m256i p = qgroup_chunk_dot(w, q + t * q_stride + c * kQGroupChunk);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * d[t * d_stride + c / 2]), acc[t]);
    }
  }
}

template <int Bits>
void qgroup_row_bits(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int group, int64_t cols,
                     const int8_t* q, const float* d, const float* xsum, int n, float* out, int64_t out_stride) {
  const int64_t chunks = qgroup_chunks(cols), q8 = q8_groups(cols), groups = (cols + group - 1) / group;
  constexpr int kPass = 4;  // activation rows per decoded chunk
  int t = 0;
  for (; t + kPass <= n; t += kPass) {
    __m256 acc[kPass];
    for (auto& a : acc) a = _mm256_setzero_ps();
    qgroup_pass<Bits, kPass>(codes, scales, group, chunks, q + t * q8 * kQ8Group, q8 * kQ8Group, d + t * q8, q8, acc);
    for (int i = 0; i < kPass; ++i)
      out[(t + i) * out_stride] = qgroup_hsum(acc[i]) + qgroup_offset_term(offsets, xsum + (t + i) * groups, groups);
  }
  for (; t < n; ++t) {
    __m256 acc[1] = {_mm256_setzero_ps()};
    qgroup_pass<Bits, 1>(codes, scales, group, chunks, q + t * q8 * kQ8Group, 0, d + t * q8, 0, acc);
    out[t * out_stride] = qgroup_hsum(acc[0]) + qgroup_offset_term(offsets, xsum + t * groups, groups);
  }
}

}  // namespace

void avx2_qgroup_row_q8(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int bits, int group,
                        int64_t cols, const int8_t* q, const float* d, const float* xsum, int n, float* out,
                        int64_t out_stride, uint8_t*) {
  auto row = bits == 4 ? qgroup_row_bits<4> : bits == 3 ? qgroup_row_bits<3> : qgroup_row_bits<2>;
  row(codes, scales, offsets, group, cols, q, d, xsum, n, out, out_stride);
}

}  // namespace stb::cpu
#endif
