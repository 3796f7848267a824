// The CPU backend: weights used in place from the file mapping, activations in host memory, work spread over a
// thread pool. Matmuls split the output rows into chunks (one task each); attention splits (row, head) pairs.
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "cpu/kernels.h"
#include "cpu/kernels_groups.h"
#include "cpu/thread_pool.h"
#include "stbllm/backend.h"

namespace stb {

namespace {

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Keys and values of each live sequence: per layer a [capacity, kv_width] float32 array, grown geometrically.
class CpuKvCache final : public KvCache {
 public:
  CpuKvCache(int layers, int width) : layers_(layers), width_(width) {}

  void reserve(int slot, int n_positions) override {
    Slot& s = slots_[slot];
    if (s.k.empty()) {
      s.k.resize(layers_);
      s.v.resize(layers_);
    }
    if (n_positions <= s.capacity) return;
    s.capacity = std::max({n_positions, 2 * s.capacity, 16});
    for (int l = 0; l < layers_; ++l) {
      s.k[l].resize(size_t(s.capacity) * width_);
      s.v[l].resize(size_t(s.capacity) * width_);
    }
  }
  void release(int slot) override { slots_.erase(slot); }
  uint64_t bytes_per_token() const override { return uint64_t(layers_) * width_ * 2 * sizeof(float); }

  float* keys(int slot, int layer) { return slots_.at(slot).k[layer].data(); }
  float* values(int slot, int layer) { return slots_.at(slot).v[layer].data(); }

 private:
  struct Slot {
    int capacity = 0;
    std::vector<std::vector<float>> k, v;
  };
  int layers_, width_;
  std::unordered_map<int, Slot> slots_;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads)
      : pool_(threads > 0 ? threads : available_cores()), k_(cpu::best_kernels()) {}

  std::string name() const override { return "cpu"; }
  std::string kernels() const override { return k_.name; }
  int threads() const override { return pool_.size(); }

  Matrix upload_matrix(const TensorEntry& w, const TensorEntry* bias) override {
    Matrix m;
    m.name = w.name;
    m.rows = w.shape.at(0);
    m.cols = w.shape.at(1);
    if (w.codec == kCodecF32 || w.codec == kCodecF16) {
      m.codec = w.codec == kCodecF32 ? MatrixCodec::F32 : MatrixCodec::F16;
      m.values = w.component("data").data;
    } else if (w.codec == kCodecSignBlock) {
      m.codec = MatrixCodec::SignBlock;
      m.block = w.block;
      m.words_per_row = int((m.cols + 63) / 64);
      m.blocks_per_row = int((m.cols + w.block - 1) / w.block);
      m.signs = reinterpret_cast<const uint64_t*>(w.component("signs").data);
      m.scales = reinterpret_cast<const uint16_t*>(w.component("scales").data);
      if (w.nm_m) m.mask = reinterpret_cast<const uint64_t*>(w.component("mask").data);
    } else if (w.codec == kCodecBinaryGroups) {
      cpu::describe_binary_groups(w, m);
    } else {
      throw FormatError("tensor '" + w.name + "' has codec " + w.codec +
                        "; a weight matrix needs stb.f32.v1, stb.f16.v1, stb.sign-block.v1 or "
                        "stb.binary-groups.v1");
    }
    for (const auto& kv : w.components) m.bytes += kv.second.length;
    if (bias) {
      m.bias = upload_vector(*bias);
      m.bytes += bias->components.at("data").length;
    }
    return m;
  }

  const float* upload_vector(const TensorEntry& t) override {
    if (t.codec != kCodecF32) throw FormatError("tensor '" + t.name + "' must be stb.f32.v1, not " + t.codec);
    return reinterpret_cast<const float*>(t.component("data").data);
  }

  float* alloc(size_t n) override {
    const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    return static_cast<float*>(p);
  }
  void release(float* buffer) override { std::free(buffer); }

  std::unique_ptr<KvCache> new_kv_cache(int layers, int kv_width) override {
    return std::make_unique<CpuKvCache>(layers, kv_width);
  }

  void to_host(const float* src, float* dst, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }

  void embed(const Matrix& table, const int* ids, int n, float* out, bool accumulate) override {
    const int64_t dim = table.cols;
    std::vector<float> row(dim);
    for (int i = 0; i < n; ++i) {
      float* dst = out + i * dim;
      if (table.codec == MatrixCodec::F32) {
        std::memcpy(row.data(), static_cast<const float*>(table.values) + ids[i] * dim, dim * sizeof(float));
      } else {
        k_.f16_to_f32(static_cast<const uint16_t*>(table.values) + ids[i] * dim, row.data(), dim);
      }
      for (int64_t j = 0; j < dim; ++j) dst[j] = accumulate ? dst[j] + row[j] : row[j];
    }
  }

  void linear(const Matrix& w, const float* x, int n, float* out) override {
    const int64_t rows = w.rows, cols = w.cols;
    std::vector<float> block_sums;  // Σ x per (input row, block), shared by every dense sign-block output row
    if (w.codec == MatrixCodec::SignBlock && !w.mask) {
      block_sums.assign(size_t(n) * w.blocks_per_row, 0.f);
      for (int t = 0; t < n; ++t)
        for (int64_t j = 0; j < cols; ++j) block_sums[t * w.blocks_per_row + j / w.block] += x[t * cols + j];
    }
    // Chunks of output rows: small enough to balance the threads, large enough that a chunk's weights stay in
    // cache while every input row passes over them.
    const int64_t chunk = std::max<int64_t>(8, (rows + 4 * threads() - 1) / (4 * threads()));
    const int64_t n_chunks = (rows + chunk - 1) / chunk;
    pool_.run(n_chunks, [&](int64_t c) {
      const int64_t r0 = c * chunk, r1 = std::min(rows, r0 + chunk);
      for (int t = 0; t < n; ++t) {
        const float* xt = x + t * cols;
        float* yt = out + t * rows;
        for (int64_t r = r0; r < r1; ++r) {
          float y;
          switch (w.codec) {
            case MatrixCodec::F32: y = k_.dot_f32(static_cast<const float*>(w.values) + r * cols, xt, cols); break;
            case MatrixCodec::F16: y = k_.dot_f16(static_cast<const uint16_t*>(w.values) + r * cols, xt, cols); break;
            case MatrixCodec::BinaryGroups: y = cpu::dot_binary_groups(w, r, xt); break;
            default:
              y = k_.dot_sign(w.signs + r * w.words_per_row, w.mask ? w.mask + r * w.words_per_row : nullptr,
                              w.scales + r * w.blocks_per_row, w.block, xt,
                              block_sums.empty() ? nullptr : block_sums.data() + t * w.blocks_per_row, cols);
          }
          yt[r] = w.bias ? y + w.bias[r] : y;
        }
      }
    });
  }

  void norm(const float* x, int n, int dim, const float* weight, const float* bias, float eps, bool rms,
            float* out) override {
    for (int i = 0; i < n; ++i) {
      const float* xi = x + size_t(i) * dim;
      float* yi = out + size_t(i) * dim;
      double mean = 0, sq = 0;
      if (!rms) {
        for (int j = 0; j < dim; ++j) mean += xi[j];
        mean /= dim;
      }
      for (int j = 0; j < dim; ++j) sq += (xi[j] - mean) * (xi[j] - mean);
      const float inv = float(1.0 / std::sqrt(sq / dim + eps)), m = float(mean);
      for (int j = 0; j < dim; ++j) yi[j] = (xi[j] - m) * inv * weight[j] + (bias ? bias[j] : 0.f);
    }
  }

  void rope(float* x, int n, int heads, int head_dim, const RowInfo* rows, float theta) override {
    const int half = head_dim / 2;
    std::vector<float> inv_freq(half);  // float32 like the reference implementation
    for (int i = 0; i < half; ++i) inv_freq[i] = 1.0f / std::pow(theta, float(2 * i) / float(head_dim));
    for (int r = 0; r < n; ++r) {
      for (int i = 0; i < half; ++i) {
        const float angle = float(rows[r].pos) * inv_freq[i], c = std::cos(angle), s = std::sin(angle);
        for (int h = 0; h < heads; ++h) {
          float* v = x + (size_t(r) * heads + h) * head_dim;
          const float a = v[i], b = v[i + half];
          v[i] = a * c - b * s;
          v[i + half] = b * c + a * s;
        }
      }
    }
  }

  void attention(KvCache& cache_base, int layer, const float* q, const float* k, const float* v, int n,
                 const RowInfo* rows, const AttentionShape& shape, float* out) override {
    auto& cache = static_cast<CpuKvCache&>(cache_base);
    const int hd = shape.head_dim, kv_width = shape.kv_heads * hd, group = shape.heads / shape.kv_heads;
    for (int r = 0; r < n; ++r) {
      std::memcpy(cache.keys(rows[r].slot, layer) + size_t(rows[r].pos) * kv_width, k + size_t(r) * kv_width,
                  kv_width * sizeof(float));
      std::memcpy(cache.values(rows[r].slot, layer) + size_t(rows[r].pos) * kv_width, v + size_t(r) * kv_width,
                  kv_width * sizeof(float));
    }
    const float scale = 1.0f / std::sqrt(float(hd));
    pool_.run(int64_t(n) * shape.heads, [&](int64_t task) {
      const int r = int(task / shape.heads), h = int(task % shape.heads), kvh = h / group;
      const int pos = rows[r].pos;
      const int first = shape.sliding_window > 0 ? std::max(0, pos - shape.sliding_window + 1) : 0;
      const float* keys = cache.keys(rows[r].slot, layer) + kvh * hd;
      const float* vals = cache.values(rows[r].slot, layer) + kvh * hd;
      const float* qh = q + (size_t(r) * shape.heads + h) * hd;
      thread_local std::vector<float> scores;
      scores.resize(pos - first + 1);
      float top = -INFINITY;
      for (int j = first; j <= pos; ++j) {
        scores[j - first] = k_.dot_f32(keys + size_t(j) * kv_width, qh, hd) * scale;
        top = std::max(top, scores[j - first]);
      }
      double total = 0;
      for (float& s : scores) total += (s = std::exp(s - top));
      float* oh = out + (size_t(r) * shape.heads + h) * hd;
      std::fill(oh, oh + hd, 0.f);
      for (int j = first; j <= pos; ++j) {
        const float p = float(scores[j - first] / total);
        const float* vj = vals + size_t(j) * kv_width;
        for (int d = 0; d < hd; ++d) oh[d] += p * vj[d];
      }
    });
  }

  void activation(const float* gate, float* up, size_t n, bool silu) override {
    for (size_t i = 0; i < n; ++i) {
      const float a = gate ? gate[i] : up[i];
      const float act = silu ? a / (1.0f + std::exp(-a)) : std::max(a, 0.0f);
      up[i] = gate ? act * up[i] : act;
    }
  }

  void add(float* x, const float* y, size_t n) override {
    for (size_t i = 0; i < n; ++i) x[i] += y[i];
  }

 private:
  cpu::ThreadPool pool_;
  const cpu::Kernels& k_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace stb
