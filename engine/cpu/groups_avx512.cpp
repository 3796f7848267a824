// AVX-512 binary-groups kernel (layout: kernels_groups.h): the 16-entry codebook fills one register, so a single
// vpermps turns 16 codes into 16 weights.
#include "cpu/kernels_groups.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/groups_rows.h"

namespace stb::cpu {

namespace {

struct GroupsAvx512 {
  using Vec = __m512;
  using Table = __m512;
  using Step = __m512i;  // 16-bit code words widened to 32-bit lanes
  static constexpr int kLanes = 16, kPassTokens = 4, kPassRows = 4;
  static constexpr bool kSalientChunks = false;

  // Lanes 1-6: the regions' α·s + μ; lanes 8-11: the salient first term α₁·s + μ₁, lanes 12-15 its second term
  // α₂·t + μ₂, each with one rounding (α·s is exact) as the format's order of operations. Per lane: which params
  // give α and μ, and the sign; lanes outside `active` (pruned, no region) are 0. With two salient groups lanes
  // 12-15 hold the second group's first terms instead, and alpha2/mu2/sign2 give both groups' second terms.
  struct Consts {
    __m512i alpha, mu;
    __m512 sign;
    __mmask16 active;
    bool two_groups;
    __m512i alpha2, mu2;
    __m512 sign2;
  };
  static Consts consts(int regions, int salient_groups) {
    alignas(64) int alpha[16] = {}, mu[16] = {};
    alignas(64) float sign[16] = {};
    unsigned active = 0;
    for (int e = 1; e <= 2 * regions; ++e) {  // region (e - 1) / 2, sign bit (e - 1) & 1
      alpha[e] = 2 * ((e - 1) / 2), mu[e] = alpha[e] + 1, sign[e] = (e - 1) & 1 ? 1.f : -1.f;
      active |= 1u << e;
    }
    for (int e = 8; e < 16; ++e) {  // salient entry 8 + i: sign bit 1 and residual bit 0 of i
      const int i = e & 3, second = e >= 12;
      alpha[e] = 2 * regions + 2 * second, mu[e] = alpha[e] + 1;
      sign[e] = (second ? i & 1 : i & 2) ? 1.f : -1.f;
      active |= 1u << e;
    }
    alignas(64) int alpha2[16] = {}, mu2[16] = {};
    alignas(64) float sign2[16] = {};
    const bool two = salient_groups == 2;
    for (int e = 8; e < 16; ++e) {  // entry 8 + 4h + 2s + t of group h
      const int h = (e - 8) / 4;
      if (two) alpha[e] = 2 * regions + 4 * h, mu[e] = alpha[e] + 1, sign[e] = e & 2 ? 1.f : -1.f;
      alpha2[e] = 2 * regions + 4 * h + 2, mu2[e] = alpha2[e] + 1, sign2[e] = e & 1 ? 1.f : -1.f;
    }
    return {_mm512_load_si512(alpha), _mm512_load_si512(mu), _mm512_load_ps(sign), __mmask16(active), two,
            _mm512_load_si512(alpha2), _mm512_load_si512(mu2), _mm512_load_ps(sign2)};
  }

  // With one salient group entries 12-15 keep their second terms: no code reads them.
  static __m512 table(const uint16_t* params, const Consts& c) {
    const __m512 p = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
    const __m512 terms = _mm512_maskz_fmadd_ps(c.active, _mm512_permutexvar_ps(c.alpha, p), c.sign,
                                               _mm512_permutexvar_ps(c.mu, p));
    if (c.two_groups) {
      const __m512 second = _mm512_fmadd_ps(_mm512_permutexvar_ps(c.alpha2, p), c.sign2, _mm512_permutexvar_ps(c.mu2, p));
      return _mm512_mask_add_ps(terms, 0xFF00, terms, second);
    }
    const __m512 second = _mm512_shuffle_f32x4(terms, terms, 0xFF);  // 128-bit lane 3 (entries 12-15) everywhere
    return _mm512_mask_add_ps(terms, 0x0F00, terms, second);
  }

  static __m512i load_step(const uint8_t* codes) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  }
  template <int Sub>
  static __m512 weights(__m512 table, __m512i step) {
    return _mm512_permutexvar_ps(_mm512_srli_epi32(step, 4 * Sub), table);
  }

  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 load(const float* x) { return _mm512_loadu_ps(x); }
  static __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

const GroupsKernels* avx512_groups() {
  static const GroupsKernels k{false, groups_rows<GroupsAvx512>};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const GroupsKernels* avx512_groups() { return nullptr; }
}  // namespace stb::cpu
#endif
