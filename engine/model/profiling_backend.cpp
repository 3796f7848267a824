// A Backend that times every call of another one, by operation (matmuls by weight, e.g. "linear attn_q"):
// STBLLM_PROFILE=1 turns it on, Model::profile() reads it. The graph code stays free of timing.
#include <chrono>
#include <map>
#include <mutex>

#include "stbllm/backend.h"

namespace stb {

namespace {

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}

  std::string name() const override { return inner_->name(); }
  std::string kernels() const override { return inner_->kernels(); }
  int threads() const override { return inner_->threads(); }
  Matrix upload_matrix(const TensorEntry& w, const TensorEntry* b) override { return inner_->upload_matrix(w, b); }
  const float* upload_vector(const TensorEntry& t) override { return inner_->upload_vector(t); }
  void pack_matrix(Matrix& m) override { inner_->pack_matrix(m); }
  float* alloc(size_t n) override { return inner_->alloc(n); }
  void release(float* b) override { inner_->release(b); }
  std::unique_ptr<KvCache> new_kv_cache(int layers, int kv_heads, int head_dim, KvType type) override {
    return inner_->new_kv_cache(layers, kv_heads, head_dim, type);
  }
  void to_host(const float* s, float* d, size_t n) override { inner_->to_host(s, d, n); }

  void embed(const Matrix& t, const int* ids, int n, float* out, bool acc) override {
    timed("embed", [&] { inner_->embed(t, ids, n, out, acc); });
  }
  void linear(const Matrix& w, const float* x, int n, float* out) override {
    timed("linear " + category(w.name), [&] { inner_->linear(w, x, n, out); });
  }
  void linears(const Matrix* const* ws, int count, const float* x, int n, float* const* outs) override {
    std::string op = "linear ";
    for (int i = 0; i < count; ++i) op += (i ? "+" : "") + category(ws[i]->name);
    timed(op, [&] { inner_->linears(ws, count, x, n, outs); });
  }
  void norm(const float* x, int n, int dim, const float* w, const float* b, float eps, bool rms, float* out) override {
    timed("norm", [&] { inner_->norm(x, n, dim, w, b, eps, rms, out); });
  }
  void rope(float* x, int n, int heads, int hd, const RowInfo* rows, float theta) override {
    timed("rope", [&] { inner_->rope(x, n, heads, hd, rows, theta); });
  }
  void attention(KvCache& c, int layer, const float* q, const float* k, const float* v, int n, const RowInfo* rows,
                 const AttentionShape& s, float* out) override {
    timed("attention", [&] { inner_->attention(c, layer, q, k, v, n, rows, s, out); });
  }
  void activation(const float* gate, float* up, size_t n, bool silu) override {
    timed("activation", [&] { inner_->activation(gate, up, n, silu); });
  }
  void add(float* x, const float* y, size_t n) override {
    timed("add", [&] { inner_->add(x, y, n); });
  }

  std::map<std::string, std::pair<double, long>> profile() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return totals_;
  }

 private:
  // "blk.12.attn_q.weight" -> "attn_q"; "output.weight" / "token_embd.weight" (a tied head) keep their stem.
  static std::string category(const std::string& name) {
    std::string s = name.rfind("blk.", 0) == 0 ? name.substr(name.find('.', 4) + 1) : name;
    const size_t dot = s.find('.');
    return dot == std::string::npos ? s : s.substr(0, dot);
  }

  template <class F>
  void timed(const std::string& op, F&& f) {
    const auto start = std::chrono::steady_clock::now();
    f();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::lock_guard<std::mutex> lock(mutex_);
    auto& t = totals_[op];
    t.first += seconds;
    t.second += 1;
  }

  std::unique_ptr<Backend> inner_;
  mutable std::mutex mutex_;
  std::map<std::string, std::pair<double, long>> totals_;
};

}  // namespace

std::unique_ptr<Backend> make_profiling_backend(std::unique_ptr<Backend> inner) {
  return std::make_unique<ProfilingBackend>(std::move(inner));
}

}  // namespace stb
