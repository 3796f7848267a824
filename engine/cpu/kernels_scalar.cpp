// Portable kernels: the reference every SIMD path is tested against, and the fallback on any CPU.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

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

namespace {

float dot_f32(const float* w, const float* x, int64_t n) {
  float acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += w[j] * x[j];
  return acc;
}

float dot_f16(const uint16_t* w, const float* x, int64_t n) {
  float acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += half_to_float(w[j]) * x[j];
  return acc;
}

float dot_sign(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int block, const float* x,
               const float*, int64_t n) {
  float acc = 0;
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t end = b0 + block < n ? b0 + block : n;
    float sum = 0;
    for (int64_t j = b0; j < end; ++j) {
      const uint64_t bit = 1ull << (j & 63);
      if (mask && !(mask[j >> 6] & bit)) continue;
      sum += (signs[j >> 6] & bit) ? x[j] : -x[j];
    }
    acc += half_to_float(scales[b0 / block]) * sum;
  }
  return acc;
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = half_to_float(src[j]);
}

// AVX2 + FMA + F16C usable: CPUID says so and the OS saves the YMM state (XGETBV), not CPUID alone.
bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!(osxsave && fma && f16c && avx)) return false;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6) != 0x6) return false;  // XMM and YMM state enabled
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);
#else
  return false;
#endif
}

}  // namespace

const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", dot_f32, dot_f16, dot_sign, f16_to_f32};
  return k;
}

const Kernels& best_kernels() {
  static const bool avx2 = avx2_kernels() && cpu_has_avx2();
  const char* force = std::getenv("STBLLM_FORCE_SCALAR");
  if (force && *force && std::strcmp(force, "0") != 0) return scalar_kernels();
  return avx2 ? *avx2_kernels() : scalar_kernels();
}

}  // namespace stb::cpu
