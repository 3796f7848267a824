// stb.binary-groups.v2 (docs/format.md): the sizes of its compact streams and their decoding into plain bit planes.
//
// The file stores only what the data needs (N:M masks as one colex rank per group, signs and labels of kept
// weights only); backends compute on plain per-row bit planes, so loading decodes once into BinaryGroupsPlanes.
#pragma once
#include <cstdint>
#include <vector>

#include "stbllm/format.h"

namespace stb {

// Bits of one row's mask codes: full groups of M at ceil(log2 C(M, N)) bits each, then the ragged tail group of
// g = cols mod M columns, which keeps exactly ceil(N·g/M), at ceil(log2 C(g, that)) bits.
uint64_t binary_groups_mask_bits_per_row(int64_t cols, int n, int m);
// Weights one row keeps under an exact N:M mask (all of them without a mask: pass n = m = 0).
uint64_t binary_groups_kept_per_row(int64_t cols, int n, int m);

// Plain planes, W = ceil(cols / 64) u64 words per row, bit j of a row = bit j mod 64 of word j / 64:
struct BinaryGroupsPlanes {
  std::vector<uint64_t> signs;     // [rows, W], set = +1 (clear for pruned weights)
  std::vector<uint64_t> mask;      // [rows, W], set = kept; empty without N:M
  std::vector<uint64_t> labels;    // label_planes × [rows, W], bit p of the region label in plane p; may be empty
  std::vector<uint64_t> salient;   // [W], the salient columns
  std::vector<uint64_t> residual;  // rows × salient_columns bits, row-major (bit r·S + k); 0 for pruned weights
  std::vector<uint64_t> salient_labels;  // like residual: set = the weight's salient group is the second; empty
                                         // with one salient group
  std::vector<uint16_t> params;    // fp16 [rows, blocks, 2R + 4G] expanded from 8-bit codes; empty when the file
                                   // stores fp16 params (then they are read in place)
  int label_planes = 0;
  uint64_t bytes() const {
    return 8 * (signs.size() + mask.size() + labels.size() + salient.size() + residual.size() +
                salient_labels.size()) + 2 * params.size();
  }
};

// 8-bit params (params_bits = 8 of stb.binary-groups.v2 and stb.qgroup.v1) to their fp16 values:
// out[(r·blocks + b)·slots + i] = fp16(float32(scales[r·scale_stride + i]) · codes[same index]), rounded to nearest
// even. Throws FormatError (naming `what`) for a code of −128, a scale that is negative or not finite, or a product
// that overflows fp16.
void expand_int8_params(const int8_t* codes, const uint16_t* scales, int64_t rows, int64_t blocks, int64_t slots,
                        int64_t scale_stride, const std::string& what, uint16_t* out);

// The fp16 params of a tensor with params_bits = 8: p[r, b, i] = fp16(float32(scale[r, i]) · code[r, b, i]),
// rounded to nearest even. Throws FormatError for a code of −128, a scale that is negative or not finite, or a
// product that overflows fp16 (the reader checks this at open; decoding expands again).
std::vector<uint16_t> binary_groups_expand_params(const TensorEntry& t);

// Decodes a validated tensor's streams; throws FormatError when the data break a rule lengths cannot express
// (a mask code >= C(M, N), a label byte >= 3^5, non-zero padding, counts that disagree with params).
BinaryGroupsPlanes decode_binary_groups(const TensorEntry& t);

}  // namespace stb
