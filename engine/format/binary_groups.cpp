// Decoding of stb.binary-groups.v2 streams into plain bit planes (include/stbllm/binary_groups.h).
//
// Streams are little-endian bit streams (bit i = bit i mod 8 of byte i / 8). The mask stream has a fixed number of
// bits per row and the sign stream a fixed number of kept weights per row; labels and residual signs follow the
// kept weights in row-major order, so they are read with running cursors.
#include "stbllm/binary_groups.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "cpu/kernels.h"
#include "stbllm/rans.h"

namespace stb {
namespace {

// C(n, k) for n, k <= 64; C(64, 32) < 2^63, so everything fits in uint64.
struct Binomials {
  uint64_t c[65][65] = {};
  Binomials() {
    for (int n = 0; n <= 64; ++n) {
      c[n][0] = 1;
      for (int k = 1; k <= n; ++k) c[n][k] = c[n - 1][k - 1] + (k <= n - 1 ? c[n - 1][k] : 0);
    }
  }
};
const Binomials kBinomials;

constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};  // a label byte holds 5 base-3 digits, least significant first

int bit_width(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }
int rank_width(int m, int n) { return bit_width(kBinomials.c[m][n] - 1); }
int tail_kept(int64_t cols, int n, int m) { return int((int64_t(n) * (cols % m) + m - 1) / m); }

// Reads bit streams bounds-checked against the component's length (padding bits are checked by the caller).
class BitReader {
 public:
  BitReader(const Component* c, const std::string& what)
      : data_(c ? c->data : nullptr), bits_(c ? c->length * 8 : 0), what_(what) {}
  uint64_t read(uint64_t pos, int width) const {  // width <= 64; the caller keeps pos + width <= the length
    uint64_t v = 0;
    for (int done = 0; done < width;) {  // at most two 8-byte loads (a load starts up to 7 bits into its byte)
      const uint64_t at = pos + uint64_t(done), byte = at / 8;
      const int shift = int(at % 8), got = std::min(width - done, 64 - shift);
      uint64_t word = 0;
      std::memcpy(&word, data_ + byte, size_t(std::min<uint64_t>(8, bits_ / 8 - byte)));
      v |= ((word >> shift) & (got == 64 ? ~0ull : (1ull << got) - 1)) << done;
      done += got;
    }
    return v;
  }
  bool bit(uint64_t pos) const {  // counts in params may disagree with the mask: never read past the stream
    if (pos >= bits_) throw FormatError(what_ + ": a stream ends before the weights it describes");
    return (data_[pos / 8] >> (pos % 8)) & 1;
  }
  // Every bit from `used` to the end of the stream is zero (the format's padding rule).
  bool padding_clear(uint64_t used) const {
    for (uint64_t i = used; i < bits_; ++i)
      if ((data_[i / 8] >> (i % 8)) & 1) return false;
    return true;
  }

 private:
  const uint8_t* data_;
  uint64_t bits_;
  const std::string& what_;
};

// Sets the bits of the colex-ranked k-subset of {0..m-1} in `out` starting at column `col`.
bool unrank(uint64_t rank, int m, int k, uint64_t* row_words, int64_t col) {
  if (rank >= kBinomials.c[m][k]) return false;
  int c = m - 1;
  for (int i = k; i >= 1; --i) {
    while (kBinomials.c[c][i] > rank) --c;  // the largest c with C(c, i) <= rank (C(i-1, i) = 0 stops it)
    rank -= kBinomials.c[c][i];
    const int64_t j = col + c;
    row_words[j / 64] |= 1ull << (j % 64);
    --c;
  }
  return true;
}


}  // namespace

void expand_int8_params(const int8_t* codes, const uint16_t* scales, int64_t rows, int64_t blocks, int64_t slots,
                        int64_t scale_stride, const std::string& what, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < slots; ++i)
      if (scales[r * scale_stride + i] >= 0x7c00)  // sign set (negative or -0) or exponent all ones (inf, NaN)
        throw FormatError(what + ": param scale " + std::to_string(r * slots + i) + " is negative or not finite");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t i = 0; i < slots; ++i) {
        const int64_t k = (r * blocks + b) * slots + i;
        if (codes[k] == -128) throw FormatError(what + ": a param code is -128 (codes are -127..127)");
        // fp16 × int8 is exact in float32: the conversion is the only rounding.
        out[k] = cpu::float_to_half(cpu::half_to_float(scales[r * scale_stride + i]) * float(codes[k]));
        if ((out[k] & 0x7c00) == 0x7c00) throw FormatError(what + ": param " + std::to_string(k) + " overflows fp16");
      }
}

std::vector<uint16_t> binary_groups_expand_params(const TensorEntry& t) {
  const int64_t rows = t.shape.at(0), blocks = (t.shape.at(1) + t.block - 1) / t.block, slots = t.param_slots();
  std::vector<uint16_t> out(size_t(rows * blocks * slots));
  expand_int8_params(reinterpret_cast<const int8_t*>(t.component("params").data),
                     reinterpret_cast<const uint16_t*>(t.component("param_scales").data), rows, blocks, slots, slots,
                     "tensor '" + t.name + "'", out.data());
  return out;
}

uint64_t binary_groups_mask_bits_per_row(int64_t cols, int n, int m) {
  const int64_t tail = cols % m;
  return uint64_t(cols / m) * uint64_t(rank_width(m, n)) + (tail ? rank_width(int(tail), tail_kept(cols, n, m)) : 0);
}

uint64_t binary_groups_kept_per_row(int64_t cols, int n, int m) {
  if (m == 0) return uint64_t(cols);
  return uint64_t(cols / m) * uint64_t(n) + uint64_t(tail_kept(cols, n, m));
}

BinaryGroupsPlanes decode_binary_groups(const TensorEntry& t) {
  const std::string what = "tensor '" + t.name + "'";
  const int64_t rows = t.shape.at(0), cols = t.shape.at(1), words = (cols + 63) / 64;
  const int n = t.nm_n, m = t.nm_m;
  // An empty stream is absent; the reader has checked every present one's length against params.
  const auto stream = [&](const char* key) -> const Component* {
    const auto it = t.components.find(key);
    return it == t.components.end() ? nullptr : &it->second;
  };
  BinaryGroupsPlanes p;
  p.label_planes = t.regions > 2 ? 2 : t.regions - 1;
  p.signs.assign(size_t(rows * words), 0);
  p.labels.assign(size_t(p.label_planes * rows * words), 0);
  p.residual.assign(size_t((rows * t.salient_columns + 63) / 64), 0);
  if (t.salient_groups == 2) p.salient_labels.assign(p.residual.size(), 0);
  p.salient.assign(size_t(words), 0);
  std::memcpy(p.salient.data(), t.component("salient").data, size_t((cols + 7) / 8));
  if (t.params_bits == 8) p.params = binary_groups_expand_params(t);

  if (m) {
    p.mask.assign(size_t(rows * words), 0);
    const BitReader codes(stream("mask"), what);
    const int width = rank_width(m, n), tail = int(cols % m), tail_n = tail_kept(cols, n, m);
    const int tail_width = tail ? rank_width(tail, tail_n) : 0;
    const uint64_t per_row = binary_groups_mask_bits_per_row(cols, n, m);
    for (int64_t r = 0; r < rows; ++r) {
      uint64_t* row = p.mask.data() + r * words;
      uint64_t pos = uint64_t(r) * per_row;
      bool ok = true;
      for (int64_t g = 0; g < cols / m; ++g, pos += uint64_t(width)) ok &= unrank(codes.read(pos, width), m, n, row, g * m);
      if (tail) ok &= unrank(codes.read(pos, tail_width), tail, tail_n, row, cols - tail);
      if (!ok) throw FormatError(what + ": row " + std::to_string(r) + " has an N:M mask code out of range");
    }
    if (!codes.padding_clear(uint64_t(rows) * per_row))
      throw FormatError(what + ": mask stream has non-zero padding bits");
  }

  const BitReader signs(stream("signs"), what), labels(stream("labels"), what), residual(stream("residual"), what),
      salient_labels(stream("salient_labels"), what);
  const Component* labels_c = stream("labels");
  std::unique_ptr<RansDecoder> rans;  // a rANS label stream is absent only when no weight has a label
  if (t.labels_rans && labels_c) rans = std::make_unique<RansDecoder>(labels_c->data, labels_c->length, t.regions, what);
  uint64_t sign_pos = 0, label_pos = 0, residual_pos = 0;
  auto next_label = [&]() -> int {
    const uint64_t i = label_pos++;
    if (t.labels_rans) {
      if (!rans) throw FormatError(what + ": a stream ends before the weights it describes");
      return rans->next();
    }
    if (t.regions == 2) return labels.bit(i);
    if (!labels_c || i / 5 >= labels_c->length) throw FormatError(what + ": a stream ends before the weights it describes");
    const uint8_t byte = labels_c->data[i / 5];
    if (byte >= 243) throw FormatError(what + ": label byte " + std::to_string(byte) + " is not 5 base-3 digits");
    return byte / kPow3[i % 5] % 3;
  };
  for (int64_t r = 0; r < rows; ++r) {
    int64_t salient_index = 0;  // k of this row's k-th salient column (residual bit r·S + k)
    for (int64_t j = 0; j < cols; ++j) {
      const uint64_t bit = 1ull << (j % 64);
      const int64_t word = r * words + j / 64;
      const bool is_salient = p.salient[j / 64] & bit;
      if (m && !(p.mask[word] & bit)) {
        salient_index += is_salient;
        continue;
      }
      if (signs.bit(sign_pos++)) p.signs[word] |= bit;
      if (is_salient) {
        if (residual_pos >= uint64_t(t.kept_salient))
          throw FormatError(what + ": more kept salient weights than kept_salient");
        const uint64_t k = uint64_t(r * t.salient_columns + salient_index++);
        if (!p.salient_labels.empty() && salient_labels.bit(residual_pos)) p.salient_labels[k / 64] |= 1ull << (k % 64);
        if (residual.bit(residual_pos++)) p.residual[k / 64] |= 1ull << (k % 64);
      } else if (p.label_planes) {
        const int label = next_label();
        for (int plane = 0; plane < p.label_planes; ++plane)
          if ((label >> plane) & 1) p.labels[size_t(plane * rows * words + word)] |= bit;
      }
    }
  }
  if (residual_pos != uint64_t(t.kept_salient))
    throw FormatError(what + ": " + std::to_string(residual_pos) + " kept salient weights, params say " +
                      std::to_string(t.kept_salient));
  if (!signs.padding_clear(sign_pos)) throw FormatError(what + ": sign stream has non-zero padding bits");
  if (!residual.padding_clear(residual_pos))
    throw FormatError(what + ": residual stream has non-zero padding bits");
  if (!salient_labels.padding_clear(residual_pos))
    throw FormatError(what + ": salient_labels stream has non-zero padding bits");
  if (rans) {
    rans->finish();  // a rANS stream has no padding: it must end exactly with the last label
  } else if (t.regions == 2) {
    if (!labels.padding_clear(label_pos)) throw FormatError(what + ": label stream has non-zero padding bits");
  } else if (t.regions == 3 && label_pos % 5) {  // unused base-3 digits of the last byte are zero
    if (labels_c->data[label_pos / 5] >= kPow3[label_pos % 5])
      throw FormatError(what + ": label stream has non-zero padding digits");
  }
  return p;
}

}  // namespace stb
