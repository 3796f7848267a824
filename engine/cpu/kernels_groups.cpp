// stb.binary-groups.v2: the portable reference kernel, which decodes each weight on the fly from the decoded planes
// (sign, region label or salient residual, per-(row, block) fp16 alpha/mu), and the repacking into the runtime
// codes of the SIMD kernels (layout: kernels_groups.h).
#include "cpu/kernels_groups.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

namespace stb::cpu {

void describe_binary_groups(const TensorEntry& w, const BinaryGroupsPlanes& planes, Matrix& m) {
  m.codec = MatrixCodec::BinaryGroups;
  m.block = w.block;
  m.words_per_row = int((m.cols + 63) / 64);
  m.blocks_per_row = int((m.cols + w.block - 1) / w.block);
  m.regions = w.regions;
  m.label_planes = planes.label_planes;
  m.salient_groups = w.salient_groups;
  m.params_per_block = w.param_slots();
  m.salient_columns = w.salient_columns;
  m.signs = planes.signs.data();
  m.salient = planes.salient.data();
  m.params = planes.params.empty() ? reinterpret_cast<const uint16_t*>(w.component("params").data)
                                    : planes.params.data();
  if (!planes.mask.empty()) m.mask = planes.mask.data();
  if (m.label_planes) m.labels = planes.labels.data();
  if (m.salient_columns) m.residual = planes.residual.data();
  if (!planes.salient_labels.empty()) m.salient_labels = planes.salient_labels.data();
  m.bytes = planes.bytes() + (planes.params.empty() ? w.component("params").length : 0);
}

float dot_binary_groups(const Matrix& m, int64_t row, const float* x) {
  const int64_t words = m.words_per_row, plane = m.rows * words;
  const uint64_t* signs = m.signs + row * words;
  const uint64_t* mask = m.mask ? m.mask + row * words : nullptr;
  const uint64_t* labels = m.labels ? m.labels + row * words : nullptr;
  const uint16_t* row_params = m.params + row * m.blocks_per_row * m.params_per_block;
  int64_t residual_bit = row * m.salient_columns;  // index of this row's next salient column's order-2 sign
  float acc = 0;
  float p[2 * 3 + 4 * 2];
  for (int64_t b = 0; b < m.blocks_per_row; ++b) {
    for (int i = 0; i < m.params_per_block; ++i) p[i] = half_to_float(row_params[b * m.params_per_block + i]);
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
        const bool second = m.salient_labels && ((m.salient_labels[r_bit >> 6] >> (r_bit & 63)) & 1);
        const float* sal = p + 2 * m.regions + 4 * second;  // alpha1, mu1, alpha2, mu2 of the weight's group
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

void groups_activations(const BinaryGroupsCodes& g, const float* x, int n, float* out) {
  const int64_t cols = g.cols;
  for (int64_t s = 0; s < g.padded_cols / kGroupsStep; ++s)
    for (int t = 0; t < n; ++t) {
      float* dst = out + (s * n + t) * kGroupsStep;
      const int64_t j0 = s * kGroupsStep, count = std::min<int64_t>(kGroupsStep, cols - j0);
      std::copy(x + t * cols + j0, x + t * cols + j0 + count, dst);
      std::fill(dst + count, dst + kGroupsStep, 0.f);
    }
  float* salient = out + n * g.padded_cols;
  for (int64_t c = 0; c < g.salient_slots() / kGroupsChunk; ++c)
    for (int t = 0; t < n; ++t)
      for (int i = 0; i < kGroupsChunk; ++i) {
        const int32_t j = g.salient_cols[c * kGroupsChunk + i];
        salient[(c * n + t) * kGroupsChunk + i] = j < 0 ? 0.f : x[t * cols + j];
      }
}

BinaryGroupsCodes build_binary_groups_codes(const Matrix& m, bool salient_chunks) {
  BinaryGroupsCodes g;
  g.rows = m.rows, g.cols = m.cols, g.padded_cols = (m.cols + kGroupsStep - 1) / kGroupsStep * kGroupsStep;
  g.block = m.block, g.blocks = m.blocks_per_row, g.regions = m.regions, g.params_per_block = m.params_per_block;
  g.salient_groups = m.salient_groups;
  const size_t n_params = size_t(m.rows) * m.blocks_per_row * m.params_per_block;
  g.params.assign(n_params + kGroupsParamsPad, 0);
  std::copy(m.params, m.params + n_params, g.params.begin());
  auto is_salient = [&](int64_t j) { return (m.salient[j >> 6] >> (j & 63)) & 1; };
  // rank[j] = how many salient columns precede column j (its index among the row's residual bits); slot[j] = its
  // salient chunk slot.
  std::vector<int64_t> rank(size_t(m.cols)), slot(size_t(m.cols), -1);
  for (int64_t j = 0, seen = 0; j < m.cols; ++j) {
    rank[j] = seen;
    seen += is_salient(j);
  }
  if (salient_chunks) {
    for (int64_t b = 0; b < g.blocks; ++b) {
      for (int64_t j = b * m.block; j < std::min<int64_t>(m.cols, (b + 1) * m.block); ++j)
        if (is_salient(j)) slot[j] = g.salient_slots(), g.salient_cols.push_back(int32_t(j));
      while (g.salient_slots() % kGroupsChunk) g.salient_cols.push_back(-1);
      g.chunk_block.resize(g.salient_slots() / kGroupsChunk, int32_t(b));
    }
  }
  // Pruned weights, padding and (with chunks) the salient columns hold the layout's zero code in the steps; the
  // salient chunks' padding slots hold 0.
  const unsigned zero_code = salient_chunks ? kChunkedZeroCode : 0;
  g.codes.assign(size_t(m.rows * g.row_bytes()), 0);
  for (int64_t r = 0; r < m.rows; ++r)
    std::fill_n(g.codes.begin() + r * g.row_bytes(), g.step_bytes(), uint8_t(zero_code * 0x11));
  const int64_t words = m.words_per_row, plane = m.rows * words;
  for (int64_t r = 0; r < m.rows; ++r) {
    uint8_t* row_codes = g.codes.data() + r * g.row_bytes();
    uint8_t* row_salient = row_codes + g.step_bytes();
    for (int64_t j = 0; j < m.cols; ++j) {
      const int64_t word = r * words + (j >> 6), bit = j & 63;
      if (m.mask && !((m.mask[word] >> bit) & 1)) continue;  // the zero code
      const unsigned s = (m.signs[word] >> bit) & 1;
      unsigned code;
      if (is_salient(j)) {
        const int64_t i = r * m.salient_columns + rank[j];
        const unsigned second = m.salient_labels ? unsigned((m.salient_labels[i >> 6] >> (i & 63)) & 1) : 0;
        const unsigned st = 2 * s + ((m.residual[i >> 6] >> (i & 63)) & 1);
        if (salient_chunks) {  // slot i of a chunk: nibble i of its little-endian 32-bit word
          row_salient[slot[j] / 2] |= uint8_t((8 * second + 4 + st) << (4 * (slot[j] % 2)));
          continue;  // the zero code in the steps
        }
        code = 8 + 4 * second + st;
      } else {
        unsigned label = 0;
        for (int p = 0; p < m.label_planes; ++p) label |= unsigned((m.labels[p * plane + word] >> bit) & 1) << p;
        if (int(label) >= m.regions)
          throw std::invalid_argument("tensor '" + m.name + "': region label " + std::to_string(label) +
                                      " >= regions " + std::to_string(m.regions));
        code = (salient_chunks ? 0 : 1) + 2 * label + s;
      }
      // Column j = step·64 + 16k + i sits in nibble k of 16-bit word i of its step.
      const int64_t step = j / kGroupsStep, k = (j % kGroupsStep) / 16, i = j % 16;
      uint8_t& byte = row_codes[step * 32 + 2 * i + k / 2];
      byte = uint8_t((byte & ~(0xF << (4 * (k % 2)))) | code << (4 * (k % 2)));
    }
  }
  return g;
}

}  // namespace stb::cpu
