// stb.qgroup.v1 (docs/format.md): k-bit group quantization, w = scale · code + offset with one fp16 scale and offset
// per (row, group of input columns). Codes are stored densely in chunks of 32 columns of 4·k bytes each:
//   k = 4: byte i holds column i in its low nibble and column 16 + i in its high nibble;
//   k = 2: bits 2s, 2s + 1 of byte i (i < 8) hold column 8s + i;
//   k = 3: the k = 2 layout of the codes' low two bits (8 bytes), then a little-endian u32 whose bit i is bit 2 of
//          column i's code.
// One SIMD load per chunk turns these into 32 byte lanes in column order.
#pragma once
#include <cstdint>

#include "stbllm/format.h"

namespace stb {

constexpr int kQGroupChunk = 32;  // columns per chunk of codes

inline int64_t qgroup_chunks(int64_t cols) { return (cols + kQGroupChunk - 1) / kQGroupChunk; }
inline int64_t qgroup_row_bytes(int64_t cols, int bits) { return qgroup_chunks(cols) * 4 * bits; }

// The codes (0 .. 2^bits − 1) of one row's `chunks` chunks, one byte each, in column order (32 per chunk).
void qgroup_unpack_codes(const uint8_t* row_codes, int bits, int64_t chunks, uint8_t* out);

// The inverse: one row's codes (cols bytes, each < 2^bits) into its fixed-width bytes (qgroup_row_bytes; the padding
// columns of the last chunk get code 0).
void qgroup_pack_codes(const uint8_t* codes, int bits, int64_t cols, uint8_t* row_codes);

// One row (its codes one per byte, and its fp16 scales and offsets, one per group) dequantized exactly as the format
// defines it: out[j] = float(scale) · code + float(offset), in float32 (product rounded, then the sum).
void qgroup_dequantize_codes(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int group,
                             int64_t cols, float* out);
// The same from the row's fixed-width bytes.
void qgroup_dequantize_row(const uint8_t* row_codes, const uint16_t* scales, const uint16_t* offsets, int bits,
                           int group, int64_t cols, float* out);

}  // namespace stb
