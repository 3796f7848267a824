// Batched (GEMM) int8 kernels with AVX-512 VNNI (`vpdpbusd`: 64 u8 × s8 products summed per 4 into 16 int32 lanes
// per instruction), compiled with -mavx512vnni and used only when the CPU has it. Every lane accumulates one
// output row, so a weight vector is built (or loaded) once and multiplied with up to 8 activation rows, and each
// activation group's integer sum comes out exact. vpdpbusd wants one unsigned operand: the weights are offset to
// unsigned bytes and the offset's contribution, a multiple of the activation group's sum Σq, subtracted.
// Float operations follow the scalar reference's order (kernels_scalar.cpp), so the results are bit-identical.
#include "cpu/int8_tiles.h"
#include "cpu/kernels.h"
#include "cpu/sign_lut.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>

#include "cpu/qgroup_tiles.h"

namespace stb::cpu {

namespace {

constexpr int kMaxRowsPerPass = 8;  // activation rows sharing one expanded weight vector (register budget)

// Stores lanes [0, valid) of 16 outputs of activation row t.
inline void store_rows(float* out, __m512 v, int64_t valid) {
  _mm512_mask_storeu_ps(out, __mmask16(valid >= 16 ? 0xFFFF : (1u << valid) - 1), v);
}

inline int64_t load_u64(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- stb.sign-block.v1 on the lookup layout (sign_lut.h) --------------------------------------------------------
// Byte r of a tile's 32-byte vector for pair p holds the 8 sign (or kept-positive) bits of row r, columns 8p..8p+7,
// so 8 such bytes are a 64-bit mask for 8 rows × 8 columns. Expanded to bytes w + 1 ∈ {0, 1, 2} (dense: 0 or 2), its
// dword lane 2i holds row i's columns 0-3 and lane 2i+1 columns 4-7; an 8-byte broadcast of the activations
// matches both. Per activation group the lane pairs are folded into 16 rows' sums, minus Σq for the offset.

template <int T, bool kMasked>
void sign_gemm_pass(const SignLut& l, int64_t tile, int half, const int8_t* q, int64_t q_stride, const float* d,
                    const int32_t* qsum, int64_t groups, float* out, int64_t out_stride) {
  const int64_t per_block = l.block / kQ8Group;
  const uint8_t* plus = l.plus.data() + tile * l.pairs * kLutTileRows + 16 * half;
  const uint8_t* minus = kMasked ? l.minus.data() + tile * l.pairs * kLutTileRows + 16 * half : nullptr;
  const uint16_t* alpha = l.alpha.data() + tile * l.blocks * kLutTileRows + 16 * half;
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 acc[T], block_acc[T];
  for (int t = 0; t < T; ++t) acc[t] = block_acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo[T], hi[T];  // rows 0-7 and 8-15 of this half tile, as lane pairs
    for (int t = 0; t < T; ++t) lo[t] = hi[t] = zero;
    for (int64_t p = 8 * g; p < 8 * g + 8; ++p) {
      const uint8_t* bits = plus + p * kLutTileRows;
      if (half == 0 && p % 2 == 0) {  // the next tile's line at this pair (as in int8_pass)
        _mm_prefetch(reinterpret_cast<const char*>(bits + l.pairs * kLutTileRows), _MM_HINT_T0);
        if (kMasked) _mm_prefetch(reinterpret_cast<const char*>(minus + (p + l.pairs) * kLutTileRows), _MM_HINT_T0);
      }
      __m512i w_lo, w_hi;
      if (kMasked) {
        const uint8_t* neg = minus + p * kLutTileRows;
        w_lo = _mm512_mask_mov_epi8(_mm512_mask_mov_epi8(one, __mmask64(load_u64(bits)), two),
                                    __mmask64(load_u64(neg)), zero);
        w_hi = _mm512_mask_mov_epi8(_mm512_mask_mov_epi8(one, __mmask64(load_u64(bits + 8)), two),
                                    __mmask64(load_u64(neg + 8)), zero);
      } else {
        w_lo = _mm512_maskz_mov_epi8(__mmask64(load_u64(bits)), two);
        w_hi = _mm512_maskz_mov_epi8(__mmask64(load_u64(bits + 8)), two);
      }
      for (int t = 0; t < T; ++t) {
        const __m512i x = _mm512_set1_epi64(load_u64(reinterpret_cast<const uint8_t*>(q + t * q_stride + 8 * p)));
        lo[t] = _mm512_dpbusd_epi32(lo[t], w_lo, x);
        hi[t] = _mm512_dpbusd_epi32(hi[t], w_hi, x);
      }
    }
    for (int t = 0; t < T; ++t) {
      __m512i sums = _mm512_add_epi32(_mm512_permutex2var_epi32(lo[t], even, hi[t]),
                                      _mm512_permutex2var_epi32(lo[t], odd, hi[t]));
      sums = _mm512_sub_epi32(sums, _mm512_set1_epi32(qsum[t * groups + g]));
      block_acc[t] = _mm512_add_ps(block_acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(sums),
                                                               _mm512_set1_ps(d[t * groups + g])));
    }
    if ((g + 1) % per_block == 0 || g + 1 == groups) {
      const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(alpha + (g / per_block) * kLutTileRows)));
      for (int t = 0; t < T; ++t) {
        acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(a, block_acc[t]));
        block_acc[t] = _mm512_setzero_ps();
      }
    }
  }
  const int64_t r0 = tile * kLutTileRows + 16 * half;
  for (int t = 0; t < T; ++t) store_rows(out + t * out_stride + r0, acc[t], l.rows - r0);
}

template <bool kMasked>
void sign_gemm_rows(const SignLut& l, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
                    const int32_t* qsum, int n, float* out, int64_t out_stride) {
  const int64_t groups = l.pairs / 8, q_stride = groups * kQ8Group;
  for (int64_t tile = tile0; tile < tile1; ++tile)
    for (int half = 0; half < 2 && tile * kLutTileRows + 16 * half < l.rows; ++half)
      for (int t0 = 0; t0 < n; t0 += kMaxRowsPerPass) {
        const int8_t* qt = q + t0 * q_stride;
        const float* dt = d + t0 * groups;
        const int32_t* st = qsum + t0 * groups;
        float* ot = out + t0 * out_stride;
        switch (n - t0 < kMaxRowsPerPass ? n - t0 : kMaxRowsPerPass) {
#define STB_PASS(T) \
  case T: sign_gemm_pass<T, kMasked>(l, tile, half, qt, q_stride, dt, st, groups, ot, out_stride); break;
          STB_PASS(1) STB_PASS(2) STB_PASS(3) STB_PASS(4) STB_PASS(5) STB_PASS(6) STB_PASS(7) STB_PASS(8)
#undef STB_PASS
        }
      }
}

void sign_gemm(const SignLut& l, int64_t tile0, int64_t tile1, const int8_t* q, const float* d, const int32_t* qsum,
               int n, float* out, int64_t out_stride) {
  (l.masked ? sign_gemm_rows<true> : sign_gemm_rows<false>)(l, tile0, tile1, q, d, qsum, n, out, out_stride);
}

// ---- stb.int8-group.v1 on 16-row tiles (int8_tiles.h) -----------------------------------------------------------
// Weights w + 128 as unsigned bytes (one xor), activations broadcast 4 at a time: Σ(w + 128)q − 128·Σq = Σwq.

template <int T>
void int8_pass(const Int8Tiles& w, int64_t tile, const int8_t* q, int64_t q_stride, const float* d,
               const int32_t* qsum, float* out, int64_t out_stride) {
  const int64_t groups = w.groups, steps = groups * (kQ8Group / 4);
  const int8_t* values = w.values.data() + tile * steps * 64;
  const uint16_t* scales = w.scales.data() + tile * groups * kInt8TileRows;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sums[T];
    for (int t = 0; t < T; ++t) sums[t] = _mm512_setzero_si512();
    for (int s = 0; s < kQ8Group / 4; ++s) {
      // The next tile's vector at the same step: with 8 activation rows the multiplies take as long as reading
      // the weights from memory, and the hardware prefetcher alone did not overlap the two.
      _mm_prefetch(reinterpret_cast<const char*>(values + (steps + g * 16 + s) * 64), _MM_HINT_T0);
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(values + (g * 16 + s) * 64), flip);
      for (int t = 0; t < T; ++t)
        sums[t] = _mm512_dpbusd_epi32(sums[t], wv, _mm512_set1_epi32(load_i32(q + t * q_stride + g * 64 + 4 * s)));
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * 16)));
    for (int t = 0; t < T; ++t) {
      const __m512i exact = _mm512_sub_epi32(sums[t], _mm512_set1_epi32(128 * qsum[t * groups + g]));
      acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_mul_ps(ws, _mm512_set1_ps(d[t * groups + g])),
                                                   _mm512_cvtepi32_ps(exact)));
    }
  }
  const int64_t r0 = tile * kInt8TileRows;
  for (int t = 0; t < T; ++t) store_rows(out + t * out_stride + r0, acc[t], w.rows - r0);
}

void int8_rows(const Int8Tiles& w, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
               const int32_t* qsum, int n, float* out, int64_t out_stride) {
  const int64_t q_stride = w.groups * kQ8Group;
  for (int64_t tile = tile0; tile < tile1; ++tile)
    for (int t0 = 0; t0 < n; t0 += kMaxRowsPerPass) {
      const int8_t* qt = q + t0 * q_stride;
      const float* dt = d + t0 * w.groups;
      const int32_t* st = qsum + t0 * w.groups;
      float* ot = out + t0 * out_stride;
      switch (n - t0 < kMaxRowsPerPass ? n - t0 : kMaxRowsPerPass) {
#define STB_PASS(T) \
  case T: int8_pass<T>(w, tile, qt, q_stride, dt, st, ot, out_stride); break;
        STB_PASS(1) STB_PASS(2) STB_PASS(3) STB_PASS(4) STB_PASS(5) STB_PASS(6) STB_PASS(7) STB_PASS(8)
#undef STB_PASS
      }
    }
}

// ---- stb.qgroup.v1 on 16-row tiles (qgroup_tiles.h) -------------------------------------------------------------
// Per unit of 16 columns the 4 quads decode into 4 vectors of codes (row r at bytes 4r..4r+3), each multiplied into
// every activation row of the pass with one vpdpbusd. A segment of columns with one weight scale and one activation
// scale (64 columns when the group is a multiple of 64, else 32) then costs one conversion and one FMA per
// activation row for all 16 rows; the offsets' term is added per group at the end.

template <int Bits>
inline void unit_quads(const uint8_t* p, __m512i (&w)[4]) {
  if constexpr (Bits == 4) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_loadu_si512(p + 64 * h);
      w[2 * h] = _mm512_and_si512(v, low4);
      w[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
  } else {
    const __m512i v = _mm512_loadu_si512(p), low2 = _mm512_set1_epi8(3);
    w[0] = _mm512_and_si512(v, low2);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), low2);
    w[2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low2);
    w[3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), low2);
    if constexpr (Bits == 3)  // bit 2 is clear so far: adding 4 under the quad's mask sets it (one masked vpaddb)
      for (int s = 0; s < 4; ++s)
        w[s] = _mm512_mask_add_epi8(w[s], __mmask64(load_u64(p + 64 + 8 * s)), w[s], _mm512_set1_epi8(4));
  }
}

template <int Bits, int T>
void qgroup_tile_pass(const QGroupTiles& w, int64_t tile, const int8_t* q, int64_t q_stride, const float* d,
                      int64_t d_stride, const float* xsum, float* out, int64_t out_stride) {
  const int64_t unit_bytes = w.unit_bytes(), padded = w.units * kQGroupUnitCols;
  const int64_t segment = w.group % 64 == 0 ? 64 : 32;  // columns with one weight scale and one activation scale
  const uint8_t* codes = w.codes.data() + tile * w.units * unit_bytes;
  const uint16_t* scales = w.scales.data() + tile * w.groups * kQGroupTileRows;
  const uint16_t* offsets = w.offsets.data() + tile * w.groups * kQGroupTileRows;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < padded; c0 += segment) {
    __m512i sums[T];
    for (int t = 0; t < T; ++t) sums[t] = _mm512_setzero_si512();
    for (int64_t c = c0; c < c0 + segment && c < padded; c += kQGroupUnitCols) {
      // The next tile's unit at the same place (as the int8 tiles do): at batch 1 the weights stream from memory
      // and small matrices end before the hardware prefetcher has ramped up.
      const uint8_t* next = codes + (w.units + c / kQGroupUnitCols) * unit_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
      if constexpr (Bits > 2) _mm_prefetch(reinterpret_cast<const char*>(next + 64), _MM_HINT_T0);
      __m512i quads[4];
      unit_quads<Bits>(codes + (c / kQGroupUnitCols) * unit_bytes, quads);
      for (int t = 0; t < T; ++t)
        for (int s = 0; s < 4; ++s)
          sums[t] = _mm512_dpbusd_epi32(sums[t], quads[s], _mm512_set1_epi32(load_i32(q + t * q_stride + c + 4 * s)));
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(scales + (c0 / w.group) * kQGroupTileRows)));
    for (int t = 0; t < T; ++t)
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t]),
                               _mm512_mul_ps(ws, _mm512_set1_ps(d[t * d_stride + c0 / 64])), acc[t]);
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    const __m512 wo =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets + g * kQGroupTileRows)));
    for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(wo, _mm512_set1_ps(xsum[t * w.groups + g]), acc[t]);
  }
  const int64_t r0 = tile * kQGroupTileRows;
  for (int t = 0; t < T; ++t) store_rows(out + t * out_stride + r0, acc[t], w.rows - r0);
}

template <int Bits>
void qgroup_tiles_bits(const QGroupTiles& w, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
                       const float* xsum, int n, float* out, int64_t out_stride) {
  const int64_t q8 = q8_groups(w.cols), q_stride = q8 * kQ8Group;
  for (int64_t tile = tile0; tile < tile1; ++tile)
    for (int t0 = 0; t0 < n; t0 += kMaxRowsPerPass) {
      const int8_t* qt = q + t0 * q_stride;
      const float* dt = d + t0 * q8;
      const float* xt = xsum + t0 * w.groups;
      float* ot = out + t0 * out_stride;
      switch (n - t0 < kMaxRowsPerPass ? n - t0 : kMaxRowsPerPass) {
#define STB_PASS(T) \
  case T: qgroup_tile_pass<Bits, T>(w, tile, qt, q_stride, dt, q8, xt, ot, out_stride); break;
        STB_PASS(1) STB_PASS(2) STB_PASS(3) STB_PASS(4) STB_PASS(5) STB_PASS(6) STB_PASS(7) STB_PASS(8)
#undef STB_PASS
      }
    }
}

void qgroup_tiles_rows(const QGroupTiles& w, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
                       const float* xsum, int n, float* out, int64_t out_stride) {
  (w.bits == 4 ? qgroup_tiles_bits<4> : w.bits == 3 ? qgroup_tiles_bits<3> : qgroup_tiles_bits<2>)(
      w, tile0, tile1, q, d, xsum, n, out, out_stride);
}

}  // namespace

SignGemm avx512_sign_gemm() { return cpu_has_avx512_vnni() ? sign_gemm : nullptr; }

const QGroupTileKernels* avx512_qgroup_tiles() {
  static const QGroupTileKernels k{qgroup_tiles_rows};
  return cpu_has_avx512_vnni() ? &k : nullptr;
}

const Int8TileKernels* avx512_int8_tiles() {
  static const Int8TileKernels k{int8_rows};
  return cpu_has_avx512_vnni() ? &k : nullptr;
}

}  // namespace stb::cpu

#else
namespace stb::cpu {
SignGemm avx512_sign_gemm() { return nullptr; }
const QGroupTileKernels* avx512_qgroup_tiles() { return nullptr; }
const Int8TileKernels* avx512_int8_tiles() { return nullptr; }
}  // namespace stb::cpu
#endif
