// stb.binary-groups.v2 (docs/format.md) on the CPU: the Matrix view of a tensor, the portable reference kernel on
// its decoded planes, and the runtime layout the SIMD kernels use.
//
// Runtime layout (built once at load from the planes; the planes are not read afterwards): one 4-bit code per
// weight indexing a 16-entry float codebook of the weight's (row, block), which the kernels build in registers
// from the block's fp16 params:
//   0 = pruned (0.0), 1 + 2g + s = region g (α_g·s + μ_g), 8 + 2s + t = salient ((α₁·s + μ₁) + (α₂·t + μ₂)),
// with s, t = 1 for a set sign / residual bit (+1), 0 for a clear one (−1); codes 7 and 12–15 are never written.
// Every codebook entry is computed with the format's exact operations, so each weight is bit-identical to the
// format's dequantized value; kernels differ from the reference only in float summation order.
// Codes of a row come in steps of 64 columns (32 bytes, rows zero padded to whole steps): 16-bit word i of a step
// holds in its nibble k the code of column 16k + i, so one zero-extension of the words to 32-bit lanes followed by
// shifts by 4k gives the lookup indices of 16 consecutive columns (vpermps reads only an index's low bits).
#pragma once
#include <cstdint>
#include <vector>

#include "stbllm/backend.h"
#include "stbllm/binary_groups.h"

namespace stb::cpu {

// Fills m's BinaryGroups fields (codec, block, plane pointers, counts, bytes) from a tensor entry and its decoded
// planes, which must outlive m.
void describe_binary_groups(const TensorEntry& w, const BinaryGroupsPlanes& planes, Matrix& m);

// Σ_j w[row, j] · x[j] with w dequantized exactly as the format defines it (portable reference kernel).
float dot_binary_groups(const Matrix& m, int64_t row, const float* x);

constexpr int kGroupsStep = 64;       // columns per step of codes
constexpr int kGroupsParamsPad = 16;  // zero halves after the last block's params: kernels load 16 at a time

struct BinaryGroupsCodes {
  int64_t rows = 0, cols = 0, padded_cols = 0;  // padded_cols: cols rounded up to whole steps
  int block = 0, blocks = 0, regions = 0, params_per_block = 0;
  std::vector<uint8_t> codes;    // [rows][padded_cols / 2]
  std::vector<uint16_t> params;  // fp16 [rows][blocks][params_per_block], then kGroupsParamsPad zeros
  int64_t row_bytes() const { return padded_cols / 2; }
  uint64_t bytes() const { return codes.size() + params.size() * sizeof(uint16_t); }
};

// Builds the runtime layout from m's BinaryGroups planes (portable code; once per matrix at load). Throws
// std::invalid_argument for a region label >= m.regions (its code would alias another entry).
BinaryGroupsCodes build_binary_groups_codes(const Matrix& m);

// Activations for the kernels, step-major: the 64 inputs of step s of activation row t at x[(s·n + t)·64], zero
// past cols, so one pass reads its activation rows of a step from one contiguous run (for n = 1 this is the row
// itself, zero padded).
void groups_activations(const float* x, int64_t cols, int n, int64_t padded_cols, float* out);

struct GroupsKernels {
  // out[t · out_stride + r] = Σ_j w[r, j] · x_t[j] for rows [row0, row1) and t < n, x from groups_activations.
  void (*rows)(const BinaryGroupsCodes& g, int64_t row0, int64_t row1, const float* x, int n, float* out,
               int64_t out_stride);
};

const GroupsKernels* avx2_groups();    // null when the build has no AVX2 path
const GroupsKernels* avx512_groups();  // null when the build has no AVX-512 path

}  // namespace stb::cpu
