// stb.qgroup.v1 kernels shared by the AVX2 and AVX-512 paths (included only by files compiled with AVX2): a chunk of
// 32 codes (layout: include/stbllm/qgroup.h) becomes 32 byte lanes in column order with a few shifts and masks, and
// vpmaddubsw multiplies those unsigned codes into the signed int8 activations (at most 2 · 15 · 127 per pair: no
// saturation). A pass decodes each chunk once for NT activation rows.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "cpu/kernels.h"
#include "stbllm/qgroup.h"

namespace stb::cpu {

template <int Bits>
inline __m256i qgroup_chunk_codes(const uint8_t* p) {
  if constexpr (Bits == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
  } else {
    int64_t low;
    std::memcpy(&low, p, 8);  // lane 8s + i: byte i shifted right by 2s
    __m256i codes = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(low), _mm256_setr_epi64x(0, 2, 4, 6)),
                                     _mm256_set1_epi8(3));
    if constexpr (Bits == 3) {  // lane j: bit j of the u32 -> byte j / 8 of it, then bit j % 8 of that byte
      int32_t high;
      std::memcpy(&high, p + 8, 4);
      const __m256i bytes = _mm256_shuffle_epi8(
          _mm256_set1_epi32(high), _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
      const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
      codes = _mm256_or_si256(codes, _mm256_and_si256(set, _mm256_set1_epi8(4)));
    }
    return codes;
  }
}

// The weight group of each chunk as a row's chunks go by, without a division per chunk (the group is a runtime
// value, and a 64-bit division costs more than the chunk's arithmetic).
struct QGroupCursor {
  int64_t group = 0;  // the current chunk's group
  int64_t left;       // chunks of that group from the current one on
  int64_t per_group;
  explicit QGroupCursor(int group_cols) : left(group_cols / kQGroupChunk), per_group(group_cols / kQGroupChunk) {}
  int64_t next_group() const { return left > 1 ? group : group + 1; }  // the following chunk's group
  void advance(int chunks) {
    for (left -= chunks; left <= 0; left += per_group) ++group;
  }
};

// Σ codes · q over one chunk as 8 int32 lanes.
inline __m256i qgroup_chunk_dot(__m256i codes, const int8_t* q) {
  const __m256i pairs = _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

inline float qgroup_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The offset term Σ_g offset_g · xsum_t[g] of one activation row.
inline float qgroup_offset_term(const uint16_t* offsets, const float* xsum, int64_t groups) {
  float acc = 0;
  for (int64_t g = 0; g < groups; ++g) acc += _cvtsh_ss(offsets[g]) * xsum[g];
  return acc;
}

}  // namespace stb::cpu
