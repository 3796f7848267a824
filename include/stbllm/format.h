// Reader for the .stb v1 format (docs/format.md): mmap, strict validation, zero-copy access to components.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "stbllm/json.h"

namespace stb {

// Every malformed-file condition raises this (exposed to Python as stbllm_rt.FormatError).
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum RequiredFeature : uint64_t {
  kFeatureSlidingWindow = 1ull << 0,
  kFeatureNmMask = 1ull << 1,
};
constexpr uint64_t kKnownFeatures = kFeatureSlidingWindow | kFeatureNmMask;

constexpr char kCodecF32[] = "stb.f32.v1";
constexpr char kCodecF16[] = "stb.f16.v1";
constexpr char kCodecBytes[] = "stb.bytes.v1";
constexpr char kCodecSignBlock[] = "stb.sign-block.v1";
constexpr char kCodecInt8Group[] = "stb.int8-group.v1";
constexpr char kCodecBinaryGroups[] = "stb.binary-groups.v2";
constexpr char kCodecRowColSign[] = "stb.row-col-sign.v1";
constexpr char kCodecQGroup[] = "stb.qgroup.v1";

struct Component {
  const uint8_t* data = nullptr;  // points into the mapping; valid while the StbFile lives
  uint64_t offset = 0;            // relative to the data section
  uint64_t length = 0;
  uint32_t crc32c = 0;
};

struct TensorEntry {
  std::string name;
  std::string codec;
  std::vector<int64_t> shape;
  int64_t num_elements = 0;
  // stb.sign-block.v1 / stb.binary-groups.v2 parameters (0 when not that codec / no mask)
  int block = 0;
  int nm_n = 0, nm_m = 0;
  int group = 0;  // stb.int8-group.v1 / stb.qgroup.v1 group size
  int bits = 0;   // stb.qgroup.v1 code width (2, 3 or 4)
  // stb.binary-groups.v2 only: non-salient regions (1-3), salient columns, kept weights in salient columns
  // (salient_columns also for stb.row-col-sign.v1: the columns of its order-2 plane)
  int regions = 0;
  int64_t salient_columns = 0;
  int64_t kept_salient = 0;
  // stb.binary-groups.v2 and stb.qgroup.v1: 16 (fp16 params) or 8 (int8 codes under per-(row, slot) scales)
  int params_bits = 16;
  bool labels_rans = false;  // stb.binary-groups.v2: labels rANS-coded ("label_coder": "rans"), else fixed width
  bool codes_rans = false;   // stb.qgroup.v1: codes rANS-coded ("code_coder": "rans"), else fixed width
  int salient_groups = 1;    // stb.binary-groups.v2: 1, or 2 with ARB's column-group bitmap ("salient_groups": 2)
  int scale_groups = 1;      // stb.row-col-sign.v1: 1, or 2 with a group plane and a second scale set ("groups": 2)
  // stb.binary-groups.v2: params per (row, block): α, μ per region, then α₁, μ₁, α₂, μ₂ per salient group
  int param_slots() const { return 2 * regions + 4 * salient_groups; }
  std::map<std::string, Component> components;
  // stb.qgroup.v1 with params_bits = 8: the fp16 scales, then the fp16 offsets ([rows, G] each), expanded from their
  // 8-bit codes when the file is opened; empty for fp16 params (read in place).
  std::vector<uint16_t> qgroup_params;

  const Component& component(const std::string& key) const;  // throws FormatError when missing
  // stb.qgroup.v1: the fp16 scales and offsets [rows, G], whatever params_bits the file stores them with.
  const uint16_t* qgroup_scales() const;
  const uint16_t* qgroup_offsets() const;
  // stb.qgroup.v1: the codes in the fixed-width layout (include/stbllm/qgroup.h): the file's bytes, or with
  // code_coder "rans" its stream decoded into `storage` (rows × qgroup_row_bytes; validated at open, so decoding
  // cannot fail here). Decoded on demand, so a loader holds one matrix's codes at a time, not the whole model's.
  const uint8_t* qgroup_codes(std::vector<uint8_t>& storage) const;
};

// Tells the OS that the mapped pages inside c are not needed any more (a backend has copied or repacked them), so
// they leave the resident set; touching them again re-reads the file. Loading a model this way never holds both a
// matrix's file pages and its repacked form for every matrix at once.
void release_pages(const Component& c);

class StbFile {
 public:
  // Maps and validates the whole file; throws FormatError on any violation, std::runtime_error on I/O errors.
  static std::shared_ptr<const StbFile> open(const std::string& path, bool verify_checksums = true);
  ~StbFile();
  StbFile(const StbFile&) = delete;
  StbFile& operator=(const StbFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t format_version() const { return version_; }
  uint64_t required_features() const { return required_features_; }
  uint64_t file_size() const { return size_; }
  const JsonValue& metadata() const { return metadata_; }
  const std::string& json_text() const { return json_text_; }
  const std::vector<TensorEntry>& tensors() const { return tensors_; }
  const TensorEntry* find(const std::string& name) const;  // nullptr when absent
  const TensorEntry& get(const std::string& name) const;   // throws FormatError when absent

 private:
  StbFile() = default;
  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t required_features_ = 0;
  std::string json_text_;
  JsonValue metadata_;
  std::vector<TensorEntry> tensors_;
  std::map<std::string, size_t> index_;
};

// CRC-32C (Castagnoli); hardware-accelerated where the CPU has SSE4.2.
uint32_t crc32c(const void* data, size_t length, uint32_t crc = 0);

}  // namespace stb
