// metadata.config -> ModelConfig, with every key range-checked (a bad file gets a FormatError, not a crash).
#include "stbllm/model.h"

namespace stb {

namespace {

const JsonValue& require(const JsonValue& cfg, const char* key) { return cfg.at(key, "config"); }

int get_int(const JsonValue& cfg, const char* key, int64_t lo, int64_t hi) {
  return int(require(cfg, key).as_int(std::string("config.") + key, lo, hi));
}

bool get_bool(const JsonValue& cfg, const char* key, bool fallback) {
  const JsonValue* v = cfg.find(key);
  return v && !v->is_null() ? v->as_bool(std::string("config.") + key) : fallback;
}

std::string get_choice(const JsonValue& cfg, const char* key, std::initializer_list<const char*> allowed) {
  const std::string& s = require(cfg, key).as_string(std::string("config.") + key);
  std::string list;
  for (const char* a : allowed) {
    if (s == a) return s;
    list += std::string(list.empty() ? "" : ", ") + a;
  }
  throw FormatError("config." + std::string(key) + " is '" + s + "'; this runtime supports " + list);
}

}  // namespace

ModelConfig ModelConfig::from_metadata(const JsonValue& metadata) {
  ModelConfig c;
  c.architecture = get_choice(metadata, "architecture", {"llama", "mistral", "opt"});
  const JsonValue& cfg = metadata.at("config", "metadata");
  constexpr int64_t kMaxDim = 1 << 20;
  c.vocab_size = get_int(cfg, "vocab_size", 1, 1 << 24);
  c.hidden_size = get_int(cfg, "hidden_size", 1, kMaxDim);
  c.intermediate_size = get_int(cfg, "intermediate_size", 1, kMaxDim);
  c.num_layers = get_int(cfg, "num_hidden_layers", 1, 4096);
  c.heads = get_int(cfg, "num_attention_heads", 1, 4096);
  c.kv_heads = get_int(cfg, "num_key_value_heads", 1, c.heads);
  c.head_dim = get_int(cfg, "head_dim", 1, 4096);
  c.max_positions = get_int(cfg, "max_position_embeddings", 1, 1 << 24);
  if (c.heads % c.kv_heads != 0)
    throw FormatError("config: num_attention_heads (" + std::to_string(c.heads) +
                      ") is not a multiple of num_key_value_heads (" + std::to_string(c.kv_heads) + ")");
  c.rms_norm = get_choice(cfg, "norm_type", {"rms", "layer"}) == "rms";
  double eps = require(cfg, "norm_eps").as_double("config.norm_eps");
  if (!(eps > 0 && eps < 1)) throw FormatError("config.norm_eps must be in (0, 1)");
  c.norm_eps = float(eps);
  c.silu = get_choice(cfg, "hidden_act", {"silu", "relu"}) == "silu";
  c.mlp_gated = require(cfg, "mlp_gated").as_bool("config.mlp_gated");
  c.rope = get_choice(cfg, "position_type", {"rope", "learned"}) == "rope";
  if (c.rope) {
    double theta = require(cfg, "rope_theta").as_double("config.rope_theta");
    if (!(theta > 1 && theta < 1e12)) throw FormatError("config.rope_theta is out of range");
    c.rope_theta = float(theta);
    if (c.head_dim % 2) throw FormatError("config.head_dim must be even for rotary embeddings");
  } else {
    c.position_offset = get_int(cfg, "position_offset", 0, 1 << 16);
  }
  const JsonValue* window = cfg.find("sliding_window");
  if (window && !window->is_null()) c.sliding_window = int(window->as_int("config.sliding_window", 1, 1 << 24));
  c.tie_word_embeddings = get_bool(cfg, "tie_word_embeddings", false);
  c.attention_bias = get_bool(cfg, "attention_bias", false);
  c.mlp_bias = get_bool(cfg, "mlp_bias", false);
  return c;
}

}  // namespace stb
