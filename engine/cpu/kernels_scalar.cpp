// Portable kernels: the reference every SIMD path is tested against, and the fallback on any CPU.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/attend.h"
#include "cpu/kernels.h"
#include "cpu/silu.h"
#include "stbllm/qgroup.h"

namespace stb::cpu {

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exponent = 113;
    while (!(mantissa & 0x400)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  x &= 0x7fffffff;
  if (x > 0x7f800000) return sign | 0x7e00;  // NaN
  if (x >= 0x477ff000) return sign | 0x7c00;  // >= 65520: inf
  const int exp32 = int(x >> 23);
  if (exp32 < 102) return sign;  // below 2^-25: rounds to zero
  // Normal fp16 results keep 10 mantissa bits (drop 13); subnormals are counted in units of 2^-24.
  const uint32_t mant = (x & 0x7fffff) | 0x800000;
  const int shift = exp32 >= 113 ? 13 : 126 - exp32;
  uint32_t h = exp32 >= 113 ? (uint32_t(exp32 - 112) << 10) | ((mant & 0x7fffff) >> 13) : mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1))) ++h;  // a carry rolls into the exponent, as it should
  return uint16_t(sign | h);
}

namespace {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t h) { return half_to_float(h); }

template <class T>  // float, or fp16 keys
float dot_as(const T* w, const float* x, int64_t n) {
  float acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += to_float(w[j]) * x[j];
  return acc;
}

float dot_f32(const float* w, const float* x, int64_t n) { return dot_as(w, x, n); }

float dot_f16(const uint16_t* w, const float* x, int64_t n) { return dot_as(w, x, n); }

void dot_f16_rows(const uint16_t* w, const float* x, int n, int64_t cols, float* out, int64_t out_stride) {
  for (int t = 0; t < n; ++t) out[t * out_stride] = dot_f16(w, x + t * cols, cols);
}

void quantize_q8(const float* x, int64_t cols, int8_t* q, float* d) {
  for (int64_t g0 = 0; g0 < cols; g0 += kQ8Group) {
    const int64_t end = g0 + kQ8Group < cols ? g0 + kQ8Group : cols;
    float amax = 0;
    for (int64_t j = g0; j < end; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (int64_t j = g0; j < g0 + kQ8Group; ++j) q[j] = j < end ? int8_t(std::nearbyint(x[j] * inv)) : 0;
    d[g0 / kQ8Group] = amax / 127.0f;
  }
}

void expand_signs(const uint64_t* signs, const uint64_t* mask, int64_t cols, int8_t* w) {
  const int64_t padded = q8_groups(cols) * kQ8Group;
  for (int64_t j = 0; j < padded; ++j) {
    const uint64_t bit = 1ull << (j & 63);
    const bool kept = j < cols && (!mask || (mask[j >> 6] & bit));
    w[j] = kept ? ((signs[j >> 6] & bit) ? 1 : -1) : 0;
  }
}

float dot_expanded_q8(const int8_t* w, const int8_t* q, const float* d, const uint16_t* scales, int block,
                      int64_t cols) {
  const int64_t groups = q8_groups(cols), per_block = block / kQ8Group;
  float acc = 0;
  for (int64_t g0 = 0; g0 < groups; g0 += per_block) {
    float block_acc = 0;
    for (int64_t g = g0; g < std::min(groups, g0 + per_block); ++g) {
      int32_t isum = 0;
      for (int j = 0; j < kQ8Group; ++j) isum += int32_t(w[g * kQ8Group + j]) * q[g * kQ8Group + j];
      block_acc += float(isum) * d[g];
    }
    acc += half_to_float(scales[g0 / per_block]) * block_acc;
  }
  return acc;
}

void int8_row_q8(const int8_t* w, const uint16_t* ws, int64_t cols, const int8_t* q, const float* d, int n,
                 float* out, int64_t out_stride) {
  const int64_t groups = q8_groups(cols);
  for (int t = 0; t < n; ++t) {
    const int8_t* qt = q + t * groups * kQ8Group;
    float acc = 0;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t isum = 0;
      for (int j = 0; j < kQ8Group; ++j) isum += int32_t(w[g * kQ8Group + j]) * qt[g * kQ8Group + j];
      acc += half_to_float(ws[g]) * d[t * groups + g] * float(isum);
    }
    out[t * out_stride] = acc;
  }
}

// Expands the weight row once, then reuses it for every activation row.
void sign_row_q8(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int block, int64_t cols,
                 const int8_t* q, const float* d, int n, float* out, int64_t out_stride, int8_t* scratch) {
  expand_signs(signs, mask, cols, scratch);
  const int64_t groups = q8_groups(cols);
  for (int t = 0; t < n; ++t)
    out[t * out_stride] = dot_expanded_q8(scratch, q + t * groups * kQ8Group, d + t * groups, scales, block, cols);
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = half_to_float(src[j]);
}

// Unpacks the row's codes once, then reuses them for every activation row.
void qgroup_row_q8(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int bits, int group,
                   int64_t cols, const int8_t* q, const float* d, const float* xsum, int n, float* out,
                   int64_t out_stride, uint8_t* scratch) {
  const int64_t chunks = qgroup_chunks(cols), q8 = q8_groups(cols), groups = (cols + group - 1) / group;
  qgroup_unpack_codes(codes, bits, chunks, scratch);
  for (int t = 0; t < n; ++t) {
    const int8_t* qt = q + t * q8 * kQ8Group;
    float acc = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t isum = 0;
      for (int j = c * kQGroupChunk; j < (c + 1) * kQGroupChunk; ++j) isum += int32_t(scratch[j]) * qt[j];
      acc += half_to_float(scales[c * kQGroupChunk / group]) * d[t * q8 + c / 2] * float(isum);
    }
    for (int64_t g = 0; g < groups; ++g) acc += half_to_float(offsets[g]) * xsum[t * groups + g];
    out[t * out_stride] = acc;
  }
}

void silu_gate(const float* gate, float* up, int64_t n) { silu::silu_gate_ref(gate, up, 0, n); }

void exp_weights(const float* logits, float temperature, float top, float* out, int64_t n) {
  silu::exp_weights_ref(logits, temperature, top, out, 0, n);
}

template <class T>  // float or fp16 keys and values
void attend_as(const float* q, int heads, const T* keys, const T* values, int64_t kv_stride, int first, int last,
               int hd, float scale, float* scores, float* out) {
  auto key_scores = [](const float* qh, const T* k, int64_t stride, int count, int n, float sc, float* s) {
    for (int i = 0; i < count; ++i) s[i] = dot_as(k + i * stride, qh, n) * sc;
  };
  auto weighted_sum = [](const float* p, const T* v, int64_t stride, int count, int n, float* o) {
    std::fill(o, o + n, 0.f);
    for (int i = 0; i < count; ++i)
      for (int d = 0; d < n; ++d) o[d] += p[i] * to_float(v[i * stride + d]);
  };
  attend_heads_with(key_scores, exp_weights, weighted_sum, q, heads, keys, values, kv_stride, first, last, hd, scale,
                    scores, out);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace

void qgroup_activation_sums(const int8_t* q, const float* d, int64_t cols, int group, int n, float* xsum) {
  const int64_t chunks = qgroup_chunks(cols), q8 = q8_groups(cols), groups = (cols + group - 1) / group;
  for (int t = 0; t < n; ++t) {
    float* xt = xsum + t * groups;
    std::fill(xt, xt + groups, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t isum = 0;
      for (int64_t j = c * kQGroupChunk; j < (c + 1) * kQGroupChunk; ++j) isum += q[t * q8 * kQ8Group + j];
      xt[c * kQGroupChunk / group] += d[t * q8 + c / 2] * float(isum);
    }
  }
}

const Kernels& scalar_kernels() {
  static const Kernels k{"scalar",    dot_f32,     dot_f16_rows, f16_to_f32, attend_as<float>,
                         attend_as<uint16_t>, f32_to_f16, silu_gate, exp_weights, quantize_q8,
                         sign_row_q8, int8_row_q8, qgroup_row_q8, nullptr,    nullptr,   nullptr,
                         nullptr};
  return k;
}

}  // namespace stb::cpu
