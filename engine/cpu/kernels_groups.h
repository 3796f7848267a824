// stb.binary-groups.v2 (docs/format.md) on the CPU: the Matrix view of a tensor, the portable reference kernel on
// its decoded planes, and the runtime layout the SIMD kernels use.
//
// Runtime layout (built once at load from the planes; the planes are not read afterwards): one 4-bit code per
// weight indexing a 16-entry float codebook of the weight's (row, block), which the kernels build in registers
// from the block's fp16 params:
//   0 = pruned (0.0), 1 + 2g + s = region g (α_g·s + μ_g), 8 + 4h + 2s + t = salient group h
//   ((α₁·s + μ₁) + (α₂·t + μ₂) with the group's params),
// with s, t = 1 for a set sign / residual bit (+1), 0 for a clear one (−1); code 7 is never written, nor 12–15 with
// one salient group.
// Every codebook entry is computed with the format's exact operations, so each weight is bit-identical to the
// format's dequantized value; kernels differ from the reference only in float summation order.
// Codes of a row come in steps of 64 columns (32 bytes, rows zero padded to whole steps): 16-bit word i of a step
// holds in its nibble k the code of column 16k + i, so one zero-extension of the words to 32-bit lanes followed by
// shifts by 4k gives the lookup indices of 16 consecutive columns (vpermps reads only an index's low bits).
//
// Salient chunks (kernels with 8-entry lookups, AVX2): a codebook of 8 holds either the pruned and region entries
// or the pruned and salient ones, not both. Salient columns are shared by all rows, so each block's salient
// columns are also gathered into chunks of 8 slots (the last one zero padded), and their codes move there: the zero
// code in the steps, 4 + 2s + t (or 0 if pruned) in nibble i of its chunk's 32-bit word for slot i. The steps then
// need one lookup per 8 weights and each salient chunk one more; the activations gain the gathered salient inputs.
// This layout also renumbers the steps' codes: region g with sign s is 2g + s and the zero code is 7
// (kChunkedZeroCode), so the codebook is the params' (α, μ) pairs in place, [μ₀ − α₀, μ₀ + α₀, μ₁ − α₁, ...],
// built without a cross-lane permute.
// With two salient groups a chunk code is 8h + 4 + 2s + t: the salient codebook has 16 entries (8 per group, the
// first four of each 0), and bit 3 of a code picks the group's half.
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
  int block = 0, blocks = 0, regions = 0, params_per_block = 0, salient_groups = 1;
  std::vector<uint8_t> codes;    // per row: padded_cols / 2 bytes of steps, then its salient chunks' codes
  std::vector<uint16_t> params;  // fp16 [rows][blocks][params_per_block], then kGroupsParamsPad zeros
  // Salient chunks (empty without them), block by block: chunk_block[c] is chunk c's block, salient_cols[slot] the
  // slot's column (-1: padding).
  std::vector<int32_t> chunk_block;
  std::vector<int32_t> salient_cols;
  int64_t step_bytes() const { return padded_cols / 2; }
  // A row's steps and salient codes sit together, so the row streams from memory as one run; rows start 32-byte
  // aligned.
  int64_t row_bytes() const { return (step_bytes() + salient_slots() / 2 + 31) / 32 * 32; }
  int64_t salient_slots() const { return int64_t(salient_cols.size()); }
  // Floats of the kernels' activations for n rows (groups_activations).
  int64_t activation_floats(int n) const { return n * (padded_cols + salient_slots()); }
  uint64_t bytes() const {
    return codes.size() + params.size() * sizeof(uint16_t) +
           (chunk_block.size() + salient_cols.size()) * sizeof(int32_t);
  }
};

constexpr int kGroupsChunk = 8;  // slots per salient chunk
constexpr unsigned kChunkedZeroCode = 7;  // pruned / padding / salient-in-steps code of the salient-chunk layout
constexpr int kSalientBook = 16;  // floats of a (row, block)'s salient chunk codebook: 8 per salient group

// Builds the runtime layout from m's BinaryGroups planes (portable code; once per matrix at load), with salient
// chunks if asked. Throws std::invalid_argument for a region label >= m.regions (its code would alias another
// entry).
BinaryGroupsCodes build_binary_groups_codes(const Matrix& m, bool salient_chunks);

// Activations for the kernels, step-major: the 64 inputs of step s of activation row t at x[(s·n + t)·64], zero
// past cols, so one pass reads its activation rows of a step from one contiguous run (for n = 1 this is the row
// itself, zero padded); then, with salient chunks, the 8 inputs of chunk c of row t at x[n·padded_cols + (c·n + t)·8].
void groups_activations(const BinaryGroupsCodes& g, const float* x, int n, float* out);

struct GroupsKernels {
  bool salient_chunks;  // the layout this kernel reads
  // out[t · out_stride + r] = Σ_j w[r, j] · x_t[j] for rows [row0, row1) and t < n, x from groups_activations.
  void (*rows)(const BinaryGroupsCodes& g, int64_t row0, int64_t row1, const float* x, int n, float* out,
               int64_t out_stride);
};

const GroupsKernels* avx2_groups();    // null when the build has no AVX2 path
const GroupsKernels* avx512_groups();  // null when the build has no AVX-512 path

}  // namespace stb::cpu
