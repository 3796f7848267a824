// stb.qgroup.v1: the portable decoding of its codes (layout: include/stbllm/qgroup.h), used by the embedding lookup,
// the scalar kernel and the Python binding that checks the C++ and Python readers agree bit for bit.
#include "stbllm/qgroup.h"

#include <vector>

#include "cpu/kernels.h"

namespace stb {

void qgroup_unpack_codes(const uint8_t* row_codes, int bits, int64_t chunks, uint8_t* out) {
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* p = row_codes + c * 4 * bits;
    uint8_t* o = out + c * kQGroupChunk;
    if (bits == 4) {
      for (int i = 0; i < 16; ++i) o[i] = p[i] & 0xF, o[16 + i] = p[i] >> 4;
    } else {
      for (int j = 0; j < kQGroupChunk; ++j) o[j] = (p[j % 8] >> (2 * (j / 8))) & 3;
      if (bits == 3)
        for (int j = 0; j < kQGroupChunk; ++j) o[j] |= ((p[8 + j / 8] >> (j % 8)) & 1) << 2;
    }
  }
}

void qgroup_dequantize_row(const uint8_t* row_codes, const uint16_t* scales, const uint16_t* offsets, int bits,
                           int group, int64_t cols, float* out) {
  std::vector<uint8_t> codes(size_t(qgroup_chunks(cols) * kQGroupChunk));
  qgroup_unpack_codes(row_codes, bits, qgroup_chunks(cols), codes.data());
  for (int64_t j = 0; j < cols; ++j)  // built with -ffp-contract=off: two roundings, as the format says
    out[j] = cpu::half_to_float(scales[j / group]) * float(codes[j]) + cpu::half_to_float(offsets[j / group]);
}

}  // namespace stb
