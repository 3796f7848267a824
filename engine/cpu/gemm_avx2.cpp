// AVX2 batched (GEMM) int8 kernels: every SIMD lane accumulates one output row (or a fixed part of it), so a
// weight vector is built or loaded once and multiplied with several activation rows by `vpmaddubsw` (u8 × s8, pairs
// summed into int16). Float operations follow the scalar reference's order, so results are bit-identical to it.
#include "cpu/int8_tiles.h"
#include "cpu/kernels.h"
#include "cpu/qgroup_tiles.h"
#include "cpu/sign_lut.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>
#include <vector>

namespace stb::cpu {

namespace {

constexpr int kMaxRowsPerPass = 8;

// Stores 8 outputs per activation row t < T at out[t · out_stride + r0 ..], rows past `rows` left out.
void store_rows(const __m256* acc, int T, float* out, int64_t out_stride, int64_t r0, int64_t rows) {
  for (int t = 0; t < T; ++t) {
    if (rows - r0 >= 8) {
      _mm256_storeu_ps(out + t * out_stride + r0, acc[t]);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[t]);
      for (int64_t r = 0; r < rows - r0; ++r) out[t * out_stride + r0 + r] = tmp[r];
    }
  }
}

// ---- stb.sign-block.v1 on the lookup layout (sign_lut.h) --------------------------------------------------------
// Byte r of a tile's 32-byte vector for pair p holds the 8 sign (or kept-positive) bits of row r, columns 8p..8p+7.
// A shuffle spreads 4 rows' bytes over 32 bytes (row i at bytes 8i..8i+7) and a compare turns bits into bytes, then
// w + 1 ∈ {0, 1, 2} is unsigned for vpmaddubsw against an 8-byte broadcast of the activations; the int16 sums of
// one activation group stay below 8 · 2 · 2 · 127. Per group the lanes fold into 8 rows' int32 sums, minus Σq.

constexpr int kSignRowsPerPass = 4;  // activation rows per pass: 16 ymm registers hold 2 × 4 int16 accumulators

// w + 1 for 8 rows (one octet of a tile) × all columns, 2 vectors per pair (rows 0-3, 4-7), expanded once per call
// into a per-thread buffer: every pass of activation rows then only loads it (expanding is 8 ops per vector when
// masked — as much as the multiply-adds of 4 activation rows).
void expand_octet(const SignLut& l, int64_t tile, int octet, std::vector<int8_t>& w) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, char(128), 1, 2, 4, 8, 16, 32, 64, char(128),  //
                                       1, 2, 4, 8, 16, 32, 64, char(128), 1, 2, 4, 8, 16, 32, 64, char(128));
  const __m256i one = _mm256_set1_epi8(1), two = _mm256_set1_epi8(2);
  // 0xFF where the bit of (row i, column c) is set, for the 4 rows whose bytes start at b.
  auto bits = [&](const uint8_t* b) {
    int32_t four;
    std::memcpy(&four, b, 4);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(four), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
  };
  const int64_t at = tile * l.pairs * kLutTileRows + 8 * octet;
  w.resize(size_t(64 * l.pairs));
  for (int64_t p = 0; p < l.pairs; ++p)
    for (int h = 0; h < 2; ++h) {
      const int64_t i = at + p * kLutTileRows + 4 * h;
      const __m256i v = l.masked ? _mm256_add_epi8(_mm256_sub_epi8(one, bits(l.plus.data() + i)),
                                                   bits(l.minus.data() + i))  // 1 + [w > 0] − [w < 0]
                                 : _mm256_and_si256(bits(l.plus.data() + i), two);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.data() + 64 * p + 32 * h), v);
    }
}

template <int T>
void sign_gemm_pass(const SignLut& l, int64_t tile, int octet, const int8_t* w, const int8_t* q, int64_t q_stride,
                    const float* d, const int32_t* qsum, int64_t groups, float* out, int64_t out_stride) {
  const int64_t per_block = l.block / kQ8Group;
  const uint16_t* alpha = l.alpha.data() + tile * l.blocks * kLutTileRows + 8 * octet;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  // hadd leaves rows 0 1 4 5 | 2 3 6 7
  __m256 acc[T], block_acc[T];
  for (int t = 0; t < T; ++t) acc[t] = block_acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i lo[T], hi[T];  // int16 pair sums of rows 0-3 and 4-7
    for (int t = 0; t < T; ++t) lo[t] = hi[t] = _mm256_setzero_si256();
    for (int64_t p = 8 * g; p < 8 * g + 8; ++p) {
      const __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * p));
      const __m256i w_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * p + 32));
      for (int t = 0; t < T; ++t) {
        int64_t eight;
        std::memcpy(&eight, q + t * q_stride + 8 * p, 8);
        const __m256i x = _mm256_set1_epi64x(eight);
        lo[t] = _mm256_add_epi16(lo[t], _mm256_maddubs_epi16(w_lo, x));
        hi[t] = _mm256_add_epi16(hi[t], _mm256_maddubs_epi16(w_hi, x));
      }
    }
    for (int t = 0; t < T; ++t) {
      __m256i sums = _mm256_hadd_epi32(_mm256_madd_epi16(lo[t], ones16), _mm256_madd_epi16(hi[t], ones16));
      sums = _mm256_sub_epi32(_mm256_permutevar8x32_epi32(sums, order), _mm256_set1_epi32(qsum[t * groups + g]));
      block_acc[t] = _mm256_add_ps(block_acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(sums),
                                                               _mm256_set1_ps(d[t * groups + g])));
    }
    if ((g + 1) % per_block == 0 || g + 1 == groups) {
      const __m256 a = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(alpha + (g / per_block) * kLutTileRows)));
      for (int t = 0; t < T; ++t) {
        acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(a, block_acc[t]));
        block_acc[t] = _mm256_setzero_ps();
      }
    }
  }
  store_rows(acc, T, out, out_stride, tile * kLutTileRows + 8 * octet, l.rows);
}

void sign_gemm(const SignLut& l, int64_t tile0, int64_t tile1, const int8_t* q, const float* d, const int32_t* qsum,
               int n, float* out, int64_t out_stride) {
  const int64_t groups = l.pairs / 8, q_stride = groups * kQ8Group;
  thread_local std::vector<int8_t> w;
  for (int64_t tile = tile0; tile < tile1; ++tile)
    for (int octet = 0; octet < 4 && tile * kLutTileRows + 8 * octet < l.rows; ++octet) {
      expand_octet(l, tile, octet, w);
      for (int t0 = 0; t0 < n; t0 += kSignRowsPerPass) {
        const int8_t* qt = q + t0 * q_stride;
        const float* dt = d + t0 * groups;
        const int32_t* st = qsum + t0 * groups;
        float* ot = out + t0 * out_stride;
        switch (n - t0 < kSignRowsPerPass ? n - t0 : kSignRowsPerPass) {
#define STB_PASS(T) \
  case T: sign_gemm_pass<T>(l, tile, octet, w.data(), qt, q_stride, dt, st, groups, ot, out_stride); break;
          STB_PASS(1) STB_PASS(2) STB_PASS(3) STB_PASS(4)
#undef STB_PASS
        }
      }
    }
}

// ---- stb.int8-group.v1 on 16-row tiles (int8_tiles.h), one half tile (8 rows, 32 bytes per 4 columns) at a time --
// vpmaddubsw multiplies |w| by the broadcast activations carrying w's sign (exact: a pair of 128·127 products fits
// int16), vpmaddwd widens to int32.

template <int T>
void int8_pass(const Int8Tiles& w, int64_t tile, int half, const int8_t* q, int64_t q_stride, const float* d,
               float* out, int64_t out_stride) {
  const int64_t groups = w.groups, steps = groups * (kQ8Group / 4);
  const int8_t* values = w.values.data() + tile * steps * 64 + 32 * half;
  const uint16_t* scales = w.scales.data() + tile * groups * kInt8TileRows + 8 * half;
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[T];
    for (int t = 0; t < T; ++t) sums[t] = _mm256_setzero_si256();
    for (int s = 0; s < kQ8Group / 4; ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(values + (steps + g * 16 + s) * 64), _MM_HINT_T0);  // next tile
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + (g * 16 + s) * 64));
      const __m256i magnitude = _mm256_abs_epi8(wv);
      for (int t = 0; t < T; ++t) {
        int32_t x4;
        std::memcpy(&x4, q + t * q_stride + g * 64 + 4 * s, 4);
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(_mm256_set1_epi32(x4), wv));
        sums[t] = _mm256_add_epi32(sums[t], _mm256_madd_epi16(pairs, ones16));
      }
    }
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * 16)));
    for (int t = 0; t < T; ++t)
      acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_mul_ps(ws, _mm256_set1_ps(d[t * groups + g])),
                                                   _mm256_cvtepi32_ps(sums[t])));
  }
  store_rows(acc, T, out, out_stride, tile * kInt8TileRows + 8 * half, w.rows);
}

void int8_rows(const Int8Tiles& w, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
               const int32_t* /*qsum: exact signed products need no offset*/, int n, float* out,
               int64_t out_stride) {
  const int64_t q_stride = w.groups * kQ8Group;
  for (int64_t tile = tile0; tile < tile1; ++tile)
    for (int half = 0; half < 2 && tile * kInt8TileRows + 8 * half < w.rows; ++half)
      for (int t0 = 0; t0 < n; t0 += kMaxRowsPerPass) {
        const int8_t* qt = q + t0 * q_stride;
        const float* dt = d + t0 * w.groups;
        float* ot = out + t0 * out_stride;
        switch (n - t0 < kMaxRowsPerPass ? n - t0 : kMaxRowsPerPass) {
#define STB_PASS(T) \
  case T: int8_pass<T>(w, tile, half, qt, q_stride, dt, ot, out_stride); break;
          STB_PASS(1) STB_PASS(2) STB_PASS(3) STB_PASS(4) STB_PASS(5) STB_PASS(6) STB_PASS(7) STB_PASS(8)
#undef STB_PASS
        }
      }
}

// ---- stb.qgroup.v1 on 16-row tiles (qgroup_tiles.h) -------------------------------------------------------------
// A pass takes half a tile (8 rows: the 32-byte halves of its quad vectors). Per unit of 16 columns the 4 quads'
// vpmaddubsw products (u8 codes × s8 activations, at most 2 · 15 · 127 per int16) add up in int16 (at most 4 · 3810)
// before one vpmaddwd widens them into the row's int32 sum; per segment of columns with one weight scale and one
// activation scale, one conversion and one FMA per activation row serve the 8 rows.

// The 4 quads of one half tile (8 rows) of one unit.
template <int Bits>
inline void half_unit_quads(const uint8_t* p, int half, __m256i (&w)[4]) {
  auto load = [](const uint8_t* a) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)); };
  if constexpr (Bits == 4) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = load(p + 64 * h + 32 * half);
      w[2 * h] = _mm256_and_si256(v, low4);
      w[2 * h + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
  } else {
    const __m256i v = load(p + 32 * half), low2 = _mm256_set1_epi8(3);
    for (int s = 0; s < 4; ++s) w[s] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), low2);
    if constexpr (Bits == 3) {  // bit j of the quad's 32-bit mask word -> byte j, then 4 where it is set
      const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
      const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
      for (int s = 0; s < 4; ++s) {
        int32_t mask;
        std::memcpy(&mask, p + 64 + 8 * s + 4 * half, 4);
        const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(mask), spread);
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        w[s] = _mm256_or_si256(w[s], _mm256_and_si256(set, _mm256_set1_epi8(4)));
      }
    }
  }
}

template <int Bits, int T>
void qgroup_tile_pass(const QGroupTiles& w, int64_t tile, int half, const int8_t* q, int64_t q_stride,
                      const float* d, int64_t d_stride, const float* xsum, float* out, int64_t out_stride) {
  const int64_t unit_bytes = w.unit_bytes(), padded = w.units * kQGroupUnitCols;
  const int64_t segment = w.group % 64 == 0 ? 64 : 32;  // columns with one weight scale and one activation scale
  const uint8_t* codes = w.codes.data() + tile * w.units * unit_bytes;
  const uint16_t* scales = w.scales.data() + tile * w.groups * kQGroupTileRows + 8 * half;
  const uint16_t* offsets = w.offsets.data() + tile * w.groups * kQGroupTileRows + 8 * half;
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < padded; c0 += segment) {
    __m256i sums[T];
    for (int t = 0; t < T; ++t) sums[t] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c0 + segment && c < padded; c += kQGroupUnitCols) {
      if (half == 0) {  // the next tile's unit, as gemm_avx512vnni.cpp does (half 1 re-reads this tile from cache)
        const uint8_t* next = codes + (w.units + c / kQGroupUnitCols) * unit_bytes;
        _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
        if constexpr (Bits > 2) _mm_prefetch(reinterpret_cast<const char*>(next + 64), _MM_HINT_T0);
      }
      __m256i quads[4];
      half_unit_quads<Bits>(codes + (c / kQGroupUnitCols) * unit_bytes, half, quads);
      for (int t = 0; t < T; ++t) {
        __m256i pairs = _mm256_setzero_si256();
        for (int s = 0; s < 4; ++s) {
          int32_t x4;
          std::memcpy(&x4, q + t * q_stride + c + 4 * s, 4);
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(quads[s], _mm256_set1_epi32(x4)));
        }
        sums[t] = _mm256_add_epi32(sums[t], _mm256_madd_epi16(pairs, ones16));
      }
    }
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(scales + (c0 / w.group) * kQGroupTileRows)));
    for (int t = 0; t < T; ++t)
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]),
                               _mm256_mul_ps(ws, _mm256_set1_ps(d[t * d_stride + c0 / 64])), acc[t]);
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    const __m256 wo =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(offsets + g * kQGroupTileRows)));
    for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(wo, _mm256_set1_ps(xsum[t * w.groups + g]), acc[t]);
  }
  store_rows(acc, T, out, out_stride, tile * kQGroupTileRows + 8 * half, w.rows);
}

template <int Bits>
void qgroup_tiles_bits(const QGroupTiles& w, int64_t tile0, int64_t tile1, const int8_t* q, const float* d,
                       const float* xsum, int n, float* out, int64_t out_stride) {
  constexpr int kPass = 4;  // activation rows per pass: 16 ymm registers hold their float and int32 sums
  const int64_t q8 = q8_groups(w.cols), q_stride = q8 * kQ8Group;
  for (int64_t tile = tile0; tile < tile1; ++tile)
    for (int half = 0; half < 2 && tile * kQGroupTileRows + 8 * half < w.rows; ++half)
      for (int t0 = 0; t0 < n; t0 += kPass) {
        const int8_t* qt = q + t0 * q_stride;
        const float* dt = d + t0 * q8;
        const float* xt = xsum + t0 * w.groups;
        float* ot = out + t0 * out_stride;
        switch (n - t0 < kPass ? n - t0 : kPass) {
#define STB_PASS(T) \
  case T: qgroup_tile_pass<Bits, T>(w, tile, half, qt, q_stride, dt, q8, xt, ot, out_stride); break;
          STB_PASS(1) STB_PASS(2) STB_PASS(3) STB_PASS(4)
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

const QGroupTileKernels* avx2_qgroup_tiles() {
  static const QGroupTileKernels k{qgroup_tiles_rows};
  return &k;
}

const Int8TileKernels* avx2_int8_tiles() {
  static const Int8TileKernels k{int8_rows};
  return &k;
}

SignGemm avx2_sign_gemm() { return sign_gemm; }

}  // namespace stb::cpu

#else
namespace stb::cpu {
const Int8TileKernels* avx2_int8_tiles() { return nullptr; }
const QGroupTileKernels* avx2_qgroup_tiles() { return nullptr; }
SignGemm avx2_sign_gemm() { return nullptr; }
}  // namespace stb::cpu
#endif
