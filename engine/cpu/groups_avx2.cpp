// AVX2 binary-groups kernel (layout: kernels_groups.h): vpermps indexes only 8 entries, so the codebook is two
// registers, entries 0–7 (pruned, regions) and 8–15 (salient); both are looked up and bit 3 of the code picks one.
#include "cpu/kernels_groups.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/groups_rows.h"

namespace stb::cpu {

namespace {

struct GroupsAvx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8, kPassTokens = 8, kPassRows = 1;

  // Entries 0–7: α and μ of lane e's region and its sign (0 and a zero `low_active` lane for entries that are no
  // region). Entries 8–11 are computed from the 4 salient params loaded on their own (lanes 0–3 of `salient`).
  struct Consts {
    __m256i alpha, mu;
    __m256 sign, low_active;
    int salient_at;  // index of α₁ in a block's params
  };
  static Consts consts(int regions) {
    alignas(32) int alpha[8] = {}, mu[8] = {}, active[8] = {};
    alignas(32) float sign[8] = {};
    for (int e = 1; e <= 2 * regions; ++e)
      alpha[e] = 2 * ((e - 1) / 2), mu[e] = alpha[e] + 1, sign[e] = (e - 1) & 1 ? 1.f : -1.f, active[e] = -1;
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(alpha)),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(mu)), _mm256_load_ps(sign),
            _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(active))), 2 * regions};
  }

  struct Table {
    __m256 low, high;
  };
  // α·s + μ with one rounding (α·s is exact), as the format's order of operations; salient entries add the
  // second term's own rounded α₂·t + μ₂.
  static Table table(const uint16_t* params, const Consts& c) {
    auto load8 = [](const uint16_t* p) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    };
    const __m256 p = load8(params), sal = load8(params + c.salient_at);  // sal: α₁ μ₁ α₂ μ₂ in lanes 0-3
    const __m256 low = _mm256_and_ps(
        c.low_active, _mm256_fmadd_ps(_mm256_permutevar8x32_ps(p, c.alpha), c.sign, _mm256_permutevar8x32_ps(p, c.mu)));
    auto lane = [&](int i) { return _mm256_permutevar8x32_ps(sal, _mm256_set1_epi32(i)); };
    const __m256 s = _mm256_setr_ps(-1, -1, 1, 1, 0, 0, 0, 0), t = _mm256_setr_ps(-1, 1, -1, 1, 0, 0, 0, 0);
    const __m256 salient_active = _mm256_castsi256_ps(_mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));
    const __m256 high = _mm256_and_ps(
        salient_active, _mm256_add_ps(_mm256_fmadd_ps(lane(0), s, lane(1)), _mm256_fmadd_ps(lane(2), t, lane(3))));
    return {low, high};
  }

  struct Step {
    __m256i half[2];  // 16-bit code words 0-7 and 8-15 widened to 32-bit lanes
  };
  static Step load_step(const uint8_t* codes) {
    auto widen = [](const uint8_t* p) {
      return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    };
    return {{widen(codes), widen(codes + 16)}};
  }
  // Columns 8·Sub .. 8·Sub + 7 = 16k + 8h + i: nibble k of words 8h .. 8h + 7.
  template <int Sub>
  static __m256 weights(const Table& table, const Step& step) {
    constexpr int k = Sub / 2, h = Sub % 2;
    const __m256i index = _mm256_srli_epi32(step.half[h], 4 * k);
    const __m256 salient_bit = _mm256_castsi256_ps(_mm256_slli_epi32(step.half[h], 28 - 4 * k));  // bit 3 -> sign
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table.low, index),
                            _mm256_permutevar8x32_ps(table.high, index), salient_bit);
  }

  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 load(const float* x) { return _mm256_loadu_ps(x); }
  static __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace

const GroupsKernels* avx2_groups() {
  static const GroupsKernels k{groups_rows<GroupsAvx2>};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const GroupsKernels* avx2_groups() { return nullptr; }
}  // namespace stb::cpu
#endif
