// stb.binary-groups.v2 (docs/format.md) on the CPU: the Matrix view of a tensor and a portable dot kernel.
#pragma once
#include <cstdint>

#include "stbllm/backend.h"
#include "stbllm/binary_groups.h"

namespace stb::cpu {

// Fills m's BinaryGroups fields (codec, block, plane pointers, counts, bytes) from a tensor entry and its decoded
// planes, which must outlive m.
void describe_binary_groups(const TensorEntry& w, const BinaryGroupsPlanes& planes, Matrix& m);

// Σ_j w[row, j] · x[j] with w dequantized exactly as the format defines it (scalar reference kernel).
float dot_binary_groups(const Matrix& m, int64_t row, const float* x);

}  // namespace stb::cpu
