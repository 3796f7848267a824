// Portable kernel for stb.binary-groups.v2 (on its decoded planes): decodes each weight on the fly (sign, region label or salient
// residual, per-(row, block) fp16 alpha/mu) and accumulates per block. Correctness reference, not tuned.
#include "cpu/kernels_groups.h"

#include <algorithm>

#include "cpu/kernels.h"

namespace stb::cpu {

void describe_binary_groups(const TensorEntry& w, const BinaryGroupsPlanes& planes, Matrix& m) {
  m.codec = MatrixCodec::BinaryGroups;
  m.block = w.block;
  m.words_per_row = int((m.cols + 63) / 64);
  m.blocks_per_row = int((m.cols + w.block - 1) / w.block);
  m.regions = w.regions;
  m.label_planes = planes.label_planes;
  m.params_per_block = 2 * w.regions + 4;
  m.salient_columns = w.salient_columns;
  m.signs = planes.signs.data();
  m.salient = planes.salient.data();
  m.params = reinterpret_cast<const uint16_t*>(w.component("params").data);
  if (!planes.mask.empty()) m.mask = planes.mask.data();
  if (m.label_planes) m.labels = planes.labels.data();
  if (m.salient_columns) m.residual = planes.residual.data();
  m.bytes = planes.bytes() + w.component("params").length;
}

float dot_binary_groups(const Matrix& m, int64_t row, const float* x) {
  const int64_t words = m.words_per_row, plane = m.rows * words;
  const uint64_t* signs = m.signs + row * words;
  const uint64_t* mask = m.mask ? m.mask + row * words : nullptr;
  const uint64_t* labels = m.labels ? m.labels + row * words : nullptr;
  const uint16_t* row_params = m.params + row * m.blocks_per_row * m.params_per_block;
  int64_t residual_bit = row * m.salient_columns;  // index of this row's next salient column's order-2 sign
  float acc = 0;
  float p[10];
  for (int64_t b = 0; b < m.blocks_per_row; ++b) {
    for (int i = 0; i < m.params_per_block; ++i) p[i] = half_to_float(row_params[b * m.params_per_block + i]);
    const float* sal = p + 2 * m.regions;  // alpha1, mu1, alpha2, mu2
    const int64_t end = std::min<int64_t>(m.cols, (b + 1) * m.block);
    float sum = 0;
    for (int64_t j = b * m.block; j < end; ++j) {
      const int64_t word = j >> 6;
      const uint64_t bit = 1ull << (j & 63);
      const bool is_salient = m.salient[word] & bit;
      const int64_t r_bit = is_salient ? residual_bit++ : -1;
      if (mask && !(mask[word] & bit)) continue;
      const float s = (signs[word] & bit) ? 1.f : -1.f;
      float w;
      if (is_salient) {
        const float t = (m.residual[r_bit >> 6] >> (r_bit & 63)) & 1 ? 1.f : -1.f;
        w = (sal[0] * s + sal[1]) + (sal[2] * t + sal[3]);
      } else {
        int label = 0;
        for (int k = 0; k < m.label_planes; ++k) label |= int((labels[k * plane + word] & bit) != 0) << k;
        w = p[2 * label] * s + p[2 * label + 1];
      }
      sum += w * x[j];
    }
    acc += sum;
  }
  return acc;
}

}  // namespace stb::cpu
