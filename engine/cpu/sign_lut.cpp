#include "cpu/sign_lut.h"

#include "cpu/kernels.h"  // q8_groups

namespace stb::cpu {

SignLut build_sign_lut(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int64_t rows,
                       int64_t cols, int block) {
  SignLut l;
  l.rows = rows, l.cols = cols, l.block = block, l.masked = mask != nullptr;
  l.tiles = (rows + kLutTileRows - 1) / kLutTileRows;
  l.pairs = q8_groups(cols) * 8;
  l.blocks = int((cols + block - 1) / block);
  const int64_t words = (cols + 63) / 64;
  l.plus.assign(size_t(l.tiles * l.pairs * kLutTileRows), 0);
  if (l.masked) l.minus.assign(l.plus.size(), 0);
  l.alpha.assign(size_t(l.tiles * l.blocks * kLutTileRows), 0);
  // Nibble k of a row: 4 bits from word k/16, shifted; columns past `cols` are ignored (their activations are 0).
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile = r / kLutTileRows, lane = r % kLutTileRows;
    for (int64_t p = 0; p < l.pairs; ++p) {
      uint8_t plus_byte = 0, minus_byte = 0;
      for (int half = 0; half < 2; ++half) {
        const int64_t k = 2 * p + half;
        const int64_t word = k / 16, shift = (k % 16) * 4;  // pairs = words · 8, so word < words
        const uint64_t s = (signs[r * words + word] >> shift) & 0xF;
        const uint64_t m = mask ? (mask[r * words + word] >> shift) & 0xF : 0xF;
        plus_byte |= uint8_t((mask ? (s & m) : s) << (4 * half));
        minus_byte |= uint8_t((~s & m & 0xF) << (4 * half));
      }
      const size_t at = size_t((tile * l.pairs + p) * kLutTileRows + lane);
      l.plus[at] = plus_byte;
      if (l.masked) l.minus[at] = minus_byte;
    }
    for (int b = 0; b < l.blocks; ++b)
      l.alpha[size_t((tile * l.blocks + b) * kLutTileRows + lane)] = scales[r * l.blocks + b];
  }
  return l;
}

}  // namespace stb::cpu
