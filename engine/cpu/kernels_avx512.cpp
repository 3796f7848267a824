// AVX-512 (F/BW/VL/DQ) kernels; called only after run-time detection. The float and int8 kernels are the AVX2
// ones (every AVX-512 CPU has AVX2; they are memory-bound). The sign-block kernel differs in kind: a 64-bit sign
// word IS a 64-lane byte mask, so the weight row needs no expansion — each group of 64 activations is negated or
// zeroed under mask registers directly.
#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace stb::cpu {

namespace {

void sign_row_q8(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int block, int64_t cols,
                 const int8_t* q, const float* d, int n, float* out, int64_t out_stride, int8_t*) {
  const int64_t groups = q8_groups(cols), per_block = block / kQ8Group;
  const uint64_t last_keep = cols % 64 ? (1ull << (cols % 64)) - 1 : ~0ull;  // padding columns weigh nothing
  const __m512i ones8 = _mm512_set1_epi8(1), ones16 = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
  for (int t = 0; t < n; ++t) {
    const int8_t* qt = q + t * groups * kQ8Group;
    const float* dt = d + t * groups;
    // Two accumulators hide the FMA latency; each group's integer sum is scaled by d_g·α_b in one step.
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0, b = 0, in_block = 0; g < groups; ++g) {  // group g of activations = sign word g
      uint64_t keep = mask ? mask[g] : ~0ull;
      if (g == groups - 1) keep &= last_keep;
      const __m512i qv = _mm512_loadu_si512(qt + g * kQ8Group);
      __m512i p = _mm512_maskz_mov_epi8(signs[g] & keep, qv);  // +q where the sign is +1
      p = _mm512_mask_sub_epi8(p, ~signs[g] & keep, zero, qv);   // −q where it is −1; 0 elsewhere
      const __m512i s32 = _mm512_madd_epi16(_mm512_maddubs_epi16(ones8, p), ones16);
      acc[g & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_set1_ps(dt[g] * _cvtsh_ss(scales[b])), acc[g & 1]);
      if (++in_block == per_block) in_block = 0, ++b;
    }
    out[t * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
  }
}

}  // namespace

const Kernels* avx512_kernels() {
  const Kernels* base = avx2_kernels();
  if (!base) return nullptr;
  static const Kernels k{"avx512", base->dot_f32, base->dot_f16, base->f16_to_f32, base->quantize_q8, sign_row_q8,
                         base->int8_row_q8, base->sign_lut};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace stb::cpu
#endif
