// .stb v1 reader: maps the file and checks every rule of docs/format.md before anything touches the data.
// All size arithmetic goes through checked helpers so a hostile header cannot wrap an offset.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <thread>

#include "stbllm/binary_groups.h"
#include "stbllm/format.h"
#include "stbllm/qgroup.h"
#include "stbllm/rans.h"

namespace stb {
namespace {

constexpr uint8_t kMagic[8] = {0x89, 'S', 'T', 'B', '\r', '\n', 0x1A, '\n'};
constexpr uint32_t kByteOrderMark = 0x0A0B0C0D;
constexpr uint64_t kFixedHeaderSize = 64;
constexpr uint64_t kAlignment = 64;
constexpr uint64_t kMaxJsonLength = 256ull << 20;
constexpr int64_t kMaxDim = (1ll << 31) - 1;
constexpr int64_t kMaxElements = 1ll << 40;
constexpr int64_t kMaxOffset = 1ll << 62;

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& what) {
  if (a != 0 && b > UINT64_MAX / a) throw FormatError(what + ": size overflows");
  return a * b;
}
uint64_t checked_add(uint64_t a, uint64_t b, const std::string& what) {
  if (b > UINT64_MAX - a) throw FormatError(what + ": size overflows");
  return a + b;
}
uint64_t align_up(uint64_t x) { return checked_add(x, kAlignment - 1, "alignment") / kAlignment * kAlignment; }

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

bool valid_tensor_name(const std::string& name) {
  if (name.empty() || name.size() > 256) return false;
  for (unsigned char c : name)
    if (c < 0x21 || c > 0x7E) return false;
  return true;
}

// Every fp16 value of a scale-like component is finite: a NaN or infinite scale would only surface later as
// NaN logits. (Weight tensors stored as fp16/fp32 are not scanned: that would read the whole file at open.)
void check_finite_halves(const TensorEntry& t, const char* key) {
  const auto it = t.components.find(key);
  if (it == t.components.end()) return;
  const Component& c = it->second;
  for (uint64_t i = 0; i + 1 < c.length; i += 2)
    if ((c.data[i + 1] & 0x7C) == 0x7C)  // fp16 exponent all ones: inf or NaN
      throw FormatError("tensor '" + t.name + "': " + key + " hold a non-finite value (entry " + std::to_string(i / 2) +
                        ")");
}

// The rules of stb.binary-groups.v2 cheap enough to check at open: the salient bitmap has exactly salient_columns
// bits set and none past the last column; params are finite (8-bit ones decode to finite fp16 values). The streams'
// contents are checked when a backend decodes them.
void validate_binary_groups(const TensorEntry& t) {
  const std::string what = "tensor '" + t.name + "'";
  const int64_t cols = t.shape[1];
  const uint8_t* salient = t.component("salient").data;
  int64_t count = 0;
  for (int64_t j = 0; j < (cols + 7) / 8 * 8; ++j) {
    const bool set = (salient[j / 8] >> (j % 8)) & 1;
    if (set && j >= cols) throw FormatError(what + ": salient bitmap has bits set past the last column");
    count += set;
  }
  if (count != t.salient_columns)
    throw FormatError(what + ": salient bitmap has " + std::to_string(count) + " columns set, params say " +
                      std::to_string(t.salient_columns));
  if (t.params_bits == 8) binary_groups_expand_params(t);  // its checks: codes, scales, fp16 range
  else check_finite_halves(t, "params");
}

// The rules of stb.row-col-sign.v1 (docs/format.md), checked at open: its scales are finite; the salient bitmap has
// exactly salient_columns bits and none past the last column; sign, residual and group bits are clear for pruned
// weights and past the last column of a row (a set bit there would be read as a weight by kernels that trust the
// planes).
void validate_row_col_sign(const TensorEntry& t) {
  const std::string what = "tensor '" + t.name + "'";
  for (const char* key : {"row_scales", "col_scales", "residual_row_scales", "residual_col_scales",
                          "group1_row_scales", "group1_col_scales", "group1_residual_row_scales",
                          "group1_residual_col_scales"})
    check_finite_halves(t, key);
  const int64_t rows = t.shape[0], cols = t.shape[1], words = (cols + 63) / 64;
  const auto plane = [&](const char* key) { return reinterpret_cast<const uint64_t*>(t.component(key).data); };
  const auto tail = [](int64_t width) { return width % 64 ? ~0ull << (width % 64) : 0ull; };
  const uint64_t* signs = plane("signs");
  const uint64_t* mask = t.nm_m ? plane("mask") : nullptr;
  const uint64_t* group = t.scale_groups == 2 ? plane("group") : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t* s = signs + r * words;
    const uint64_t* g = group ? group + r * words : nullptr;
    if ((s[words - 1] & tail(cols)) || (mask && (mask[r * words + words - 1] & tail(cols))) ||
        (g && (g[words - 1] & tail(cols))))
      throw FormatError(what + ": row " + std::to_string(r) + " has bits set past the last column");
    if (mask)
      for (int64_t w = 0; w < words; ++w) {
        if (s[w] & ~mask[r * words + w])
          throw FormatError(what + ": a pruned weight in row " + std::to_string(r) + " has its sign bit set");
        if (g && (g[w] & ~mask[r * words + w]))
          throw FormatError(what + ": a pruned weight in row " + std::to_string(r) + " has its group bit set");
      }
  }
  if (!t.salient_columns) return;
  const uint64_t* salient = plane("salient");
  std::vector<int64_t> columns;
  for (int64_t j = 0; j < words * 64; ++j)
    if ((salient[j / 64] >> (j % 64)) & 1) {
      if (j >= cols) throw FormatError(what + ": salient bitmap has bits set past the last column");
      columns.push_back(j);
    }
  if (int64_t(columns.size()) != t.salient_columns)
    throw FormatError(what + ": salient bitmap has " + std::to_string(columns.size()) + " columns set, params say " +
                      std::to_string(t.salient_columns));
  const int64_t residual_words = (t.salient_columns + 63) / 64;
  const uint64_t* residual = plane("residual");
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t* row = residual + r * residual_words;
    if (row[residual_words - 1] & tail(t.salient_columns))
      throw FormatError(what + ": residual row " + std::to_string(r) + " has bits set past its salient columns");
    if (mask)
      for (int64_t k = 0; k < t.salient_columns; ++k)
        if (((row[k / 64] >> (k % 64)) & 1) && !((mask[r * words + columns[k] / 64] >> (columns[k] % 64)) & 1))
          throw FormatError(what + ": a pruned weight in row " + std::to_string(r) +
                            " has its residual sign bit set");
  }
}

// A rANS-coded stb.qgroup.v1 codes stream decoded row by row into the fixed-width layout at `out` (rows ×
// qgroup_row_bytes; padding columns get code 0), or only checked when out is null; throws FormatError unless it
// holds exactly rows × cols codes.
void decode_qgroup_codes(const TensorEntry& t, uint8_t* out) {
  const Component& c = t.component("codes");
  RansDecoder decoder(c.data, size_t(c.length), 1 << t.bits, "tensor '" + t.name + "' codes");
  const int64_t rows = t.shape[0], cols = t.shape[1], row_bytes = qgroup_row_bytes(cols, t.bits);
  std::vector<uint8_t> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    decoder.decode(row.data(), row.size());
    if (out) qgroup_pack_codes(row.data(), t.bits, cols, out + r * row_bytes);
  }
  decoder.finish();
  if (!out) release_pages(c);  // checked at open: a loader reads it again, one matrix at a time
}

// The rules of stb.qgroup.v1 that lengths cannot express: every scale and offset is finite (8-bit ones: valid codes
// under sign-clear finite per-row scales, decoding to finite fp16 values, kept expanded in t.qgroup_params), and
// codes of the padding columns of each row's last chunk are zero (rANS-coded codes: the stream decodes to exactly
// rows × cols codes; decoded here only to check it, again by qgroup_codes() when a loader needs the codes).
void validate_qgroup(TensorEntry& t) {
  const std::string what = "tensor '" + t.name + "'";
  const int64_t rows = t.shape[0], cols = t.shape[1];
  if (t.params_bits == 8) {
    const int64_t groups = (cols + t.group - 1) / t.group;
    const auto* per_row = reinterpret_cast<const uint16_t*>(t.component("param_scales").data);  // [rows, 2]
    t.qgroup_params.resize(size_t(2 * rows * groups));
    for (int i = 0; i < 2; ++i)  // the scales under each row's first d, the offsets under its second
      expand_int8_params(reinterpret_cast<const int8_t*>(t.component(i ? "offsets" : "scales").data), per_row + i,
                         rows, groups, 1, 2, what + (i ? " offsets" : " scales"),
                         t.qgroup_params.data() + i * rows * groups);
  } else {
    for (const char* key : {"scales", "offsets"}) check_finite_halves(t, key);
  }
  if (t.codes_rans) {
    decode_qgroup_codes(t, nullptr);
    return;
  }
  if (cols % kQGroupChunk == 0) return;
  const uint8_t* codes = t.component("codes").data;
  uint8_t last[kQGroupChunk];
  for (int64_t r = 0; r < rows; ++r) {
    qgroup_unpack_codes(codes + (r + 1) * qgroup_row_bytes(cols, t.bits) - 4 * t.bits, t.bits, 1, last);
    for (int64_t j = cols % kQGroupChunk; j < kQGroupChunk; ++j)
      if (last[j]) throw FormatError(what + ": row " + std::to_string(r) + " has a non-zero code past the last column");
  }
}

// check(t) for every tensor, spread over the machine's cores (checksums and entropy-coded streams take most of the
// time of opening a file); the error of the first failing tensor in file order is the one thrown, as a sequential
// loop would.
template <class Check>
void for_each_tensor(std::vector<TensorEntry>& tensors, const Check& check) {
  const size_t cores = std::max(1u, std::min(8u, std::thread::hardware_concurrency()));
  const size_t workers = std::min(tensors.size(), cores);
  std::vector<std::exception_ptr> errors(tensors.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tensors.size();) {
      try {
        check(tensors[i]);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (size_t w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& thread : pool) thread.join();
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
}

// A component's allowed byte length: exact for every fixed-layout stream, a range for entropy-coded ones.
struct LengthRange {
  uint64_t min = 0, max = 0;  // 0: the component is absent
  LengthRange() = default;
  LengthRange(uint64_t exact) : min(exact), max(exact) {}  // NOLINT: most lengths are exact
  LengthRange(uint64_t lo, uint64_t hi) : min(lo), max(hi) {}
};

// Expected byte length of each component for a tensor's codec; throws on unknown codecs or bad params.
std::map<std::string, LengthRange> expected_components(TensorEntry& t, const JsonValue* params) {
  const std::string what = "tensor '" + t.name + "'";
  const uint64_t n = uint64_t(t.num_elements);
  auto no_params = [&] {
    if (params && !params->is_null() && !params->as_object(what + " params").empty())
      throw FormatError(what + ": codec " + t.codec + " takes no params");
  };
  if (t.codec == kCodecF32) { no_params(); return {{"data", checked_mul(n, 4, what)}}; }
  if (t.codec == kCodecF16) { no_params(); return {{"data", checked_mul(n, 2, what)}}; }
  if (t.codec == kCodecBytes) {
    no_params();
    if (t.shape.size() != 1) throw FormatError(what + ": stb.bytes.v1 needs a 1-D shape");
    return {{"data", n}};
  }
  const bool groups = t.codec == kCodecBinaryGroups, rowcol = t.codec == kCodecRowColSign;
  if (t.codec == kCodecSignBlock || groups || rowcol) {
    const std::string& codec = t.codec;
    if (t.shape.size() != 2) throw FormatError(what + ": " + codec + " needs a 2-D shape");
    if (!params) throw FormatError(what + ": " + codec + " needs params");
    t.block = int(params->at("block", what + " params").as_int(what + " block", 64, 4096));
    if (t.block % 64 != 0) throw FormatError(what + ": block must be a multiple of 64");
    const JsonValue& nm = params->at("nm", what + " params");
    if (!nm.is_null()) {
      const auto& a = nm.as_array(what + " nm");
      if (a.size() != 2) throw FormatError(what + ": nm must be [N, M]");
      t.nm_m = int(a[1].as_int(what + " nm M", 1, 64));
      t.nm_n = int(a[0].as_int(what + " nm N", 1, t.nm_m));
    }
    const uint64_t rows = uint64_t(t.shape[0]), cols = uint64_t(t.shape[1]);
    if (groups) {
      t.regions = int(params->at("regions", what + " params").as_int(what + " regions", 1, 3));
      t.salient_columns = params->at("salient_columns", what + " params")
                              .as_int(what + " salient_columns", 0, int64_t(cols));
      t.kept_salient = params->at("kept_salient", what + " params")
                           .as_int(what + " kept_salient", 0, int64_t(std::min<uint64_t>(
                                                                  uint64_t(kMaxElements), rows * uint64_t(t.salient_columns))));
      if (const JsonValue* bits = params->find("params_bits"))  // absent: fp16 params
        t.params_bits = int(bits->as_int(what + " params_bits (only 8 is defined)", 8, 8));
      if (const JsonValue* coder = params->find("label_coder")) {  // absent: fixed-width labels
        if (coder->as_string(what + " label_coder") != "rans")
          throw FormatError(what + ": label_coder must be \"rans\" (the only coder defined)");
        if (t.regions == 1) throw FormatError(what + ": label_coder needs regions > 1 (one region has no labels)");
        t.labels_rans = true;
      }
      if (const JsonValue* sg = params->find("salient_groups"))  // absent: one salient group
        t.salient_groups = int(sg->as_int(what + " salient_groups (only 2 is defined)", 2, 2));
    }
    if (rowcol) {
      t.salient_columns = params->at("salient_columns", what + " params")
                              .as_int(what + " salient_columns", 0, int64_t(cols));
      if (const JsonValue* g = params->find("groups"))  // absent: one scale group
        t.scale_groups = int(g->as_int(what + " groups (only 2 is defined)", 2, 2));
    }
    for (const auto& kv : params->as_object(what + " params"))
      if (kv.first != "block" && kv.first != "nm" &&
          !(groups && (kv.first == "regions" || kv.first == "salient_columns" || kv.first == "kept_salient" ||
                       kv.first == "params_bits" || kv.first == "label_coder" || kv.first == "salient_groups")) &&
          !(rowcol && (kv.first == "salient_columns" || kv.first == "groups")))
        throw FormatError(what + ": unknown param '" + kv.first + "'");
    const uint64_t words = (cols + 63) / 64;
    const uint64_t blocks = (cols + uint64_t(t.block) - 1) / uint64_t(t.block);
    if (rowcol) {  // stb.row-col-sign.v1: sign-block planes plus fp16 column scales and the salient plane
      const uint64_t plane = checked_mul(checked_mul(rows, words, what), 8, what);
      const uint64_t row_scales = checked_mul(checked_mul(rows, blocks, what), 2, what);
      std::map<std::string, LengthRange> out = {{"signs", plane}, {"row_scales", row_scales}, {"col_scales", cols * 2}};
      if (t.nm_m) out["mask"] = plane;
      if (t.salient_columns) {
        const uint64_t s = uint64_t(t.salient_columns);
        out["salient"] = words * 8;
        out["residual"] = checked_mul(checked_mul(rows, (s + 63) / 64, what), 8, what);
        out["residual_row_scales"] = row_scales;
        out["residual_col_scales"] = s * 2;
      }
      if (t.scale_groups == 2) {  // the group plane and the second group's copy of every scale array
        out["group"] = plane;
        for (const char* key : {"row_scales", "col_scales", "residual_row_scales", "residual_col_scales"})
          if (out.count(key)) out[std::string("group1_") + key] = out[key];
      }
      return out;
    }
    if (!groups) {
      const uint64_t plane = checked_mul(checked_mul(rows, words, what), 8, what);
      std::map<std::string, LengthRange> out = {{"signs", plane},
                                             {"scales", checked_mul(checked_mul(rows, blocks, what), 2, what)}};
      if (t.nm_m) out["mask"] = plane;
      return out;
    }
    // stb.binary-groups.v2: bit streams sized by what they hold (docs/format.md).
    const auto bytes_for = [](uint64_t bits) { return bits / 8 + (bits % 8 != 0); };
    const uint64_t kept = checked_mul(rows, binary_groups_kept_per_row(int64_t(cols), t.nm_n, t.nm_m), what);
    if (uint64_t(t.kept_salient) > kept) throw FormatError(what + ": kept_salient exceeds the kept weights");
    const uint64_t kept_plain = kept - uint64_t(t.kept_salient);
    std::map<std::string, LengthRange> out = {{"signs", bytes_for(kept)}, {"salient", bytes_for(cols)}};
    if (t.nm_m) out["mask"] = bytes_for(checked_mul(rows, binary_groups_mask_bits_per_row(int64_t(cols), t.nm_n,
                                                                                            t.nm_m), what));
    if (t.labels_rans && kept_plain)
      out["labels"] = {rans_header_bytes(t.regions), rans_max_bytes(kept_plain, t.regions)};  // its decoder checks
    else if (t.regions == 2)
      out["labels"] = bytes_for(kept_plain);
    else if (t.regions == 3)
      out["labels"] = kept_plain / 5 + (kept_plain % 5 != 0);
    if (t.kept_salient) out["residual"] = bytes_for(uint64_t(t.kept_salient));
    if (t.kept_salient && t.salient_groups == 2) out["salient_labels"] = bytes_for(uint64_t(t.kept_salient));
    const uint64_t slots = uint64_t(t.param_slots());
    out["params"] = checked_mul(checked_mul(checked_mul(rows, blocks, what), slots, what), uint64_t(t.params_bits / 8),
                                what);
    if (t.params_bits == 8) out["param_scales"] = checked_mul(checked_mul(rows, slots, what), 2, what);
    for (auto it = out.begin(); it != out.end();) it = it->second.max ? std::next(it) : out.erase(it);  // empty: absent
    return out;
  }
  if (t.codec == kCodecInt8Group) {
    if (t.shape.size() != 2) throw FormatError(what + ": stb.int8-group.v1 needs a 2-D shape");
    if (!params) throw FormatError(what + ": stb.int8-group.v1 needs params");
    for (const auto& kv : params->as_object(what + " params"))
      if (kv.first != "group") throw FormatError(what + ": unknown param '" + kv.first + "'");
    t.group = int(params->at("group", what + " params").as_int(what + " group (only 64 is defined)", 64, 64));
    const uint64_t rows = uint64_t(t.shape[0]), groups = (uint64_t(t.shape[1]) + 63) / 64;
    return {{"values", checked_mul(checked_mul(rows, groups, what), 64, what)},
            {"scales", checked_mul(checked_mul(rows, groups, what), 2, what)}};
  }
  if (t.codec == kCodecQGroup) {
    if (t.shape.size() != 2) throw FormatError(what + ": stb.qgroup.v1 needs a 2-D shape");
    if (!params) throw FormatError(what + ": stb.qgroup.v1 needs params");
    for (const auto& kv : params->as_object(what + " params"))
      if (kv.first != "bits" && kv.first != "group" && kv.first != "params_bits" && kv.first != "code_coder")
        throw FormatError(what + ": unknown param '" + kv.first + "'");
    t.bits = int(params->at("bits", what + " params").as_int(what + " bits", 2, 4));
    t.group = int(params->at("group", what + " params").as_int(what + " group", kQGroupChunk, 4096));
    if (t.group % kQGroupChunk) throw FormatError(what + ": group must be a multiple of 32");
    if (const JsonValue* bits = params->find("params_bits"))  // absent: fp16 scales and offsets
      t.params_bits = int(bits->as_int(what + " params_bits (only 8 is defined)", 8, 8));
    if (const JsonValue* coder = params->find("code_coder")) {  // absent: fixed-width codes
      if (coder->as_string(what + " code_coder") != "rans")
        throw FormatError(what + ": code_coder must be \"rans\" (the only coder defined)");
      t.codes_rans = true;
    }
    const uint64_t rows = uint64_t(t.shape[0]), cols = uint64_t(t.shape[1]);
    const uint64_t params = checked_mul(rows, (cols + uint64_t(t.group) - 1) / uint64_t(t.group), what);
    const uint64_t param_bytes = checked_mul(params, uint64_t(t.params_bits / 8), what);
    const int alphabet = 1 << t.bits;
    const LengthRange codes = t.codes_rans  // its decoder checks the exact length
        ? LengthRange(rans_header_bytes(alphabet), rans_max_bytes(checked_mul(rows, cols, what), alphabet))
        : LengthRange(checked_mul(rows, uint64_t(qgroup_row_bytes(int64_t(cols), t.bits)), what));
    std::map<std::string, LengthRange> out = {{"codes", codes}, {"scales", param_bytes}, {"offsets", param_bytes}};
    if (t.params_bits == 8) out["param_scales"] = checked_mul(rows, 4, what);  // d_scale, d_offset per row
    return out;
  }
  throw FormatError(what + ": unknown codec '" + t.codec + "' (this reader knows stb.f32.v1, stb.f16.v1, "
                    "stb.bytes.v1, stb.sign-block.v1, stb.int8-group.v1, stb.binary-groups.v2, "
                    "stb.row-col-sign.v1, stb.qgroup.v1)");
}

}  // namespace

const uint16_t* TensorEntry::qgroup_scales() const {
  return params_bits == 8 ? qgroup_params.data() : reinterpret_cast<const uint16_t*>(component("scales").data);
}

const uint16_t* TensorEntry::qgroup_offsets() const {
  return params_bits == 8 ? qgroup_params.data() + qgroup_params.size() / 2
                          : reinterpret_cast<const uint16_t*>(component("offsets").data);
}

const uint8_t* TensorEntry::qgroup_codes(std::vector<uint8_t>& storage) const {
  if (!codes_rans) return component("codes").data;
  storage.resize(size_t(shape[0] * qgroup_row_bytes(shape[1], bits)));  // every byte is written
  decode_qgroup_codes(*this, storage.data());
  return storage.data();
}

const Component& TensorEntry::component(const std::string& key) const {
  auto it = components.find(key);
  if (it == components.end()) throw FormatError("tensor '" + name + "' has no component '" + key + "'");
  return it->second;
}

StbFile::~StbFile() {
  if (base_) munmap(const_cast<uint8_t*>(base_), size_);
}

const TensorEntry* StbFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorEntry& StbFile::get(const std::string& name) const {
  const TensorEntry* t = find(name);
  if (!t) throw FormatError("tensor '" + name + "' is missing from " + path_);
  return *t;
}

std::shared_ptr<const StbFile> StbFile::open(const std::string& path, bool verify_checksums) {
  std::shared_ptr<StbFile> f(new StbFile());
  f->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw std::runtime_error(path + " is not a regular file");
  }
  const uint64_t size = uint64_t(st.st_size);
  if (size < kFixedHeaderSize) {
    ::close(fd);
    throw FormatError(path + " is too small to be an .stb file (" + std::to_string(size) + " bytes)");
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw std::runtime_error("cannot map " + path + ": " + std::strerror(errno));
  f->base_ = static_cast<const uint8_t*>(map);
  f->size_ = size;
  const uint8_t* h = f->base_;

  // Fixed header.
  if (std::memcmp(h, kMagic, 8) != 0) throw FormatError(path + " is not an .stb file (bad magic)");
  if (load_u32(h + 8) != kByteOrderMark) throw FormatError("bad byte-order mark (not a little-endian .stb file)");
  if (load_u32(h + 60) != crc32c(h, 60)) throw FormatError("fixed header checksum mismatch (file is corrupt)");
  f->version_ = load_u32(h + 12);
  if (f->version_ != 1)
    throw FormatError("unsupported .stb format version " + std::to_string(f->version_) + " (this reader knows 1)");
  f->required_features_ = load_u64(h + 16);
  if (f->required_features_ & ~kKnownFeatures)
    throw FormatError("file requires unknown features " + hex64(f->required_features_ & ~kKnownFeatures) +
                      "; this runtime is too old to load it correctly");
  const uint64_t json_length = load_u64(h + 24), data_offset = load_u64(h + 32), declared_size = load_u64(h + 40);
  if (load_u32(h + 52) != 0 || load_u32(h + 56) != 0) throw FormatError("reserved header fields are not zero");
  if (declared_size != size)
    throw FormatError("file size is " + std::to_string(size) + " bytes but the header says " +
                      std::to_string(declared_size) + " (truncated or appended to)");
  if (json_length < 2 || json_length > kMaxJsonLength) throw FormatError("JSON header length out of range");
  if (json_length > size - kFixedHeaderSize) throw FormatError("JSON header runs past the end of the file");
  if (data_offset != align_up(kFixedHeaderSize + json_length))
    throw FormatError("data offset " + std::to_string(data_offset) + " is not the aligned end of the JSON header");
  if (data_offset > size) throw FormatError("data section starts past the end of the file");
  const char* json = reinterpret_cast<const char*>(h + kFixedHeaderSize);
  if (load_u32(h + 48) != crc32c(json, json_length)) throw FormatError("JSON header checksum mismatch");
  for (uint64_t i = kFixedHeaderSize + json_length; i < data_offset; ++i)
    if (h[i] != 0) throw FormatError("non-zero padding after the JSON header");
  f->json_text_.assign(json, json_length);

  JsonValue root = JsonValue::parse(json, json_length);
  const auto& top = root.as_object("JSON header");
  if (top.size() != 2 || !root.find("metadata") || !root.find("tensors"))
    throw FormatError("JSON header must have exactly the keys 'metadata' and 'tensors'");
  f->metadata_ = root.at("metadata", "header");
  f->metadata_.as_object("metadata");

  // Tensor table.
  const uint64_t data_size = size - data_offset;
  struct Range { uint64_t offset, length; std::string owner; };
  std::vector<Range> ranges;
  bool any_mask = false;
  for (const auto& kv : root.at("tensors", "header").as_object("tensors")) {
    TensorEntry t;
    t.name = kv.first;
    if (!valid_tensor_name(t.name)) throw FormatError("invalid tensor name (1-256 printable ASCII characters)");
    const std::string what = "tensor '" + t.name + "'";
    const JsonValue& e = kv.second;
    for (const auto& field : e.as_object(what))
      if (field.first != "codec" && field.first != "shape" && field.first != "params" && field.first != "components")
        throw FormatError(what + ": unknown field '" + field.first + "'");
    t.codec = e.at("codec", what).as_string(what + " codec");
    const auto& dims = e.at("shape", what).as_array(what + " shape");
    if (dims.empty() || dims.size() > 4) throw FormatError(what + ": shape must have 1 to 4 dimensions");
    t.num_elements = 1;
    for (const auto& d : dims) {
      t.shape.push_back(d.as_int(what + " dimension", 1, kMaxDim));
      if (t.num_elements > kMaxElements / t.shape.back()) throw FormatError(what + ": too many elements");
      t.num_elements *= t.shape.back();
    }
    auto expected = expected_components(t, e.find("params"));
    const auto& comps = e.at("components", what).as_object(what + " components");
    if (comps.size() != expected.size())
      throw FormatError(what + ": codec " + t.codec + " needs " + std::to_string(expected.size()) +
                        " components, found " + std::to_string(comps.size()));
    for (const auto& ckv : comps) {
      const std::string cwhat = what + " component '" + ckv.first + "'";
      auto exp = expected.find(ckv.first);
      if (exp == expected.end()) throw FormatError(what + ": unexpected component '" + ckv.first + "'");
      const JsonValue& c = ckv.second;
      if (c.as_object(cwhat).size() != 3) throw FormatError(cwhat + " must have offset, length and crc32c");
      Component comp;
      comp.offset = uint64_t(c.at("offset", cwhat).as_int(cwhat + " offset", 0, kMaxOffset));
      comp.length = uint64_t(c.at("length", cwhat).as_int(cwhat + " length", 1, kMaxOffset));
      comp.crc32c = uint32_t(c.at("crc32c", cwhat).as_int(cwhat + " crc32c", 0, 0xFFFFFFFFll));
      const LengthRange& need = exp->second;
      if (comp.length < need.min || comp.length > need.max)
        throw FormatError(cwhat + " is " + std::to_string(comp.length) + " bytes, but its shape and codec need " +
                          (need.min == need.max ? std::to_string(need.min)
                                                : std::to_string(need.min) + " to " + std::to_string(need.max)));
      if (comp.offset % kAlignment != 0) throw FormatError(cwhat + " offset is not 64-byte aligned");
      if (comp.offset > data_size || comp.length > data_size - comp.offset)
        throw FormatError(cwhat + " lies outside the file");
      comp.data = f->base_ + data_offset + comp.offset;
      ranges.push_back({comp.offset, comp.length, cwhat});
      t.components.emplace(ckv.first, comp);
    }
    any_mask |= t.nm_m != 0;
    f->index_.emplace(t.name, f->tensors_.size());
    f->tensors_.push_back(std::move(t));
  }

  // Components tile the data section: no holes, no overlaps, nothing trailing.
  std::stable_sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.offset < b.offset; });
  uint64_t expected_offset = 0, end = 0;
  for (const Range& r : ranges) {
    if (r.offset < expected_offset) throw FormatError(r.owner + " overlaps the previous component");
    if (r.offset > expected_offset) throw FormatError(r.owner + " leaves a hole before it");
    for (uint64_t i = end; i < r.offset; ++i)
      if (f->base_[data_offset + i] != 0) throw FormatError("non-zero padding before " + r.owner);
    end = r.offset + r.length;
    expected_offset = align_up(end);
  }
  if (end != data_size)
    throw FormatError(std::to_string(data_size - end) + " bytes after the last component are not described");

  // Features must be declared when used: a reader that lacked them would compute garbage.
  if (any_mask && !(f->required_features_ & kFeatureNmMask))
    throw FormatError("tensors carry N:M masks but the nm_mask feature bit is not set");
  if (const JsonValue* cfg = f->metadata_.find("config"))
    if (const JsonValue* sw = cfg->find("sliding_window"))
      if (!sw->is_null() && !(f->required_features_ & kFeatureSlidingWindow))
        throw FormatError("config has a sliding window but the sliding_window feature bit is not set");

  if (verify_checksums)
    for_each_tensor(f->tensors_, [](TensorEntry& t) {
      for (const auto& ckv : t.components)
        if (crc32c(ckv.second.data, ckv.second.length) != ckv.second.crc32c)
          throw FormatError("checksum mismatch in tensor '" + t.name + "' component '" + ckv.first +
                            "' (file is corrupt)");
    });
  for_each_tensor(f->tensors_, [](TensorEntry& t) {
    if (t.codec == kCodecBinaryGroups) validate_binary_groups(t);
    else if (t.codec == kCodecRowColSign) validate_row_col_sign(t);
    else if (t.codec == kCodecQGroup) validate_qgroup(t);
    else if (t.codec == kCodecSignBlock || t.codec == kCodecInt8Group) check_finite_halves(t, "scales");
  });
  return f;
}

void release_pages(const Component& c) {
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(c.data) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(c.data) + c.length) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);  // a hint: errors are moot
}

}  // namespace stb
