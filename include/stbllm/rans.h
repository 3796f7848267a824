// Order-0 rANS for small alphabets (docs/format.md, "label_coder" / "code_coder": "rans"): the region labels of
// stb.binary-groups.v2 and the codes of stb.qgroup.v1 take about n·H bits instead of a fixed width per symbol.
//
// Stream: the alphabet's A frequencies as little-endian u16 (summing to 2^15; a symbol that never occurs has 0),
// the coder's final state as a little-endian u32, then the renormalization bytes in the order the decoder reads
// them. The decoder starts from that state, and after the last symbol must be back at the encoder's initial state
// with every byte consumed: a stream that is truncated, padded or corrupted fails one of those checks.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace stb {

constexpr int kRansProbBits = 15;
constexpr uint32_t kRansTotal = 1u << kRansProbBits;
constexpr uint32_t kRansLow = 1u << 23;  // the state stays in [2^23, 2^31) between symbols
constexpr int kRansMaxAlphabet = 16;

// The header bytes of a stream over `alphabet` symbols.
constexpr size_t rans_header_bytes(int alphabet) { return size_t(2 * alphabet + 4); }
// An upper bound on a stream's length: a symbol costs at most 15 bits (frequency >= 1 of 2^15) plus a byte of slack.
constexpr uint64_t rans_max_bytes(uint64_t symbols, int alphabet) {
  return rans_header_bytes(alphabet) + 2 * symbols + 8;
}

// Encodes symbols[0..n) (each < alphabet, 2 <= alphabet <= kRansMaxAlphabet) with frequencies fitted to their counts.
std::vector<uint8_t> rans_encode(const uint8_t* symbols, size_t n, int alphabet);

// Decodes a stream symbol by symbol; throws FormatError (naming `what`) on a bad header, on reading past the end,
// and in finish() when the stream does not end exactly where the symbols do.
class RansDecoder {
 public:
  RansDecoder(const uint8_t* data, size_t length, int alphabet, std::string what);
  int next() {
    const uint32_t slot = state_ & (kRansTotal - 1);
    int s = 0;
    while (slot >= start_[s + 1]) ++s;  // alphabets are tiny: a linear scan beats a table
    state_ = freq_[s] * (state_ >> kRansProbBits) + slot - start_[s];
    while (state_ < kRansLow) {
      if (pos_ == length_) truncated();
      state_ = (state_ << 8) | data_[pos_++];
    }
    return s;
  }
  // n symbols at once through a slot -> symbol table (long streams: stb.qgroup.v1 codes); the same symbols as n
  // calls of next().
  void decode(uint8_t* out, size_t n);
  void finish() const;

 private:
  [[noreturn]] void truncated() const;
  const uint8_t* data_;
  size_t length_, pos_;
  uint32_t state_;
  uint32_t freq_[kRansMaxAlphabet] = {}, start_[kRansMaxAlphabet + 1] = {};
  std::vector<uint8_t> symbol_of_;  // decode(): slot -> symbol
  std::string what_;
};

}  // namespace stb
