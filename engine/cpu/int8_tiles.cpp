#include "cpu/int8_tiles.h"

#include "cpu/kernels.h"  // q8_groups

namespace stb::cpu {

Int8Tiles build_int8_tiles(const int8_t* values, const uint16_t* scales, int64_t rows, int64_t cols) {
  Int8Tiles w;
  w.rows = rows, w.cols = cols, w.groups = q8_groups(cols);
  w.tiles = (rows + kInt8TileRows - 1) / kInt8TileRows;
  const int64_t padded = w.groups * kQ8Group, steps = padded / 4;
  w.values.assign(size_t(w.tiles * steps * kInt8TileRows * 4), 0);
  w.scales.assign(size_t(w.tiles * w.groups * kInt8TileRows), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile = r / kInt8TileRows, lane = r % kInt8TileRows;
    for (int64_t j = 0; j < padded; ++j)
      w.values[size_t(((tile * steps + j / 4) * kInt8TileRows + lane) * 4 + j % 4)] = values[r * padded + j];
    for (int64_t g = 0; g < w.groups; ++g)
      w.scales[size_t((tile * w.groups + g) * kInt8TileRows + lane)] = scales[r * w.groups + g];
  }
  return w;
}

}  // namespace stb::cpu
