// AVX2 + FMA + F16C kernels (compiled with those flags; called only after run-time detection).
#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace stb::cpu {

namespace {

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

float dot_f32(const float* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
  }
  float acc = hsum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) acc += w[j] * x[j];
  return acc;
}

float dot_f16(const uint16_t* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 8)));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j + 8), a1);
  }
  float acc = hsum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) acc += half_to_float(w[j]) * x[j];
  return acc;
}

// Lane i of the result is all-ones when bit i of `byte` is set: the 8 sign (or mask) bits of 8 weights become a
// blend mask for 8 activations.
inline __m256 byte_to_lanes(uint32_t byte) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(byte)), bit), bit));
}

// Dense rows: Σ w x = scale·(2·Σ_{sign=+1} x − Σ x), and Σ x per block is shared by every output row, so a row
// costs one masked add per weight. Masked rows: Σ_{kept,+} x − Σ_{kept,−} x directly.
float dot_sign(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int block, const float* x,
               const float* block_sums, int64_t n) {
  float acc = 0;
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += block, ++b) {
    const int64_t end = b0 + block < n ? b0 + block : n;
    __m256 pos = _mm256_setzero_ps(), neg = _mm256_setzero_ps();
    int64_t j = b0;
    for (; j + 8 <= end; j += 8) {
      uint32_t s = uint32_t(signs[j >> 6] >> (j & 63)) & 0xFF;
      const __m256 xv = _mm256_loadu_ps(x + j);
      if (mask) {
        const uint32_t m = uint32_t(mask[j >> 6] >> (j & 63)) & 0xFF;
        s &= m;
        neg = _mm256_add_ps(neg, _mm256_and_ps(byte_to_lanes(m & ~s), xv));
      }
      pos = _mm256_add_ps(pos, _mm256_and_ps(byte_to_lanes(s), xv));
    }
    float p = hsum(pos), q = hsum(neg);
    for (; j < end; ++j) {
      const uint64_t bit = 1ull << (j & 63);
      if (mask && !(mask[j >> 6] & bit)) continue;
      if (signs[j >> 6] & bit) {
        p += x[j];
      } else {
        q += x[j];
      }
    }
    const float scale = _cvtsh_ss(scales[b]);
    acc += mask ? scale * (p - q) : scale * (2 * p - block_sums[b]);
  }
  return acc;
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = half_to_float(src[j]);
}

}  // namespace

const Kernels* avx2_kernels() {
  static const Kernels k{"avx2", dot_f32, dot_f16, dot_sign, f16_to_f32};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace stb::cpu
#endif
