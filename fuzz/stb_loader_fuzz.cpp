// libFuzzer target for the .stb loader (docs/security.md): the bytes are a file; the target opens it the way the
// runtime does and uses everything it accepted. Any outcome other than success or stb::FormatError is a finding
// (sanitizer report, crash, hang, out-of-memory, or another exception escaping).
//
// Each input is loaded twice:
//   1. as given, checksums verified (the fixed-header, JSON and component CRC paths);
//   2. with the fixed header repaired (file_size, data_offset, JSON CRC, header CRC) and component checksums not
//      verified, so that mutations get past the checksums into the JSON parser, the tensor table and the codecs.
// An accepted file then has every tensor decoded and used by the CPU backend (binary-groups streams decoded into
// planes, sign-block LUT repack, a matrix-vector product and an embedding lookup per matrix), and, when it is a
// usable model, two tokens are generated with a non-greedy sampler.
//
// The file lives in a memfd and is opened through /proc/self/fd, so the reader runs unchanged (mmap included).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "stbllm/backend.h"
#include "stbllm/binary_groups.h"
#include "stbllm/format.h"
#include "stbllm/model.h"

namespace {

class MemoryFile {
 public:
  MemoryFile() : fd_(memfd_create("stb-fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  const std::string& write(const uint8_t* data, size_t size) {
    if (ftruncate(fd_, 0) != 0 || (size && pwrite(fd_, data, size, 0) != ssize_t(size))) {
      std::perror("memfd write");
      std::abort();
    }
    return path_;
  }

 private:
  int fd_;
  std::string path_;
};

void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void store_u64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Makes the fixed header consistent with the bytes that follow it (offsets of docs/format.md).
void repair_fixed_header(std::vector<uint8_t>& f) {
  store_u64(&f[40], f.size());
  const uint64_t json_length = load_u64(&f[24]);
  if (json_length <= f.size() - 64) {
    store_u64(&f[32], (64 + json_length + 63) / 64 * 64);
    store_u32(&f[48], stb::crc32c(&f[64], json_length));
  }
  store_u32(&f[60], stb::crc32c(f.data(), 60));
}

bool is_matrix_codec(const std::string& codec) {
  return codec == stb::kCodecF32 || codec == stb::kCodecF16 || codec == stb::kCodecSignBlock ||
         codec == stb::kCodecInt8Group || codec == stb::kCodecBinaryGroups || codec == stb::kCodecRowColSign ||
         codec == stb::kCodecQGroup;
}

// Uses one accepted tensor the way the model would. Sums go to a volatile sink so nothing is optimized away.
volatile float g_sink;

void use_tensor(stb::Backend& backend, const stb::TensorEntry& t) {
  if (t.shape.size() == 1 && t.codec == stb::kCodecF32) {
    const float* v = backend.upload_vector(t);
    g_sink = v[0] + v[t.shape[0] - 1];
    return;
  }
  if (t.codec == stb::kCodecBytes) {
    const stb::Component& c = t.component("data");
    g_sink = float(c.data[0] ^ c.data[c.length - 1]);
    return;
  }
  if (t.shape.size() != 2 || !is_matrix_codec(t.codec)) return;
  const stb::Matrix m = backend.upload_matrix(t, nullptr);
  std::vector<float> x(size_t(m.cols), 1.0f), y(size_t(m.rows));
  backend.linear(m, x.data(), 1, y.data());
  g_sink = y[0] + y[y.size() - 1];
  if (m.codec == stb::MatrixCodec::F32 || m.codec == stb::MatrixCodec::F16 ||
      m.codec == stb::MatrixCodec::Int8Group || m.codec == stb::MatrixCodec::QGroup) {
    const int ids[2] = {0, int(m.rows - 1)};
    std::vector<float> rows(size_t(2 * m.cols));
    backend.embed(m, ids, 2, rows.data(), false);
    g_sink = rows[0] + rows[rows.size() - 1];
  }
}

void load(const std::string& path, bool verify_checksums) {
  try {
    const auto file = stb::StbFile::open(path, verify_checksums);
    const auto backend = stb::make_cpu_backend(1);
    for (const stb::TensorEntry& t : file->tensors()) use_tensor(*backend, t);

    auto model = std::make_shared<stb::Model>(path, 1, verify_checksums);
    stb::SamplingParams sampling;
    sampling.top_k = 0;  // the full sort over the vocabulary
    sampling.repetition_penalty = 1.3f;
    stb::Generator generator(*model, {{0}}, 2, sampling, {});
    generator.step(2);
  } catch (const stb::FormatError&) {
  } catch (const std::length_error& e) {
    // The only legitimate one: a model whose context holds a single position cannot take a prompt.
    if (std::strstr(e.what(), "the model's context is") == nullptr) throw;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static MemoryFile file;
  load(file.write(data, size), true);
  if (size >= 64) {
    std::vector<uint8_t> repaired(data, data + size);
    repair_fixed_header(repaired);
    load(file.write(repaired.data(), repaired.size()), false);
  }
  return 0;
}
