// The backend interface: every compute operation the model graphs need. The graphs (engine/model/model.cpp) are
// written once against it; the CPU backend (engine/cpu) implements it, a CUDA backend will too.
//
// Activations are row-major float32 matrices [rows, width] in backend memory (host memory for the CPU backend).
// A "row" is one token of one sequence; a batch mixes rows of several sequences, each with its own position.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "stbllm/format.h"

namespace stb {

enum class MatrixCodec { F32, F16, SignBlock, Int8Group, BinaryGroups, RowColSign, QGroup };

// A weight matrix [rows = outputs, cols = inputs] with an optional bias, resident in backend memory.
// For the CPU backend the pointers alias the read-only file mapping (zero copy).
struct Matrix {
  std::string name;
  MatrixCodec codec = MatrixCodec::F32;
  int64_t rows = 0, cols = 0;
  const void* values = nullptr;      // F32: float[rows*cols]; F16: uint16 halves[rows*cols];
                                     // Int8Group: int8 [rows, groups_per_row * 64] (zero padded)
                                     // QGroup: the file's codes, qgroup_row_bytes(cols, bits) bytes per row
  const uint64_t* signs = nullptr;   // SignBlock: [rows, words_per_row], set bit = +1
  const uint64_t* mask = nullptr;    // SignBlock: optional keep-mask, same layout; null = dense
  const uint16_t* scales = nullptr;  // SignBlock, QGroup: fp16 [rows, blocks_per_row]; Int8Group: fp16 [rows, groups]
  const uint16_t* offsets = nullptr; // QGroup: fp16 [rows, blocks_per_row]
  int bits = 0;                      // QGroup: code width; its `block` is the codec's group
  int block = 0, words_per_row = 0, blocks_per_row = 0;
  int groups_per_row = 0;            // Int8Group: ceil(cols / 64)
  // BinaryGroups (stb.binary-groups.v2, decoded at load) also uses signs, mask, block, words_per_row, blocks_per_row:
  const uint64_t* labels = nullptr;    // label_planes planes of [rows, words_per_row]; null when 1 region
  const uint64_t* salient = nullptr;   // [words_per_row] salient-column bitmap, shared by all rows
  const uint64_t* residual = nullptr;  // rows x salient_columns order-2 sign bits, row-major; null when none
  const uint64_t* salient_labels = nullptr;  // like residual: set = second salient group; null with one group
  const uint16_t* params = nullptr;    // fp16 [rows, blocks_per_row, params_per_block = 2 regions + 4 salient_groups]
  int regions = 0, label_planes = 0, params_per_block = 0, salient_groups = 1;
  int64_t salient_columns = 0;
  // RowColSign (stb.row-col-sign.v1): signs, mask, scales (= the row scales), block as SignBlock, plus
  const uint16_t* col_scales = nullptr;           // fp16 [cols]
  // and with salient_columns > 0 the salient bitmap (salient), residual = [rows, ceil(S / 64)] sign words and
  const uint16_t* residual_row_scales = nullptr;  // fp16 [rows, blocks_per_row]
  const uint16_t* residual_col_scales = nullptr;  // fp16 [salient_columns]
  // and with scale_groups = 2 the group plane (signs' layout, set: the weight takes the second scale set) and the
  // second set of the four scale arrays above, in their shapes
  int scale_groups = 1;
  const uint64_t* group = nullptr;
  const uint16_t *group1_row_scales = nullptr, *group1_col_scales = nullptr;
  const uint16_t *group1_residual_row_scales = nullptr, *group1_residual_col_scales = nullptr;
  const float* bias = nullptr;       // [rows] or null
  const void* packed = nullptr;      // backend-private repacked form of the weights (CPU: sign_lut.h), or null
  uint64_t bytes = 0;                // weight + bias bytes held for this matrix
};

// Where each row of a batch lives: which sequence (KV cache slot) and at which position.
struct RowInfo {
  int slot;
  int pos;
};

struct AttentionShape {
  int heads, kv_heads, head_dim;
  int sliding_window;  // 0 = unlimited; else a row at position p sees positions > p - sliding_window
};

// How a KV cache stores keys and values: float16 halves the memory and the bytes attention reads per position (the
// default); float32 keeps them exact (the oracle tests, perplexity evaluation).
enum class KvType { F16, F32 };

// Per-sequence keys and values for every layer. Backends own the storage.
class KvCache {
 public:
  virtual ~KvCache() = default;
  // Makes room for positions [0, n_positions) of `slot` (creating the slot when new).
  virtual void reserve(int slot, int n_positions) = 0;
  virtual void release(int slot) = 0;
  virtual uint64_t bytes_per_token() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;     // "cpu"
  virtual std::string kernels() const = 0;  // which SIMD path runs, e.g. "avx2"
  virtual int threads() const = 0;

  // Weights. `bias` may be null. The entry's file must outlive the backend's use of the matrix.
  virtual Matrix upload_matrix(const TensorEntry& weight, const TensorEntry* bias) = 0;
  virtual const float* upload_vector(const TensorEntry& t) = 0;  // f32 [n]
  // Builds the backend's private form of a matrix whose fields point at host data (upload_matrix does this; tests
  // and benchmarks call it for matrices they assemble themselves). Updates m.packed and m.bytes.
  virtual void pack_matrix(Matrix& m) = 0;

  virtual float* alloc(size_t n_floats) = 0;  // activation buffers, zero-filled
  virtual void release(float* buffer) = 0;
  virtual std::unique_ptr<KvCache> new_kv_cache(int layers, int kv_heads, int head_dim, KvType type) = 0;
  virtual void to_host(const float* src, float* dst, size_t n) = 0;

  // out[r, :] = table[ids[r], :]; accumulate adds instead of overwriting.
  virtual void embed(const Matrix& table, const int* ids, int n, float* out, bool accumulate) = 0;
  // out = x · Wᵀ (+ bias); x [n, cols], out [n, rows].
  virtual void linear(const Matrix& w, const float* x, int n, float* out) = 0;
  // outs[i] = x · ws[i]ᵀ for `count` matrices of the same input width reading one x (q/k/v, gate/up): a backend may
  // prepare x once and run them as one parallel loop. Results equal `count` linear() calls.
  virtual void linears(const Matrix* const* ws, int count, const float* x, int n, float* const* outs) {
    for (int i = 0; i < count; ++i) linear(*ws[i], x, n, outs[i]);
  }
  // RMSNorm (bias null) or LayerNorm over rows of width `dim`.
  virtual void norm(const float* x, int n, int dim, const float* weight, const float* bias, float eps, bool rms,
                    float* out) = 0;
  // Rotary embedding (rotate-half convention) applied in place to [n, heads*head_dim].
  virtual void rope(float* x, int n, int heads, int head_dim, const RowInfo* rows, float theta) = 0;
  // Stores rows' keys and values [n, kv_width] at their positions, then attends: out [n, heads*head_dim].
  virtual void attention(KvCache& cache, int layer, const float* q, const float* k, const float* v, int n,
                         const RowInfo* rows, const AttentionShape& shape, float* out) = 0;
  // gated: up = act(gate) * up; else up = act(up). act: SiLU or ReLU.
  virtual void activation(const float* gate, float* up, size_t n, bool silu) = 0;
  virtual void add(float* x, const float* y, size_t n) = 0;

  // Seconds and calls per operation when this backend is a profiling one; empty otherwise.
  virtual std::map<std::string, std::pair<double, long>> profile() const { return {}; }
};

// The CPU backend with `threads` workers (0 = all cores).
std::unique_ptr<Backend> make_cpu_backend(int threads);
// Wraps a backend so every call is timed (see Backend::profile).
std::unique_ptr<Backend> make_profiling_backend(std::unique_ptr<Backend> inner);

}  // namespace stb
