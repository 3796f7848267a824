// AVX2 binary-groups kernel (layout: kernels_groups.h, with salient chunks): vpermps indexes only 8 entries, so
// each (row, block) has two 8-entry codebooks, the regions' for the steps and the salient one for the salient
// chunks; every 8 weights take one lookup (salient chunks with two salient groups: one per group and a blend).
#include "cpu/kernels_groups.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>

#include "cpu/groups_rows.h"

namespace stb::cpu {

namespace {

struct GroupsAvx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8, kPassTokens = 8, kPassRows = 1;
  static constexpr bool kSalientChunks = true;

  // Codebook lanes 2g + s (kernels_groups.h): α_g·s + μ_g; lanes from 2·regions on (the zero code 7 among them)
  // are 0.
  struct Consts {
    __m256 region_active;
    int salient_at;  // index of α₁ in a block's params
    bool two_groups;  // ARB's column-group bitmap: a second salient group's params follow the first's
  };
  static Consts consts(int regions, int salient_groups) {
    alignas(32) int active[8] = {};
    for (int e = 0; e < 2 * regions; ++e) active[e] = -1;
    return {_mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(active))), 2 * regions,
            salient_groups == 2};
  }

  // The params [α₀ μ₀ α₁ μ₁ ...] give lanes [α₀·(−1) + μ₀, μ₀·1 + α₀, ...]: one rounding each of α·s + μ (α·s is
  // exact), the format's order of operations, with the pairs in place, so an in-lane swap does the permuting.
  using Table = __m256;  // the region codebook
  static __m256 table(const uint16_t* params, const Consts& c) {
    const __m256 p = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(params)));
    const __m256 minus_plus = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
    return _mm256_and_ps(c.region_active, _mm256_fmadd_ps(p, minus_plus, _mm256_permute_ps(p, 0xB1)));
  }
  // Entries 8h + 4 + 2s + t: (α₁·s + μ₁) + (α₂·t + μ₂) of salient group h, each term rounded on its own as in
  // the format. Entries 8h .. 8h + 3 (padding slots and pruned salient weights) are never written: the caller
  // zeroes the books once.
  static void store_salient(const uint16_t* params, const Consts& c, float* book) {
    const __m128 minus_plus = _mm_setr_ps(-1, 1, -1, 1);
    for (int h = 0; h < 1 + c.two_groups; ++h) {
      const __m128 p = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(params + c.salient_at + 4 * h)));
      const __m128 terms = _mm_fmadd_ps(p, minus_plus, _mm_permute_ps(p, 0xB1));  // μ₁∓α₁, μ₂∓α₂
      _mm_storeu_ps(book + 8 * h + 4, _mm_add_ps(_mm_permute_ps(terms, 0x50), _mm_permute_ps(terms, 0xEE)));
    }
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
  // Columns 8·Sub .. 8·Sub + 7 = 16k + 8h + i: nibble k of words 8h .. 8h + 7 (codes < 8: vpermps ignores the
  // higher nibbles).
  template <int Sub>
  static __m256 weights(const Table& table, const Step& step) {
    constexpr int k = Sub / 2, h = Sub % 2;
    return _mm256_permutevar8x32_ps(table, _mm256_srli_epi32(step.half[h], 4 * k));
  }
  // Slot i of the chunk: nibble i of its 32-bit word; with two groups, its bit 3 picks the book's second half.
  static __m256 salient_weights(const float* book, const uint8_t* codes, const Consts& c) {
    int32_t word;
    std::memcpy(&word, codes, sizeof word);
    const __m256i nibble_shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i index = _mm256_srlv_epi32(_mm256_set1_epi32(word), nibble_shifts);
    const __m256 first = _mm256_permutevar8x32_ps(_mm256_loadu_ps(book), index);
    if (!c.two_groups) return first;
    const __m256 second = _mm256_permutevar8x32_ps(_mm256_loadu_ps(book + 8), index);
    return _mm256_blendv_ps(first, second, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
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
  static const GroupsKernels k{true, groups_rows<GroupsAvx2>};
  return &k;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
const GroupsKernels* avx2_groups() { return nullptr; }
}  // namespace stb::cpu
#endif
