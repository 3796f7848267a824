// The CPU backend: weights used in place from the file mapping, activations in host memory, work spread over a
// thread pool. Matmuls split the output rows into chunks (one task each); attention splits (row, head) pairs.
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <unordered_map>

#include "cpu/int8_tiles.h"
#include "cpu/qgroup_tiles.h"
#include "cpu/kernels.h"
#include "cpu/kernels_groups.h"
#include "cpu/sign_lut.h"
#include "cpu/thread_pool.h"
#include "stbllm/backend.h"
#include "stbllm/qgroup.h"

namespace stb {

namespace {

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Keys and values of each live sequence: per layer and KV head a [capacity, head_dim] array of float32 or fp16
// (KvType), grown geometrically. A head's positions are contiguous, so attention streams them (a [position,
// kv_width] layout made it read head_dim of every kv_width elements). Elements are kept as raw bytes; keys<T>() /
// values<T>() view them in the cache's type.
class CpuKvCache final : public KvCache {
 public:
  CpuKvCache(int layers, int kv_heads, int head_dim, KvType type)
      : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim), type_(type),
        element_bytes_(type == KvType::F16 ? 2 : 4) {}

  void reserve(int slot, int n_positions) override {
    Slot& s = slots_[slot];
    if (s.k.empty()) {
      s.k.resize(layers_);
      s.v.resize(layers_);
    }
    if (n_positions <= s.capacity) return;
    const int capacity = std::max({n_positions, 2 * s.capacity, 16});
    const size_t old_head = size_t(s.capacity) * head_dim_ * element_bytes_,
                 new_head = size_t(capacity) * head_dim_ * element_bytes_;
    for (auto* planes : {&s.k, &s.v})
      for (auto& plane : *planes) {
        std::vector<unsigned char> grown(new_head * kv_heads_);
        for (int h = 0; h < kv_heads_ && old_head; ++h)
          std::memcpy(grown.data() + h * new_head, plane.data() + h * old_head, old_head);
        plane.swap(grown);
      }
    s.capacity = capacity;
  }
  void release(int slot) override { slots_.erase(slot); }
  uint64_t bytes_per_token() const override { return uint64_t(layers_) * kv_heads_ * head_dim_ * 2 * element_bytes_; }
  KvType type() const { return type_; }

  // Position 0 of KV head h of a slot's layer; its positions follow every head_dim elements.
  template <class T>
  T* keys(int slot, int layer, int h) { return head<T>(slots_.at(slot), true, layer, h); }
  template <class T>
  T* values(int slot, int layer, int h) { return head<T>(slots_.at(slot), false, layer, h); }

 private:
  struct Slot {
    int capacity = 0;
    std::vector<std::vector<unsigned char>> k, v;  // per layer: float or uint16_t elements
  };
  template <class T>
  T* head(Slot& s, bool keys, int layer, int h) {
    return reinterpret_cast<T*>((keys ? s.k : s.v)[layer].data()) + size_t(h) * s.capacity * head_dim_;
  }
  int layers_, kv_heads_, head_dim_;
  KvType type_;
  size_t element_bytes_;
  std::unordered_map<int, Slot> slots_;
};

// stb.row-col-sign.v1 in the CPU backend's own terms, per scale group: the group's main plane as a sign-block
// matrix (its lookup layout where the kernel path has one) and its salient plane as one int8 sign per (row, salient
// column). With two groups each group's keep-mask is the file's mask restricted to the group's weights.
struct RowColGroup {
  std::unique_ptr<cpu::SignLut> lut;  // null on paths without the lookup kernel (they read the planes)
  std::vector<uint64_t> own_mask;     // two groups: the group's keep-mask, [rows, words_per_row]
  const uint64_t* mask = nullptr;     // the keep-mask the kernels read: own_mask, the file's mask, or null (dense)
  const uint16_t* row_scales = nullptr;    // a_r, fp16 [rows, blocks] in the file
  std::vector<float> col_scales;           // a_c [cols]
  std::vector<float> salient_scales;       // b_c [S]
  std::vector<int8_t> salient_signs;       // [rows, S]: +1 / -1, 0 for a pruned weight or one of the other group
  std::vector<float> residual_row_scales;  // b_r [rows, blocks]
  uint64_t bytes() const {
    return (lut ? lut->bytes() : 8 * own_mask.size()) +
           4 * (col_scales.size() + salient_scales.size() + residual_row_scales.size()) + salient_signs.size();
  }
};
struct RowColPacked {
  std::vector<int32_t> salient_cols;  // the salient columns, ascending
  std::vector<RowColGroup> groups;    // one, or two with a group plane
  bool lut() const { return bool(groups[0].lut); }
  uint64_t bytes() const {
    uint64_t total = 4 * salient_cols.size();
    for (const auto& g : groups) total += g.bytes();
    return total;
  }
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
    std::unique_ptr<BinaryGroupsPlanes> planes;  // decoded stb.binary-groups.v2 streams, until repacked
    auto codes = std::make_unique<std::vector<uint8_t>>();  // decoded rANS-coded stb.qgroup.v1 codes, likewise
    m.name = w.name;
    m.rows = w.shape.at(0);
    m.cols = w.shape.at(1);
    if (w.codec == kCodecF32 || w.codec == kCodecF16) {
      m.codec = w.codec == kCodecF32 ? MatrixCodec::F32 : MatrixCodec::F16;
      m.values = w.component("data").data;
    } else if (w.codec == kCodecSignBlock) {
      sign_planes(w, MatrixCodec::SignBlock, "scales", m);
    } else if (w.codec == kCodecInt8Group) {
      m.codec = MatrixCodec::Int8Group;
      m.groups_per_row = int(cpu::q8_groups(m.cols));
      m.values = w.component("values").data;
      m.scales = reinterpret_cast<const uint16_t*>(w.component("scales").data);
    } else if (w.codec == kCodecQGroup) {
      m.codec = MatrixCodec::QGroup;
      m.bits = w.bits;
      m.block = w.group;
      m.blocks_per_row = int((m.cols + w.group - 1) / w.group);
      m.values = w.qgroup_codes(*codes);
      m.scales = w.qgroup_scales();
      m.offsets = w.qgroup_offsets();
    } else if (w.codec == kCodecBinaryGroups) {
      planes = std::make_unique<BinaryGroupsPlanes>(decode_binary_groups(w));
      cpu::describe_binary_groups(w, *planes, m);
    } else if (w.codec == kCodecRowColSign) {
      sign_planes(w, MatrixCodec::RowColSign, "row_scales", m);
      m.col_scales = reinterpret_cast<const uint16_t*>(w.component("col_scales").data);
      m.salient_columns = w.salient_columns;
      if (w.salient_columns) {
        m.salient = reinterpret_cast<const uint64_t*>(w.component("salient").data);
        m.residual = reinterpret_cast<const uint64_t*>(w.component("residual").data);
        m.residual_row_scales = reinterpret_cast<const uint16_t*>(w.component("residual_row_scales").data);
        m.residual_col_scales = reinterpret_cast<const uint16_t*>(w.component("residual_col_scales").data);
      }
      if (w.scale_groups == 2) {
        const auto half = [&](const char* key) { return reinterpret_cast<const uint16_t*>(w.component(key).data); };
        m.scale_groups = 2;
        m.group = reinterpret_cast<const uint64_t*>(w.component("group").data);
        m.group1_row_scales = half("group1_row_scales");
        m.group1_col_scales = half("group1_col_scales");
        if (w.salient_columns) {
          m.group1_residual_row_scales = half("group1_residual_row_scales");
          m.group1_residual_col_scales = half("group1_residual_col_scales");
        }
      }
    } else {
      throw FormatError("tensor '" + w.name + "' has codec " + w.codec +
                        "; a weight matrix needs stb.f32.v1, stb.f16.v1, stb.sign-block.v1, stb.int8-group.v1, "
                        "stb.binary-groups.v2, stb.row-col-sign.v1 or stb.qgroup.v1");
    }
    if (m.codec != MatrixCodec::BinaryGroups)  // those report their decoded planes
      for (const auto& kv : w.components) m.bytes += kv.second.length;
    if (w.codes_rans) {  // the kernels read the codes decoded, not the file's stream
      m.bytes += codes->size();
      m.bytes -= w.component("codes").length;
    }
    pack_matrix(m);
    const bool repacked = m.packed && (m.codec != MatrixCodec::RowColSign ||
                                       static_cast<const RowColPacked*>(m.packed)->lut());
    if (repacked) {  // the repacked form holds everything the kernels (and a k-bit table's lookups) read
      for (const auto& kv : w.components) release_pages(kv.second);
      if (m.codec == MatrixCodec::QGroup) m.values = nullptr;
    } else if (!codes->empty()) {
      decoded_codes_.push_back(std::move(codes));  // the portable kernel and lookups read them
    }
    if (planes) {
      if (m.packed)
        m.signs = m.mask = m.labels = m.salient = m.residual = nullptr;  // the repacked codes replace the planes
      else
        group_planes_.push_back(std::move(planes));  // the portable kernel reads them
    }
    if (bias) {
      m.bias = upload_vector(*bias);
      m.bytes += bias->components.at("data").length;
    }
    return m;
  }

  // Sign-block, int8-group, qgroup and binary-groups weights are repacked for the SIMD kernels where the kernel path
  // has them; the original planes are not read by matmuls afterwards (an int8 embedding lookup still reads its rows
  // from the mapping), so the bytes the model holds are the repacked ones.
  void pack_matrix(Matrix& m) override {
    if (m.codec == MatrixCodec::SignBlock && k_.sign_lut) {
      luts_.push_back(std::make_unique<cpu::SignLut>(
          cpu::build_sign_lut(m.signs, m.mask, m.scales, m.rows, m.cols, m.block)));
      m.packed = luts_.back().get();
      m.bytes = luts_.back()->bytes();
    } else if (m.codec == MatrixCodec::RowColSign) {
      rowcols_.push_back(pack_row_col(m));
      m.packed = rowcols_.back().get();
      m.bytes = rowcols_.back()->bytes() + (rowcols_.back()->lut() ? 0 : m.bytes);
    } else if (m.codec == MatrixCodec::Int8Group && k_.int8_tiles) {
      int8_tiles_.push_back(std::make_unique<cpu::Int8Tiles>(
          cpu::build_int8_tiles(static_cast<const int8_t*>(m.values), m.scales, m.rows, m.cols)));
      m.packed = int8_tiles_.back().get();
      m.bytes = int8_tiles_.back()->bytes();
    } else if (m.codec == MatrixCodec::QGroup && k_.qgroup_tiles) {
      qgroup_tiles_.push_back(std::make_unique<cpu::QGroupTiles>(cpu::build_qgroup_tiles(m)));
      m.packed = qgroup_tiles_.back().get();
      m.bytes = qgroup_tiles_.back()->bytes();
    } else if (m.codec == MatrixCodec::BinaryGroups && k_.groups) {
      groups_.push_back(std::make_unique<cpu::BinaryGroupsCodes>(cpu::build_binary_groups_codes(m, k_.groups->salient_chunks)));
      m.packed = groups_.back().get();
      m.bytes = groups_.back()->bytes();
    }
  }

  // The sign plane (and keep-mask) with its per-(row, block) scales: stb.sign-block.v1, and the main plane of
  // stb.row-col-sign.v1 (whose scales are its row scales).
  static void sign_planes(const TensorEntry& w, MatrixCodec codec, const char* scales, Matrix& m) {
    m.codec = codec;
    m.block = w.block;
    m.words_per_row = int((m.cols + 63) / 64);
    m.blocks_per_row = int((m.cols + w.block - 1) / w.block);
    m.signs = reinterpret_cast<const uint64_t*>(w.component("signs").data);
    m.scales = reinterpret_cast<const uint16_t*>(w.component(scales).data);
    if (w.nm_m) m.mask = reinterpret_cast<const uint64_t*>(w.component("mask").data);
  }

  std::unique_ptr<RowColPacked> pack_row_col(const Matrix& m) {
    auto p = std::make_unique<RowColPacked>();
    const int64_t s = m.salient_columns, residual_words = (s + 63) / 64, words = m.words_per_row;
    for (int64_t j = 0; j < m.cols && s; ++j)
      if ((m.salient[j / 64] >> (j % 64)) & 1) p->salient_cols.push_back(int32_t(j));
    const auto bit = [](const uint64_t* plane, int64_t word, int64_t j) { return (plane[word + j / 64] >> (j % 64)) & 1; };
    const uint16_t* row_scales[2] = {m.scales, m.group1_row_scales};
    const uint16_t* col_scales[2] = {m.col_scales, m.group1_col_scales};
    const uint16_t* residual_row_scales[2] = {m.residual_row_scales, m.group1_residual_row_scales};
    const uint16_t* residual_col_scales[2] = {m.residual_col_scales, m.group1_residual_col_scales};
    for (int g = 0; g < m.scale_groups; ++g) {
      RowColGroup& part = p->groups.emplace_back();
      part.mask = m.mask;
      if (m.group) {  // the group's weights: kept, with the group bit clear (g = 0) or set (g = 1)
        const uint64_t tail = m.cols % 64 ? ~(~0ull << (m.cols % 64)) : ~0ull;
        part.own_mask.resize(size_t(m.rows * words));
        for (int64_t i = 0; i < m.rows * words; ++i)
          part.own_mask[i] = (m.mask ? m.mask[i] : ~0ull) & (g ? m.group[i] : ~m.group[i]) &
                             (i % words == words - 1 ? tail : ~0ull);
        part.mask = part.own_mask.data();
      }
      part.row_scales = row_scales[g];
      if (k_.sign_lut) part.lut = std::make_unique<cpu::SignLut>(
          cpu::build_sign_lut(m.signs, part.mask, part.row_scales, m.rows, m.cols, m.block));
      part.col_scales.resize(size_t(m.cols));
      for (int64_t j = 0; j < m.cols; ++j) part.col_scales[j] = cpu::half_to_float(col_scales[g][j]);
      if (!s) continue;
      part.salient_scales.resize(size_t(s));
      part.salient_signs.resize(size_t(m.rows * s));
      part.residual_row_scales.resize(size_t(m.rows * m.blocks_per_row));
      for (int64_t k = 0; k < s; ++k) part.salient_scales[k] = cpu::half_to_float(residual_col_scales[g][k]);
      for (size_t i = 0; i < part.residual_row_scales.size(); ++i)
        part.residual_row_scales[i] = cpu::half_to_float(residual_row_scales[g][i]);
      for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t k = 0; k < s; ++k) {
          const int64_t j = p->salient_cols[k];
          const bool member = !part.mask || bit(part.mask, r * words, j);
          const bool plus = bit(m.residual, r * residual_words, k);
          part.salient_signs[r * s + k] = int8_t(member ? (plus ? 1 : -1) : 0);
        }
    }
    return p;
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

  std::unique_ptr<KvCache> new_kv_cache(int layers, int kv_heads, int head_dim, KvType type) override {
    return std::make_unique<CpuKvCache>(layers, kv_heads, head_dim, type);
  }

  void to_host(const float* src, float* dst, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }

  void embed(const Matrix& table, const int* ids, int n, float* out, bool accumulate) override {
    const int64_t dim = table.cols;
    std::vector<float> row(dim);
    std::vector<uint8_t> codes;
    for (int i = 0; i < n; ++i) {
      float* dst = out + i * dim;
      if (table.codec == MatrixCodec::F32) {
        std::memcpy(row.data(), static_cast<const float*>(table.values) + ids[i] * dim, dim * sizeof(float));
      } else if (table.codec == MatrixCodec::F16) {
        k_.f16_to_f32(static_cast<const uint16_t*>(table.values) + ids[i] * dim, row.data(), dim);
      } else if (table.codec == MatrixCodec::QGroup) {
        const int64_t id = ids[i];
        const uint16_t *scales = table.scales + id * table.blocks_per_row,
                       *offsets = table.offsets + id * table.blocks_per_row;
        if (table.packed) {  // a tied head's tiles: the file's codes are released
          codes.resize(size_t(qgroup_chunks(dim) * kQGroupChunk));
          cpu::qgroup_tile_row_codes(*static_cast<const cpu::QGroupTiles*>(table.packed), id, codes.data());
          qgroup_dequantize_codes(codes.data(), scales, offsets, table.block, dim, row.data());
        } else {
          qgroup_dequantize_row(static_cast<const uint8_t*>(table.values) + id * qgroup_row_bytes(dim, table.bits),
                                scales, offsets, table.bits, table.block, dim, row.data());
        }
      } else {  // Int8Group (the model refuses binary embedding tables)
        const int8_t* q = static_cast<const int8_t*>(table.values) + int64_t(ids[i]) * table.groups_per_row * 64;
        const uint16_t* s = table.scales + int64_t(ids[i]) * table.groups_per_row;
        for (int64_t j = 0; j < dim; ++j) row[j] = float(q[j]) * cpu::half_to_float(s[j / 64]);
      }
      for (int64_t j = 0; j < dim; ++j) dst[j] = accumulate ? dst[j] + row[j] : row[j];
    }
  }

  void linear(const Matrix& w, const float* x, int n, float* out) override {
    if (w.codec == MatrixCodec::QGroup && w.packed) {
      const Matrix* one = &w;
      return linear_qgroup_tiles(&one, 1, x, n, &out);
    }
    if (w.codec == MatrixCodec::SignBlock || w.codec == MatrixCodec::Int8Group || w.codec == MatrixCodec::QGroup)
      return linear_q8(w, x, n, out, w.codec == MatrixCodec::SignBlock ? static_cast<const cpu::SignLut*>(w.packed)
                                                                        : nullptr);
    if (w.codec == MatrixCodec::RowColSign) return linear_row_col(w, x, n, out);
    if (w.codec == MatrixCodec::BinaryGroups && w.packed) return linear_groups(w, x, n, out);
    const int64_t rows = w.rows, cols = w.cols;
    pool_.run(n_chunks(rows), [&](int64_t c) {
      const int64_t r0 = c * chunk_rows(rows), r1 = std::min(rows, r0 + chunk_rows(rows));
      if (w.codec == MatrixCodec::F16) {  // each weight row once for all input rows
        for (int64_t r = r0; r < r1; ++r)
          k_.dot_f16_rows(static_cast<const uint16_t*>(w.values) + r * cols, x, n, cols, out + r, rows);
        add_bias(w, n, r0, r1, out);
        return;
      }
      for (int t = 0; t < n; ++t) {
        const float* xt = x + t * cols;
        float* yt = out + t * rows;
        for (int64_t r = r0; r < r1; ++r) {
          float y;
          switch (w.codec) {
            case MatrixCodec::F32: y = k_.dot_f32(static_cast<const float*>(w.values) + r * cols, xt, cols); break;
            default: y = cpu::dot_binary_groups(w, r, xt);  // BinaryGroups on a path without its SIMD kernel
          }
          yt[r] = w.bias ? y + w.bias[r] : y;
        }
      }
    });
  }

  // Matrices sharing an input: k-bit group tiles (the default file's q/k/v and gate/up) together, other codecs one
  // by one.
  void linears(const Matrix* const* ws, int count, const float* x, int n, float* const* outs) override {
    bool tiled = count > 0;
    for (int i = 0; i < count; ++i)
      tiled = tiled && ws[i]->codec == MatrixCodec::QGroup && ws[i]->packed && ws[i]->cols == ws[0]->cols;
    if (!tiled) return Backend::linears(ws, count, x, n, outs);
    linear_qgroup_tiles(ws, count, x, n, outs);
  }

  // k-bit group matrices in 16-row tiles on one input: the input quantized once, its group sums per matrix, and all
  // the matrices' tiles in one parallel loop (three small loops left threads idle at their ends: k and v are 12
  // tiles each).
  void linear_qgroup_tiles(const Matrix* const* ws, int count, const float* x, int n, float* const* outs) {
    quantize_activations(x, n, ws[0]->cols);
    std::vector<int64_t> first_tile(count + 1, 0), first_sum(count + 1, 0);
    for (int i = 0; i < count; ++i) {
      first_tile[i + 1] = first_tile[i] + static_cast<const cpu::QGroupTiles*>(ws[i]->packed)->tiles;
      first_sum[i + 1] = first_sum[i] + int64_t(n) * ws[i]->blocks_per_row;
    }
    qgroup_sums_.resize(size_t(first_sum[count]));
    for (int i = 0; i < count; ++i)
      cpu::qgroup_activation_sums(q8_values_.data(), q8_scales_.data(), ws[0]->cols, ws[i]->block, n,
                                  qgroup_sums_.data() + first_sum[i]);
    over_tiles(first_tile[count], [&](int64_t t0, int64_t t1) {
      for (int i = 0; i < count; ++i) {  // the part of [t0, t1) in matrix i
        const int64_t a = std::max(t0, first_tile[i]) - first_tile[i];
        const int64_t b = std::min(t1, first_tile[i + 1]) - first_tile[i];
        if (a >= b) continue;
        const Matrix& w = *ws[i];
        k_.qgroup_tiles->rows(*static_cast<const cpu::QGroupTiles*>(w.packed), a, b, q8_values_.data(),
                              q8_scales_.data(), qgroup_sums_.data() + first_sum[i], n, outs[i], w.rows);
        add_bias(w, n, a * cpu::kQGroupTileRows, b * cpu::kQGroupTileRows, outs[i]);
      }
    });
  }

  // The n input rows quantized to int8 per group of 64 into q8_values_ / q8_scales_ (engine/cpu/kernels.h).
  void quantize_activations(const float* x, int n, int64_t cols) {
    const int64_t groups = cpu::q8_groups(cols), padded = groups * cpu::kQ8Group;
    q8_values_.resize(size_t(n) * padded);
    q8_scales_.resize(size_t(n) * groups);
    pool_.run(n, [&](int64_t t) {
      k_.quantize_q8(x + t * cols, cols, q8_values_.data() + t * padded, q8_scales_.data() + t * groups);
    });
  }

  // Binary and int8 weights against int8 activations (engine/cpu/kernels.h): quantize the n input rows once,
  // then each task runs its chunk of weight rows against all of them.
  // stb.row-col-sign.v1: per scale group Y += ((X ⊙ a_c) · (a_r ⊙ B1)ᵀ) on the sign-block kernels over the group's
  // weights, plus the salient plane Σ_k b_r[r, block of column k] · B2[r, k] · (b_c[k] · x[column k]) in float.
  // A second group costs a second pass of the sign kernels (and of the activation quantization).
  void linear_row_col(const Matrix& w, const float* x, int n, float* out) {
    const auto& p = *static_cast<const RowColPacked*>(w.packed);
    const int64_t rows = w.rows, cols = w.cols, s = w.salient_columns, groups = int64_t(p.groups.size());
    for (int64_t g = 0; g < groups; ++g) {
      const RowColGroup& part = p.groups[g];
      row_col_x_.resize(size_t(n) * cols);
      for (int t = 0; t < n; ++t)
        for (int64_t j = 0; j < cols; ++j) row_col_x_[t * cols + j] = x[t * cols + j] * part.col_scales[j];
      Matrix view = w;  // the group's plane: the file's signs under the group's keep-mask and row scales
      view.mask = part.mask;
      view.scales = part.row_scales;
      if (g == 0) {
        linear_q8(view, row_col_x_.data(), n, out, part.lut.get());
        continue;
      }
      view.bias = nullptr;  // added once, with the first group
      row_col_y_.resize(size_t(n) * rows);
      linear_q8(view, row_col_x_.data(), n, row_col_y_.data(), part.lut.get());
      for (int64_t i = 0; i < n * rows; ++i) out[i] += row_col_y_[i];
    }
    if (!s) return;
    row_col_x_.resize(size_t(groups * n * s));  // the salient inputs, scaled by each group's b_c
    for (int64_t g = 0; g < groups; ++g)
      for (int t = 0; t < n; ++t)
        for (int64_t k = 0; k < s; ++k)
          row_col_x_[(g * n + t) * s + k] = x[t * cols + p.salient_cols[k]] * p.groups[g].salient_scales[k];
    pool_.run(n_chunks(rows), [&](int64_t c) {
      const int64_t r0 = c * chunk_rows(rows), r1 = std::min(rows, r0 + chunk_rows(rows));
      for (int t = 0; t < n; ++t)
        for (int64_t r = r0; r < r1; ++r) {
          float acc = 0;
          for (int64_t g = 0; g < groups; ++g) {
            const RowColGroup& part = p.groups[g];
            const int8_t* signs = part.salient_signs.data() + r * s;
            const float* xs = row_col_x_.data() + (g * n + t) * s;
            for (int64_t k = 0; k < s;) {  // one block's salient columns at a time, then its row scale
              const int64_t block = p.salient_cols[k] / w.block;
              float sum = 0;
              for (; k < s && p.salient_cols[k] / w.block == block; ++k) sum += float(signs[k]) * xs[k];
              acc += part.residual_row_scales[r * w.blocks_per_row + block] * sum;
            }
          }
          out[t * rows + r] += acc;
        }
    });
  }

  void linear_q8(const Matrix& w, const float* x, int n, float* out, const cpu::SignLut* lut) {
    const int64_t rows = w.rows, cols = w.cols, groups = cpu::q8_groups(cols), padded = groups * cpu::kQ8Group;
    quantize_activations(x, n, cols);
    if (w.codec == MatrixCodec::Int8Group && w.packed) return linear_int8_tiles(w, n, out);
    if (lut) {
      if (k_.sign_lut->use_gemm(n, w.rows)) return linear_sign_gemm(w, *lut, n, out);
      return linear_sign_lut(w, *lut, n, out);
    }
    if (w.codec == MatrixCodec::QGroup) {
      qgroup_sums_.resize(size_t(n) * w.blocks_per_row);
      cpu::qgroup_activation_sums(q8_values_.data(), q8_scales_.data(), cols, w.block, n, qgroup_sums_.data());
    }
    pool_.run(n_chunks(rows), [&](int64_t c) {
      thread_local std::vector<int8_t> scratch;
      scratch.resize(padded);
      const int64_t r0 = c * chunk_rows(rows), r1 = std::min(rows, r0 + chunk_rows(rows));
      for (int64_t r = r0; r < r1; ++r) {
        if (w.codec == MatrixCodec::SignBlock || w.codec == MatrixCodec::RowColSign) {  // also row-col-sign's main plane
          k_.sign_row_q8(w.signs + r * w.words_per_row, w.mask ? w.mask + r * w.words_per_row : nullptr,
                         w.scales + r * w.blocks_per_row, w.block, cols, q8_values_.data(), q8_scales_.data(), n,
                         out + r, rows, scratch.data());
        } else if (w.codec == MatrixCodec::QGroup) {
          k_.qgroup_row_q8(static_cast<const uint8_t*>(w.values) + r * qgroup_row_bytes(cols, w.bits),
                           w.scales + r * w.blocks_per_row, w.offsets + r * w.blocks_per_row, w.bits, w.block, cols,
                           q8_values_.data(), q8_scales_.data(), qgroup_sums_.data(), n, out + r, rows,
                           reinterpret_cast<uint8_t*>(scratch.data()));
        } else {
          k_.int8_row_q8(static_cast<const int8_t*>(w.values) + r * padded, w.scales + r * groups, cols,
                         q8_values_.data(), q8_scales_.data(), n, out + r, rows);
        }
        if (w.bias)
          for (int t = 0; t < n; ++t) out[t * rows + r] += w.bias[r];
      }
    });
  }

  // Binary-groups weights as codes (kernels_groups.h) against float activations in the kernels' step-major order
  // (a single activation row already is, when it needs no padding and no salient chunks).
  void linear_groups(const Matrix& w, const float* x, int n, float* out) {
    const auto& g = *static_cast<const cpu::BinaryGroupsCodes*>(w.packed);
    const int64_t rows = w.rows;
    if (g.activation_floats(n) != w.cols) {
      groups_x_.resize(size_t(g.activation_floats(n)));
      cpu::groups_activations(g, x, n, groups_x_.data());
      x = groups_x_.data();
    }
    pool_.run(n_chunks(rows), [&](int64_t c) {
      const int64_t r0 = c * chunk_rows(rows), r1 = std::min(rows, r0 + chunk_rows(rows));
      k_.groups->rows(g, r0, r1, x, n, out, rows);
      if (w.bias)
        for (int t = 0; t < n; ++t)
          for (int64_t r = r0; r < r1; ++r) out[t * rows + r] += w.bias[r];
    });
  }

  // Σq per activation row and group, for kernels that offset the weights to unsigned bytes (kernels.h).
  void q8_group_sums(int n, int64_t groups) {
    q8_sums_.resize(size_t(n) * groups);
    for (int64_t i = 0; i < n * groups; ++i) {
      int32_t sum = 0;
      for (int j = 0; j < cpu::kQ8Group; ++j) sum += q8_values_[size_t(i * cpu::kQ8Group + j)];
      q8_sums_[size_t(i)] = sum;
    }
  }

  // Runs kernel(tile0, tile1) over [0, tiles) in about 4 tasks per thread.
  template <class Kernel>
  void over_tiles(int64_t tiles, Kernel kernel) {
    const int64_t per_task = std::max<int64_t>(1, (tiles + 4 * threads() - 1) / (4 * threads()));
    pool_.run((tiles + per_task - 1) / per_task, [&](int64_t c) {
      const int64_t t0 = c * per_task;
      kernel(t0, std::min(tiles, t0 + per_task));
    });
  }

  void add_bias(const Matrix& w, int n, int64_t r0, int64_t r1, float* out) {
    if (!w.bias) return;
    for (int t = 0; t < n; ++t)
      for (int64_t r = r0; r < std::min(w.rows, r1); ++r) out[t * w.rows + r] += w.bias[r];
  }

  // Int8-group weights in 16-row tiles against the quantized activations: one pass for all n rows.
  void linear_int8_tiles(const Matrix& w, int n, float* out) {
    const auto& tiles = *static_cast<const cpu::Int8Tiles*>(w.packed);
    q8_group_sums(n, tiles.groups);
    over_tiles(tiles.tiles, [&](int64_t t0, int64_t t1) {
      k_.int8_tiles->rows(tiles, t0, t1, q8_values_.data(), q8_scales_.data(), q8_sums_.data(), n, out, w.rows);
      add_bias(w, n, t0 * cpu::kInt8TileRows, t1 * cpu::kInt8TileRows, out);
    });
  }

  // Sign-block weights in the lookup layout through the batched kernel (no tables), where it beats the lookups.
  void linear_sign_gemm(const Matrix& w, const cpu::SignLut& lut, int n, float* out) {
    q8_group_sums(n, cpu::q8_groups(w.cols));
    over_tiles(lut.tiles, [&](int64_t t0, int64_t t1) {
      k_.sign_lut->gemm(lut, t0, t1, q8_values_.data(), q8_scales_.data(), q8_sums_.data(), n, out, w.rows);
      add_bias(w, n, t0 * cpu::kLutTileRows, t1 * cpu::kLutTileRows, out);
    });
  }

  // Sign-block weights in the lookup layout, activations already quantized into q8_values_ / q8_scales_.
  void linear_sign_lut(const Matrix& w, const cpu::SignLut& lut, int n, float* out) {
    const int64_t rows = w.rows, groups = cpu::q8_groups(w.cols), table_bytes = cpu::sign_lut_table_bytes(w.cols);
    lut_tables_.resize(size_t(n) * table_bytes);
    pool_.run(n, [&](int64_t t) {
      k_.sign_lut->tables(q8_values_.data() + t * groups * cpu::kQ8Group, w.cols, lut.masked,
                          lut_tables_.data() + t * table_bytes);
    });
    over_tiles(lut.tiles, [&](int64_t t0, int64_t t1) {
      for (int t = 0; t < n; ++t)
        k_.sign_lut->rows(lut, t0, t1, lut_tables_.data() + t * table_bytes, q8_scales_.data() + t * groups,
                          out + t * rows);
      add_bias(w, n, t0 * cpu::kLutTileRows, t1 * cpu::kLutTileRows, out);
    });
  }

  void norm(const float* x, int n, int dim, const float* weight, const float* bias, float eps, bool rms,
            float* out) override {
    // Sums in double over 8 interleaved partial sums: one serial chain of 576 double adds took ~0.7 µs a row.
    auto sum = [dim](auto term) {
      double part[8] = {};
      int j = 0;
      for (; j + 8 <= dim; j += 8)
        for (int k = 0; k < 8; ++k) part[k] += term(j + k);
      for (; j < dim; ++j) part[0] += term(j);
      return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    };
    for (int i = 0; i < n; ++i) {
      const float* xi = x + size_t(i) * dim;
      float* yi = out + size_t(i) * dim;
      const double mean = rms ? 0.0 : sum([xi](int j) { return double(xi[j]); }) / dim;
      const double sq = sum([xi, mean](int j) { return (xi[j] - mean) * (xi[j] - mean); });
      const float inv = float(1.0 / std::sqrt(sq / dim + eps)), m = float(mean);
      for (int j = 0; j < dim; ++j) yi[j] = (xi[j] - m) * inv * weight[j] + (bias ? bias[j] : 0.f);
    }
  }

  void rope(float* x, int n, int heads, int head_dim, const RowInfo* rows, float theta) override {
    const int half = head_dim / 2;
    for (int r = 0; r < n; ++r) {
      const float* cs = rope_table(rows[r].pos, head_dim, theta);  // cos then sin of the row's angles
      for (int h = 0; h < heads; ++h) {
        float* v = x + (size_t(r) * heads + h) * head_dim;
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cs[i] - b * cs[half + i];
          v[i + half] = b * cs[i] + a * cs[half + i];
        }
      }
    }
  }

  void attention(KvCache& cache_base, int layer, const float* q, const float* k, const float* v, int n,
                 const RowInfo* rows, const AttentionShape& shape, float* out) override {
    auto& cache = static_cast<CpuKvCache&>(cache_base);
    if (cache.type() == KvType::F16) return attention_as<uint16_t>(cache, layer, q, k, v, n, rows, shape, out);
    attention_as<float>(cache, layer, q, k, v, n, rows, shape, out);
  }

  // Split over the pool only in chunks of ~50 µs of work or more: smaller ones cost more in waking and waiting for
  // the workers than they save (measured: docs/performance.md, batched decode).
  void activation(const float* gate, float* up, size_t n, bool silu) override {
    constexpr size_t kChunk = 65536;  // SIMD SiLU: ~0.3-0.6 ns a value
    pool_.run(int64_t((n + kChunk - 1) / kChunk), [&](int64_t c) {
      const size_t begin = size_t(c) * kChunk, end = std::min(n, begin + kChunk);
      if (silu) {
        k_.silu_gate(gate ? gate + begin : nullptr, up + begin, int64_t(end - begin));
        return;
      }
      for (size_t i = begin; i < end; ++i) up[i] = gate ? std::max(gate[i], 0.0f) * up[i] : std::max(up[i], 0.0f);
    });
  }

  void add(float* x, const float* y, size_t n) override {
    for (size_t i = 0; i < n; ++i) x[i] += y[i];
  }

 private:
  // Stores the rows' keys and values (converted to the cache's element type T), then attends.
  template <class T>
  void attention_as(CpuKvCache& cache, int layer, const float* q, const float* k, const float* v, int n,
                    const RowInfo* rows, const AttentionShape& shape, float* out) {
    const int hd = shape.head_dim, kv_width = shape.kv_heads * hd, group = shape.heads / shape.kv_heads;
    auto store = [&](const float* src, T* dst) {
      if constexpr (std::is_same_v<T, float>) std::memcpy(dst, src, hd * sizeof(float));
      else k_.f32_to_f16(src, dst, hd);
    };
    for (int r = 0; r < n; ++r)
      for (int h = 0; h < shape.kv_heads; ++h) {
        const size_t at = size_t(r) * kv_width + h * hd, pos = size_t(rows[r].pos) * hd;
        store(k + at, cache.keys<T>(rows[r].slot, layer, h) + pos);
        store(v + at, cache.values<T>(rows[r].slot, layer, h) + pos);
      }
    const float scale = 1.0f / std::sqrt(float(hd));
    // A task attends the query heads of one row that share a KV head (reading its keys and values once), or single
    // heads when that leaves fewer than ~4 tasks per thread (batch 1).
    const int per_task = int64_t(n) * shape.kv_heads >= 4 * threads() ? group : 1;
    const int tasks_per_row = shape.heads / per_task;
    pool_.run(int64_t(n) * tasks_per_row, [&](int64_t task) {
      const int r = int(task / tasks_per_row), h = int(task % tasks_per_row) * per_task, kvh = h / group;
      const int pos = rows[r].pos;
      const int first = shape.sliding_window > 0 ? std::max(0, pos - shape.sliding_window + 1) : 0;
      thread_local std::vector<float> scores;
      scores.resize(size_t(per_task) * (pos - first + 1));
      const T* keys = cache.keys<T>(rows[r].slot, layer, kvh);
      const T* values = cache.values<T>(rows[r].slot, layer, kvh);
      const float* qh = q + (size_t(r) * shape.heads + h) * hd;
      float* oh = out + (size_t(r) * shape.heads + h) * hd;
      if constexpr (std::is_same_v<T, float>)
        k_.attend(qh, per_task, keys, values, hd, first, pos, hd, scale, scores.data(), oh);
      else
        k_.attend_f16(qh, per_task, keys, values, hd, first, pos, hd, scale, scores.data(), oh);
    });
  }

  // cos and sin of the rotary angles pos · θ^(−2i / head_dim), i < head_dim / 2, as [cos × half, sin × half]:
  // computed once per position (in float32 like the reference implementation) instead of per layer, q and k.
  const float* rope_table(int pos, int head_dim, float theta) {
    const int half = head_dim / 2;
    if (head_dim != rope_head_dim_ || theta != rope_theta_) {
      rope_cs_.clear();
      rope_head_dim_ = head_dim;
      rope_theta_ = theta;
    }
    if (rope_cs_.size() <= size_t(pos) * head_dim) {
      std::vector<float> inv_freq(half);
      for (int i = 0; i < half; ++i) inv_freq[i] = 1.0f / std::pow(theta, float(2 * i) / float(head_dim));
      for (size_t p = rope_cs_.size() / head_dim; p <= size_t(pos); ++p) {
        const size_t at = rope_cs_.size();
        rope_cs_.resize(at + head_dim);
        for (int i = 0; i < half; ++i) {
          const float angle = float(p) * inv_freq[i];
          rope_cs_[at + i] = std::cos(angle);
          rope_cs_[at + half + i] = std::sin(angle);
        }
      }
    }
    return rope_cs_.data() + size_t(pos) * head_dim;
  }

  // Output rows per task: small enough to balance the threads, large enough that a chunk's weights stay in cache
  // while every input row passes over them.
  int64_t chunk_rows(int64_t rows) const { return std::max<int64_t>(8, (rows + 4 * threads() - 1) / (4 * threads())); }
  int64_t n_chunks(int64_t rows) const { return (rows + chunk_rows(rows) - 1) / chunk_rows(rows); }

  cpu::ThreadPool pool_;
  const cpu::Kernels& k_;
  std::vector<int8_t> q8_values_;  // quantized activations of the current sign-block / int8-group matmul
  std::vector<float> q8_scales_;
  std::vector<int32_t> q8_sums_;                     // their Σq per group (batched and int8-tile kernels)
  std::vector<float> qgroup_sums_;                   // their sums per weight group (stb.qgroup.v1)
  std::vector<uint8_t> lut_tables_;                  // lookup tables of those activations
  std::vector<std::unique_ptr<cpu::SignLut>> luts_;  // repacked sign-block weights, owned for the model's life
  std::vector<std::unique_ptr<BinaryGroupsPlanes>> group_planes_;  // decoded binary-groups planes (portable path)
  std::vector<std::unique_ptr<std::vector<uint8_t>>> decoded_codes_;  // decoded rANS qgroup codes (portable path)
  std::vector<float> groups_x_;                      // activations in the binary-groups kernels' order
  std::vector<std::unique_ptr<cpu::BinaryGroupsCodes>> groups_;  // repacked binary-groups weights, likewise
  std::vector<std::unique_ptr<RowColPacked>> rowcols_;            // row-col-sign weights, likewise
  std::vector<float> row_col_x_;                                  // a row-col-sign matmul's scaled inputs
  std::vector<float> row_col_y_;                                  // its second scale group's outputs
  std::vector<std::unique_ptr<cpu::Int8Tiles>> int8_tiles_;      // repacked int8-group weights, likewise
  std::vector<std::unique_ptr<cpu::QGroupTiles>> qgroup_tiles_;  // repacked k-bit group weights, likewise
  std::vector<float> rope_cs_;                                   // rope_table's rows, by position
  int rope_head_dim_ = 0;
  float rope_theta_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace stb
