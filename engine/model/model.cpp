// The decoder-only transformer forward pass, written once for LLaMA, Mistral and OPT against the Backend interface.
//   LLaMA / Mistral: RMSNorm, RoPE, SwiGLU, GQA, optional tied head; Mistral adds a sliding attention window.
//   OPT: LayerNorm with bias, learned positions (offset 2), ReLU MLP, biases everywhere; pre-norm only.
#include "stbllm/model.h"

#include <algorithm>
#include <cstdlib>

namespace stb {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void expect_shape(const TensorEntry& t, std::vector<int64_t> shape) {
  if (t.shape != shape)
    throw FormatError("tensor '" + t.name + "' has shape " + shape_str(t.shape) + ", the config implies " +
                      shape_str(shape));
}

// Owns the activation buffers of one forward chunk (returned to the backend on scope exit).
struct Scratch {
  Backend& backend;
  std::vector<float*> buffers;
  float* get(size_t n) {
    buffers.push_back(backend.alloc(n));
    return buffers.back();
  }
  ~Scratch() {
    for (float* b : buffers) backend.release(b);
  }
};

constexpr int kMaxChunkRows = 256;  // rows per forward chunk: bounds activation memory during long prefills

}  // namespace

Model::Model(const std::string& path, int threads, bool verify_checksums, KvType kv_type)
    : file_(StbFile::open(path, verify_checksums)), backend_(make_cpu_backend(threads)), kv_type_(kv_type) {
  const char* profile = std::getenv("STBLLM_PROFILE");
  if (profile && *profile && std::string(profile) != "0") backend_ = make_profiling_backend(std::move(backend_));
  cfg_ = ModelConfig::from_metadata(file_->metadata());
  const ModelConfig& c = cfg_;
  const int64_t hidden = c.hidden_size, q_width = int64_t(c.heads) * c.head_dim,
                kv_width = int64_t(c.kv_heads) * c.head_dim, inter = c.intermediate_size;

  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols, bool with_bias) {
    const TensorEntry& w = file_->get(name + ".weight");
    expect_shape(w, {rows, cols});
    const TensorEntry* b = nullptr;
    if (with_bias) {
      b = &file_->get(name + ".bias");
      expect_shape(*b, {rows});
    }
    Matrix m = backend_->upload_matrix(w, b);
    weight_bytes_ += m.bytes;
    return m;
  };
  auto vector = [&](const std::string& name, int64_t n) -> const float* {
    const TensorEntry& t = file_->get(name);
    expect_shape(t, {n});
    weight_bytes_ += uint64_t(n) * 4;
    return backend_->upload_vector(t);
  };
  auto norm = [&](const std::string& name, const float** weight, const float** bias) {
    *weight = vector(name + ".weight", hidden);
    if (!c.rms_norm) *bias = vector(name + ".bias", hidden);
  };

  // Embedding lookups decode single rows: only codecs with a row decoder (the binary ones have none).
  auto embedding = [&](const std::string& name, int64_t rows) {
    Matrix m = matrix(name, rows, hidden, false);
    if (m.codec != MatrixCodec::F32 && m.codec != MatrixCodec::F16 && m.codec != MatrixCodec::Int8Group &&
        m.codec != MatrixCodec::QGroup)
      throw FormatError(name + ".weight must be stb.f16.v1, stb.f32.v1, stb.int8-group.v1 or stb.qgroup.v1");
    return m;
  };
  token_embd_ = embedding("token_embd", c.vocab_size);
  if (!c.rope) pos_embd_ = embedding("pos_embd", int64_t(c.max_positions) + c.position_offset);
  layers_.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& L = layers_[i];
    norm(p + "attn_norm", &L.attn_norm, &L.attn_norm_bias);
    L.q = matrix(p + "attn_q", q_width, hidden, c.attention_bias);
    L.k = matrix(p + "attn_k", kv_width, hidden, c.attention_bias);
    L.v = matrix(p + "attn_v", kv_width, hidden, c.attention_bias);
    L.o = matrix(p + "attn_o", hidden, q_width, c.attention_bias);
    norm(p + "ffn_norm", &L.ffn_norm, &L.ffn_norm_bias);
    if (c.mlp_gated) L.gate = matrix(p + "ffn_gate", inter, hidden, c.mlp_bias);
    L.up = matrix(p + "ffn_up", inter, hidden, c.mlp_bias);
    L.down = matrix(p + "ffn_down", hidden, inter, c.mlp_bias);
  }
  norm("output_norm", &output_norm_, &output_norm_bias_);
  if (c.tie_word_embeddings) {
    if (file_->find("output.weight")) throw FormatError("output.weight is present but tie_word_embeddings is set");
    output_ = token_embd_;
  } else {
    output_ = matrix("output", c.vocab_size, hidden, false);
  }
}

void Model::forward(KvCache& cache, const std::vector<BatchRow>& rows, const std::vector<int>& logit_rows,
                    float* logits) {
  const ModelConfig& c = cfg_;
  Backend& be = *backend_;
  std::lock_guard<std::mutex> lock(forward_mutex_);
  for (const BatchRow& r : rows) {
    if (r.token < 0 || r.token >= c.vocab_size)
      throw std::out_of_range("token id " + std::to_string(r.token) + " is outside the vocabulary [0, " +
                              std::to_string(c.vocab_size) + ")");
    if (r.pos < 0 || r.pos >= c.max_positions)
      throw std::length_error("position " + std::to_string(r.pos) + " exceeds the model's context length " +
                              std::to_string(c.max_positions));
  }
  if (!std::is_sorted(logit_rows.begin(), logit_rows.end()))
    throw std::invalid_argument("Model::forward: logit_rows must be ascending");
  for (const BatchRow& r : rows) cache.reserve(r.slot, r.pos + 1);

  const AttentionShape shape{c.heads, c.kv_heads, c.head_dim, c.sliding_window};
  const size_t hidden = c.hidden_size, q_width = size_t(c.heads) * c.head_dim,
               kv_width = size_t(c.kv_heads) * c.head_dim, inter = c.intermediate_size;
  size_t logits_done = 0;

  for (size_t start = 0; start < rows.size(); start += kMaxChunkRows) {
    const int n = int(std::min<size_t>(kMaxChunkRows, rows.size() - start));
    std::vector<int> tokens(n), positions(n);
    std::vector<RowInfo> info(n);
    for (int i = 0; i < n; ++i) {
      const BatchRow& r = rows[start + i];
      tokens[i] = r.token;
      positions[i] = r.pos + c.position_offset;
      info[i] = {r.slot, r.pos};
    }
    Scratch s{be, {}};
    float* x = s.get(n * hidden);
    float* h = s.get(n * hidden);
    float* q = s.get(n * q_width);
    float* k = s.get(n * kv_width);
    float* v = s.get(n * kv_width);
    float* att = s.get(n * q_width);
    float* gate = c.mlp_gated ? s.get(n * inter) : nullptr;
    float* up = s.get(n * inter);

    be.embed(token_embd_, tokens.data(), n, x, false);
    if (!c.rope) be.embed(pos_embd_, positions.data(), n, x, true);

    for (int l = 0; l < c.num_layers; ++l) {
      const LayerWeights& L = layers_[l];
      be.norm(x, n, int(hidden), L.attn_norm, L.attn_norm_bias, c.norm_eps, c.rms_norm, h);
      const Matrix* qkv[] = {&L.q, &L.k, &L.v};
      float* const qkv_out[] = {q, k, v};
      be.linears(qkv, 3, h, n, qkv_out);
      if (c.rope) {
        be.rope(q, n, c.heads, c.head_dim, info.data(), c.rope_theta);
        be.rope(k, n, c.kv_heads, c.head_dim, info.data(), c.rope_theta);
      }
      be.attention(cache, l, q, k, v, n, info.data(), shape, att);
      be.linear(L.o, att, n, h);
      be.add(x, h, n * hidden);

      be.norm(x, n, int(hidden), L.ffn_norm, L.ffn_norm_bias, c.norm_eps, c.rms_norm, h);
      if (c.mlp_gated) {
        const Matrix* gate_up[] = {&L.gate, &L.up};
        float* const gate_up_out[] = {gate, up};
        be.linears(gate_up, 2, h, n, gate_up_out);
      } else {
        be.linear(L.up, h, n, up);
      }
      be.activation(gate, up, n * inter, c.silu);
      be.linear(L.down, up, n, h);
      be.add(x, h, n * hidden);
    }

    // Only the rows whose logits were asked for go through the final norm and the head.
    std::vector<int> wanted;
    for (int idx : logit_rows)
      if (idx >= int(start) && idx < int(start) + n) wanted.push_back(idx - int(start));
    if (wanted.empty()) continue;
    const int m = int(wanted.size());
    float* sel = s.get(m * hidden);  // zero-filled, so adding gathers the wanted rows
    for (int i = 0; i < m; ++i) be.add(sel + i * hidden, x + size_t(wanted[i]) * hidden, hidden);
    be.norm(sel, m, int(hidden), output_norm_, output_norm_bias_, c.norm_eps, c.rms_norm, h);
    float* out = s.get(size_t(m) * c.vocab_size);
    be.linear(output_, h, m, out);
    be.to_host(out, logits + logits_done * c.vocab_size, size_t(m) * c.vocab_size);
    logits_done += m;
  }
}

}  // namespace stb
