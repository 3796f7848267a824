#include "cpu/qgroup_tiles.h"

#include <cstring>

#include "stbllm/qgroup.h"

namespace stb::cpu {

QGroupTiles build_qgroup_tiles(const Matrix& m) {
  QGroupTiles w;
  w.rows = m.rows, w.cols = m.cols, w.bits = m.bits, w.group = m.block;
  w.tiles = (m.rows + kQGroupTileRows - 1) / kQGroupTileRows;
  w.units = qgroup_chunks(m.cols) * (kQGroupChunk / kQGroupUnitCols);
  w.groups = (m.cols + m.block - 1) / m.block;
  const int64_t unit = w.unit_bytes(), padded = w.units * kQGroupUnitCols;
  w.codes.assign(size_t(w.tiles * w.units * unit), 0);
  w.scales.assign(size_t(w.tiles * w.groups * kQGroupTileRows), 0);
  w.offsets.assign(w.scales.size(), 0);
  std::vector<uint8_t> codes(static_cast<size_t>(padded));
  for (int64_t r = 0; r < m.rows; ++r) {
    const int64_t tile = r / kQGroupTileRows, lane = r % kQGroupTileRows;
    qgroup_unpack_codes(static_cast<const uint8_t*>(m.values) + r * qgroup_row_bytes(m.cols, m.bits), m.bits,
                        qgroup_chunks(m.cols), codes.data());
    for (int64_t u = 0; u < w.units; ++u) {
      uint8_t* dst = w.codes.data() + (tile * w.units + u) * unit;
      for (int s = 0; s < 4; ++s)
        for (int k = 0; k < 4; ++k) {
          const unsigned code = codes[size_t(u * kQGroupUnitCols + 4 * s + k)];
          const int64_t at = 4 * lane + k;  // byte L of the quad's vector
          if (m.bits == 4) {
            dst[64 * (s / 2) + at] |= uint8_t(code << (4 * (s % 2)));
          } else {
            dst[at] |= uint8_t((code & 3) << (2 * s));
            if (m.bits == 3 && (code & 4)) dst[64 + 8 * s + at / 8] |= uint8_t(1u << (at % 8));
          }
        }
    }
    for (int64_t g = 0; g < w.groups; ++g) {
      const size_t at = size_t((tile * w.groups + g) * kQGroupTileRows + lane);
      w.scales[at] = m.scales[r * w.groups + g];
      w.offsets[at] = m.offsets[r * w.groups + g];
    }
  }
  return w;
}

void qgroup_tile_row_codes(const QGroupTiles& w, int64_t row, uint8_t* codes) {
  const int64_t tile = row / kQGroupTileRows, lane = row % kQGroupTileRows, unit = w.unit_bytes();
  for (int64_t u = 0; u < w.units; ++u) {
    const uint8_t* src = w.codes.data() + (tile * w.units + u) * unit;
    for (int s = 0; s < 4; ++s)
      for (int k = 0; k < 4; ++k) {
        const int64_t at = 4 * lane + k;
        unsigned code;
        if (w.bits == 4) {
          code = (src[64 * (s / 2) + at] >> (4 * (s % 2))) & 15;
        } else {
          code = (src[at] >> (2 * s)) & 3;
          if (w.bits == 3) code |= ((src[64 + 8 * s + at / 8] >> (at % 8)) & 1u) << 2;
        }
        codes[u * kQGroupUnitCols + 4 * s + k] = uint8_t(code);
      }
  }
}

}  // namespace stb::cpu
