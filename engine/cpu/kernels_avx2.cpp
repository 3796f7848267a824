// AVX2 + FMA + F16C kernels (compiled with those flags; called only after run-time detection).
#include "cpu/kernels.h"
#include "cpu/attend.h"
#include "cpu/int8_tiles.h"
#include "cpu/qgroup_tiles.h"
#include "cpu/kernels_groups.h"
#include "cpu/silu.h"
#include "cpu/sign_lut.h"

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

// 8 keys or values as floats: float rows load directly, fp16 rows (a KvType::F16 cache) convert with F16C.
__m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float to_float(float x) { return x; }
inline float to_float(uint16_t h) { return half_to_float(h); }

// Σ w_j · x_j with two accumulators, for float or fp16 w (dot_f32, and an fp16 key's attention score).
template <class T>
float dot_as(const T* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_fmadd_ps(load8(w + j), _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(load8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
  }
  float acc = hsum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) acc += to_float(w[j]) * x[j];
  return acc;
}

float dot_f32(const float* w, const float* x, int64_t n) { return dot_as(w, x, n); }

// fp16 weights against up to 6 activation rows at once, two accumulators per row whatever the count (so a row's
// bits do not depend on its batch): every pair of weight vectors is converted once per pass.
template <int T>
void dot_f16_pass(const uint16_t* w, const float* x, int64_t cols, float* out, int64_t out_stride) {
  __m256 a0[T], a1[T];
  for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 8)));
    for (int t = 0; t < T; ++t) {
      a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * cols + j), a0[t]);
      a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * cols + j + 8), a1[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    float acc = hsum(_mm256_add_ps(a0[t], a1[t]));
    for (int64_t k = j; k < cols; ++k) acc += half_to_float(w[k]) * x[t * cols + k];
    out[t * out_stride] = acc;
  }
}

void dot_f16_rows(const uint16_t* w, const float* x, int n, int64_t cols, float* out, int64_t out_stride) {
  constexpr int kRowsPerPass = 6;  // 12 accumulators + 2 weight vectors in 16 ymm registers
  for (int t0 = 0; t0 < n; t0 += kRowsPerPass) {
    const float* xt = x + t0 * cols;
    float* ot = out + t0 * out_stride;
    switch (n - t0 < kRowsPerPass ? n - t0 : kRowsPerPass) {
      case 1: dot_f16_pass<1>(w, xt, cols, ot, out_stride); break;
      case 2: dot_f16_pass<2>(w, xt, cols, ot, out_stride); break;
      case 3: dot_f16_pass<3>(w, xt, cols, ot, out_stride); break;
      case 4: dot_f16_pass<4>(w, xt, cols, ot, out_stride); break;
      case 5: dot_f16_pass<5>(w, xt, cols, ot, out_stride); break;
      default: dot_f16_pass<6>(w, xt, cols, ot, out_stride);
    }
  }
}

void quantize_q8(const float* x, int64_t cols, int8_t* q, float* d) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int64_t g0 = 0;
  for (; g0 + kQ8Group <= cols; g0 += kQ8Group) {
    __m256 v[8], amax = _mm256_setzero_ps();
    for (int i = 0; i < 8; ++i) {
      v[i] = _mm256_loadu_ps(x + g0 + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float top = _mm_cvtss_f32(m);
    const __m256 inv = _mm256_set1_ps(top > 0 ? 127.0f / top : 0.0f);
    __m256i n[8];
    for (int i = 0; i < 8; ++i)
      n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // Pack 4 × 8 int32 -> 32 int8; packs interleave the 128-bit lanes, the permute restores the order.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int h = 0; h < 2; ++h) {
      const __m256i lo = _mm256_packs_epi32(n[4 * h], n[4 * h + 1]), hi = _mm256_packs_epi32(n[4 * h + 2], n[4 * h + 3]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g0 + 32 * h),
                          _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order));
    }
    d[g0 / kQ8Group] = top / 127.0f;
  }
  if (g0 < cols) scalar_kernels().quantize_q8(x + g0, cols - g0, q + g0, d + g0 / kQ8Group);
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = half_to_float(src[j]);
}

// engine/cpu/silu.h's exp, 8 lanes, the same operations in the same order as silu::exp_ref.
__m256 exp_ps(__m256 x0) {
  const __m256 hi = _mm256_set1_ps(silu::kExpMax);
  const __m256 x = _mm256_max_ps(_mm256_min_ps(x0, hi), _mm256_set1_ps(silu::kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(silu::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(silu::kLn2Hi))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(silu::kLn2Lo)));
  __m256 p = _mm256_set1_ps(silu::kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(silu::kP[i]));
  const __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), _mm256_set1_ps(INFINITY),
                          _mm256_cmp_ps(x0, hi, _CMP_GT_OQ));
}

void silu_gate(const float* gate, float* up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 u = _mm256_loadu_ps(up + i), a = gate ? _mm256_loadu_ps(gate + i) : u;
    const __m256 act = _mm256_div_ps(a, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(zero, a))));
    _mm256_storeu_ps(up + i, gate ? _mm256_mul_ps(act, u) : act);
  }
  silu::silu_gate_ref(gate, up, i, n);
}

void exp_weights(const float* logits, float temperature, float top, float* out, int64_t n) {
  const auto t = _mm256_set1_ps(temperature), shift = _mm256_set1_ps(top);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, exp_ps(_mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(logits + i), t), shift)));
  silu::exp_weights_ref(logits, temperature, top, out, i, n);
}

// Scores of 8 keys at once: key i's partial sums in acc[i], then three rounds of hadd and a swap of 128-bit halves
// turn the 8 accumulators into one vector of the 8 totals (instead of 8 horizontal sums). hd % 8 == 0.
template <class T>
__m256 dot_8_keys(const float* q, const T* k, int64_t stride, int hd) {
  __m256 acc[8];
  for (__m256& a : acc) a = _mm256_setzero_ps();
  for (int d = 0; d < hd; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(load8(k + i * stride + d), qv, acc[i]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <class T>  // float or fp16 keys and values
void attend_as(const float* q, int heads, const T* keys, const T* values, int64_t kv_stride, int first, int last,
               int hd, float scale, float* scores, float* out) {
  auto key_scores = [](const float* qh, const T* k, int64_t stride, int count, int n, float sc, float* s) {
    int i = 0;
    if (n % 8 == 0)
      for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(s + i, _mm256_mul_ps(dot_8_keys(qh, k + i * stride, stride, n), _mm256_set1_ps(sc)));
    for (; i < count; ++i) s[i] = dot_as(k + i * stride, qh, n) * sc;
  };
  // 32 outputs at a time in registers over all positions (an accumulator in memory made every position wait for
  // the previous one's store).
  auto weighted_sum = [](const float* p, const T* v, int64_t stride, int count, int n, float* o) {
    int d = 0;
    for (; d + 32 <= n; d += 32) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int i = 0; i < count; ++i) {
        const __m256 pi = _mm256_set1_ps(p[i]);
        for (int c = 0; c < 4; ++c)
          acc[c] = _mm256_add_ps(acc[c], _mm256_mul_ps(pi, load8(v + i * stride + d + 8 * c)));
      }
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + d + 8 * c, acc[c]);
    }
    for (; d < n; ++d) {
      float acc = 0;
      for (int i = 0; i < count; ++i) acc += p[i] * to_float(v[i * stride + d]);
      o[d] = acc;
    }
  };
  attend_heads_with(key_scores, exp_weights, weighted_sum, q, heads, keys, values, kv_stride, first, last, hd, scale,
                    scores, out);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace

const Kernels* avx2_kernels() {
  // Binary, int8 and k-bit group matrices always take the lookup and tile kernels here (the backend repacks them);
  // sign_row_q8, int8_row_q8 and qgroup_row_q8 are the portable ones for completeness.
  static const Kernels k{"avx2", dot_f32, dot_f16_rows, f16_to_f32, attend_as<float>, attend_as<uint16_t>,
                         f32_to_f16, silu_gate, exp_weights, quantize_q8,
                         scalar_kernels().sign_row_q8,
                         scalar_kernels().int8_row_q8, scalar_kernels().qgroup_row_q8, avx2_sign_lut(), avx2_groups(),
                         avx2_int8_tiles(), avx2_qgroup_tiles()};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace stb::cpu
#endif
