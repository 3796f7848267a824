// stb.qgroup.v1: the portable decoding of its codes (layout: include/stbllm/qgroup.h), used by the embedding lookup,
// the scalar kernel and the Python binding that checks the C++ and Python readers agree bit for bit; and their
// packing, for the reader that decodes rANS-coded codes into that layout.
#include "stbllm/qgroup.h"

#include <algorithm>
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

void qgroup_pack_codes(const uint8_t* codes, int bits, int64_t cols, uint8_t* row_codes) {
  uint8_t chunk[kQGroupChunk];
  for (int64_t c = 0; c * kQGroupChunk < cols; ++c) {  // the mirror of qgroup_unpack_codes, a chunk at a time
    const int64_t n = std::min<int64_t>(kQGroupChunk, cols - c * kQGroupChunk);
    std::copy(codes + c * kQGroupChunk, codes + c * kQGroupChunk + n, chunk);
    std::fill(chunk + n, chunk + kQGroupChunk, uint8_t(0));
    uint8_t* p = row_codes + c * 4 * bits;
    if (bits == 4) {
      for (int i = 0; i < 16; ++i) p[i] = uint8_t(chunk[i] | chunk[16 + i] << 4);
    } else {
      for (int i = 0; i < 8; ++i)
        p[i] = uint8_t((chunk[i] & 3) | (chunk[8 + i] & 3) << 2 | (chunk[16 + i] & 3) << 4 | (chunk[24 + i] & 3) << 6);
      if (bits == 3)
        for (int b = 0; b < 4; ++b) {
          unsigned high = 0;
          for (int i = 0; i < 8; ++i) high |= ((chunk[8 * b + i] >> 2) & 1u) << i;
          p[8 + b] = uint8_t(high);
        }
    }
  }
}

void qgroup_dequantize_codes(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int group,
                             int64_t cols, float* out) {
  for (int64_t j = 0; j < cols; ++j)  // built with -ffp-contract=off: two roundings, as the format says
    out[j] = cpu::half_to_float(scales[j / group]) * float(codes[j]) + cpu::half_to_float(offsets[j / group]);
}

void qgroup_dequantize_row(const uint8_t* row_codes, const uint16_t* scales, const uint16_t* offsets, int bits,
                           int group, int64_t cols, float* out) {
  std::vector<uint8_t> codes(size_t(qgroup_chunks(cols) * kQGroupChunk));
  qgroup_unpack_codes(row_codes, bits, qgroup_chunks(cols), codes.data());
  qgroup_dequantize_codes(codes.data(), scales, offsets, group, cols, out);
}

}  // namespace stb
