// Order-0 rANS with byte-wise renormalization (include/stbllm/rans.h). The encoder runs over the symbols backwards
// so the decoder reads them forwards.
#include "stbllm/rans.h"

#include <algorithm>
#include <stdexcept>

#include "stbllm/format.h"

namespace stb {
namespace {

// Frequencies summing to 2^15 close to counts / n, at least 1 for every symbol that occurs (so it stays codable).
std::vector<uint32_t> fit_frequencies(const std::vector<uint64_t>& counts, uint64_t n) {
  std::vector<uint32_t> freq(counts.size(), 0);
  int64_t sum = 0;
  for (size_t s = 0; s < counts.size(); ++s) {
    if (!counts[s]) continue;
    freq[s] = uint32_t(std::max<uint64_t>(1, (counts[s] * kRansTotal + n / 2) / n));
    sum += freq[s];
  }
  // Rounding leaves the sum a few units off: take them from (or give them to) the most frequent symbol, which
  // changes its cost least and always has more than the units to give (it holds >= 1/alphabet of the total).
  const size_t top = size_t(std::max_element(counts.begin(), counts.end()) - counts.begin());
  freq[top] = uint32_t(int64_t(freq[top]) + int64_t(kRansTotal) - sum);
  return freq;
}

}  // namespace

std::vector<uint8_t> rans_encode(const uint8_t* symbols, size_t n, int alphabet) {
  if (alphabet < 2 || alphabet > kRansMaxAlphabet) throw std::invalid_argument("rans: alphabet must be 2..16");
  std::vector<uint64_t> counts(size_t(alphabet), 0);
  for (size_t i = 0; i < n; ++i) {
    if (symbols[i] >= alphabet) throw std::invalid_argument("rans: a symbol is outside the alphabet");
    ++counts[symbols[i]];
  }
  std::vector<uint32_t> freq = n ? fit_frequencies(counts, n) : std::vector<uint32_t>(size_t(alphabet), 0);
  if (!n) freq[0] = kRansTotal;
  std::vector<uint32_t> start(size_t(alphabet), 0);
  for (int s = 1; s < alphabet; ++s) start[size_t(s)] = start[size_t(s - 1)] + freq[size_t(s - 1)];

  std::vector<uint8_t> reversed;  // renormalization bytes, last one first
  reversed.reserve(n / 4 + 16);
  uint32_t x = kRansLow;
  for (size_t i = n; i-- > 0;) {
    const uint32_t f = freq[symbols[i]];
    const uint32_t limit = ((kRansLow >> kRansProbBits) << 8) * f;  // keeps the next state below 2^31
    while (x >= limit) {
      reversed.push_back(uint8_t(x & 0xff));
      x >>= 8;
    }
    x = ((x / f) << kRansProbBits) + (x % f) + start[symbols[i]];
  }
  std::vector<uint8_t> out;
  out.reserve(rans_header_bytes(alphabet) + reversed.size());
  for (int s = 0; s < alphabet; ++s) {
    out.push_back(uint8_t(freq[size_t(s)] & 0xff));
    out.push_back(uint8_t(freq[size_t(s)] >> 8));
  }
  for (int b = 0; b < 4; ++b) out.push_back(uint8_t(x >> (8 * b)));
  out.insert(out.end(), reversed.rbegin(), reversed.rend());
  return out;
}

RansDecoder::RansDecoder(const uint8_t* data, size_t length, int alphabet, std::string what)
    : data_(data), length_(length), pos_(rans_header_bytes(alphabet)), state_(0), what_(std::move(what)) {
  if (alphabet < 2 || alphabet > kRansMaxAlphabet) throw FormatError(what_ + ": rans alphabet must be 2..16");
  if (!data || length < pos_) throw FormatError(what_ + ": rans stream is shorter than its header");
  uint32_t sum = 0;
  for (int s = 0; s < alphabet; ++s) {
    freq_[s] = uint32_t(data[2 * s]) | uint32_t(data[2 * s + 1]) << 8;
    start_[s + 1] = start_[s] + freq_[s];
    sum += freq_[s];
  }
  if (sum != kRansTotal)
    throw FormatError(what_ + ": rans frequencies sum to " + std::to_string(sum) + ", not 2^15");
  for (int s = alphabet; s < kRansMaxAlphabet; ++s) start_[s + 1] = kRansTotal + 1;  // never reached by a slot
  for (int b = 0; b < 4; ++b) state_ |= uint32_t(data[2 * alphabet + b]) << (8 * b);
  if (state_ < kRansLow || state_ >= (1u << 31))
    throw FormatError(what_ + ": rans state " + std::to_string(state_) + " is outside [2^23, 2^31)");
}

void RansDecoder::decode(uint8_t* out, size_t n) {
  if (symbol_of_.empty()) {  // built on the first call: a stream is often decoded a row at a time
    symbol_of_.resize(kRansTotal);
    for (int s = 0; s < kRansMaxAlphabet && start_[s] < kRansTotal; ++s)
      std::fill(symbol_of_.begin() + start_[s], symbol_of_.begin() + std::min(start_[s + 1], kRansTotal),
                uint8_t(s));
  }
  // The state and position live in locals (next() updates the members): stores through `out` may alias members,
  // which would put a store and a reload on the loop's dependency chain.
  const uint8_t* symbol_of = symbol_of_.data();
  uint32_t x = state_;
  size_t pos = pos_;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t slot = x & (kRansTotal - 1);
    const uint8_t s = symbol_of[slot];
    x = freq_[s] * (x >> kRansProbBits) + slot - start_[s];
    while (x < kRansLow) {
      if (pos == length_) truncated();
      x = (x << 8) | data_[pos++];
    }
    out[i] = s;
  }
  state_ = x, pos_ = pos;
}

void RansDecoder::truncated() const { throw FormatError(what_ + ": rans stream ends before its symbols do"); }

void RansDecoder::finish() const {
  if (pos_ != length_)
    throw FormatError(what_ + ": rans stream has " + std::to_string(length_ - pos_) + " bytes past its symbols");
  if (state_ != kRansLow) throw FormatError(what_ + ": rans stream does not decode back to its initial state");
}

}  // namespace stb
