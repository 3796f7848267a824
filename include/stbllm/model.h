// A decoder-only transformer (LLaMA, Mistral, OPT) loaded from an .stb file, and batched generation over it.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "stbllm/backend.h"
#include "stbllm/format.h"

namespace stb {

// The canonical config of docs/format.md ("metadata.config"); everything the forward pass needs.
struct ModelConfig {
  std::string architecture;  // llama | mistral | opt
  int vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int heads = 0, kv_heads = 0, head_dim = 0;
  int max_positions = 0;
  bool rms_norm = true;
  float norm_eps = 1e-5f;
  bool silu = true, mlp_gated = true;
  bool rope = true;
  float rope_theta = 10000.f;
  int position_offset = 0;
  int sliding_window = 0;  // 0 = none
  bool tie_word_embeddings = false, attention_bias = false, mlp_bias = false;

  static ModelConfig from_metadata(const JsonValue& metadata);  // throws FormatError naming the bad key
};

struct LayerWeights {
  const float *attn_norm = nullptr, *attn_norm_bias = nullptr, *ffn_norm = nullptr, *ffn_norm_bias = nullptr;
  Matrix q, k, v, o, gate, up, down;
};

// One row of a forward batch: a token of a sequence (KV slot) at a position.
struct BatchRow {
  int slot, pos, token;
};

class Model {
 public:
  Model(const std::string& path, int threads, bool verify_checksums, KvType kv_type = KvType::F16);

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() { return *backend_; }
  const StbFile& file() const { return *file_; }
  uint64_t weight_bytes() const { return weight_bytes_; }
  KvType kv_type() const { return kv_type_; }
  std::unique_ptr<KvCache> new_kv_cache() {
    return backend_->new_kv_cache(cfg_.num_layers, cfg_.kv_heads, cfg_.head_dim, kv_type_);
  }

  // Runs `rows` through the network, appending their keys/values to `cache`, and writes the logits of the rows
  // listed in `logit_rows` (ascending indices into `rows`) to `logits` [logit_rows.size(), vocab] (host memory).
  // The cache must already hold positions [0, pos) of each row's slot, and rows of one slot come in order.
  // Thread-safe: concurrent calls (e.g. two generators from two Python threads) run one after the other.
  void forward(KvCache& cache, const std::vector<BatchRow>& rows, const std::vector<int>& logit_rows, float* logits);

 private:
  std::shared_ptr<const StbFile> file_;
  std::unique_ptr<Backend> backend_;
  KvType kv_type_;
  ModelConfig cfg_;
  Matrix token_embd_, pos_embd_, output_;
  const float *output_norm_ = nullptr, *output_norm_bias_ = nullptr;
  std::vector<LayerWeights> layers_;
  uint64_t weight_bytes_ = 0;
  std::mutex forward_mutex_;  // one forward at a time: the backend's pool and scratch are shared
};

struct SamplingParams {
  float temperature = 0.8f;  // 0 = greedy
  int top_k = 40;            // 0 = off
  float top_p = 0.95f;       // 1 = off
  float min_p = 0.05f;       // 0 = off
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;
  // OpenAI-style, over the generated tokens only: logit -= frequency * count + presence * (count > 0).
  float frequency_penalty = 0.f;
  float presence_penalty = 0.f;
};

// Picks the next token from one row of logits. Deterministic for a given seed on every machine.
// The unfiltered sampler's softmax weights out[i] = e^(logits[i] / temperature − max(logits) / temperature), by the
// CPU kernels' SIMD exp (engine/cpu/silu.h: bit-identical on every path); the most likely token weighs 1.
void softmax_weights(const float* logits, int vocab, float temperature, float* out);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  // `context` is the prompt and the tokens generated so far; the generated ones start at `generated_from`.
  int sample(float* logits, int vocab, const std::vector<int>& context, size_t generated_from = 0);

 private:
  SamplingParams p_;
  uint64_t state_[4];
  double next_uniform();
  std::vector<std::pair<float, int>> candidates_;
  std::vector<float> weights_;  // the unfiltered softmax's weights (no top-k, top-p or min-p)
};

// Generates continuations of a batch of prompts: one prefill, then one batched decode step per token.
class Generator {
 public:
  Generator(Model& model, std::vector<std::vector<int>> prompts, int max_new_tokens, const SamplingParams& params,
            std::vector<int> stop_token_ids);
  // Runs up to `steps` tokens per sequence; returns the new tokens of each sequence.
  std::vector<std::vector<int>> step(int steps);
  void stop(int index);  // ends one sequence early (e.g. a stop string was found)
  bool done() const;

 private:
  struct Sequence {
    std::vector<int> tokens;
    size_t prompt_len = 0;
    int generated = 0;
    bool finished = false;
    int pending = -1;  // sampled token not yet run through the model
  };
  Model& model_;
  std::unique_ptr<KvCache> cache_;
  std::vector<Sequence> seqs_;
  std::vector<Sampler> samplers_;
  std::vector<int> stop_ids_;
  int max_new_tokens_;
  bool prefilled_ = false;
  std::vector<float> logits_;

  void prefill();
  void accept(size_t i, float* logits);
};

// Continuous batching: requests join the running batch between steps and leave it (freeing their KV slot) when
// they finish or are cancelled. Every step is one Model::forward over the decode row of each running request plus
// prompt chunks of the joining ones, so a long prompt never stalls the others for more than one chunk. Each request
// keeps its own sampler: with a seed, its tokens do not depend on which other requests share its steps.
// Not thread-safe: one thread drives add / cancel / step.
class BatchEngine {
 public:
  enum class Finish { None, StopToken, Length };  // Length: max_new_tokens or the model's context reached
  struct Event {
    int64_t id;
    int token;  // sampled this step
    Finish finish;
  };

  // max_batch: requests held at once (each holds a KV slot); max_step_tokens: rows per forward (decode rows of
  // running requests come first, joining prompts share the rest).
  BatchEngine(Model& model, int max_batch, int max_step_tokens);
  // Queues a request for the next step. Throws when the batch is full, the id is in use or the prompt is unusable.
  void add(int64_t id, std::vector<int> prompt, int max_new_tokens, const SamplingParams& params,
           std::vector<int> stop_token_ids);
  bool cancel(int64_t id);  // false when the id is not running (already finished)
  // One forward pass; returns the token each request sampled (requests still in prefill sample none).
  std::vector<Event> step();
  int active() const { return int(requests_.size()); }
  int max_batch() const { return max_batch_; }

 private:
  struct Request {
    int64_t id;
    int slot;
    std::vector<int> tokens;  // prompt, then generated tokens
    size_t prompt_len, fed = 0;  // fed: tokens whose keys and values are in the cache
    int max_new_tokens;
    Sampler sampler;
    std::vector<int> stop_ids;
  };
  Model& model_;
  std::unique_ptr<KvCache> cache_;
  int max_batch_, max_step_tokens_;
  std::vector<Request> requests_;  // in arrival order
  std::vector<int> free_slots_;
  std::vector<float> logits_;

  void finish(size_t index);
};

}  // namespace stb
