// AVX-512 stb.qgroup.v1 kernel (qgroup_avx512.h) with vpmaddubsw + vpmaddwd: each decoded pair of chunks serves 4
// activation rows. CPUs with VNNI take gemm_avx512vnni.cpp's instead.
#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include "cpu/qgroup_avx512.h"

namespace stb::cpu {

namespace {

struct MaddubsDot {  // u8 × s8 pairs as int16 (at most 2 · 15 · 127: no saturation), then pairs of pairs as int32
  static __m512i dot(__m512i w, __m512i x) {
    return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
  }
};

}  // namespace

void avx512_qgroup_row_q8(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int bits, int group,
                          int64_t cols, const int8_t* q, const float* d, const float* xsum, int n, float* out,
                          int64_t out_stride, uint8_t*) {
  avx512_qgroup_rows<MaddubsDot, 4>(codes, scales, offsets, bits, group, cols, q, d, xsum, n, out, out_stride);
}

}  // namespace stb::cpu
#endif
