// Sampling and batched generation. The sampler's random numbers come from our own xoshiro256** so the same seed
// gives the same tokens on every machine and standard library.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <stdexcept>
#include <unordered_set>

#include "cpu/kernels.h"  // the SIMD exp of the sampler's softmax (host code, like the CPU backend)
#include "stbllm/model.h"

namespace stb {

namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// Throws unless `prompt` (named `what` in the message) is non-empty, fits the context and holds vocabulary ids.
void check_prompt(const std::vector<int>& prompt, const ModelConfig& c, const std::string& what) {
  if (prompt.empty()) throw std::invalid_argument(what + " is empty");
  if (int64_t(prompt.size()) >= c.max_positions)
    throw std::length_error(what + " has " + std::to_string(prompt.size()) + " tokens; the model's context is " +
                            std::to_string(c.max_positions));
  for (int t : prompt)
    if (t < 0 || t >= c.vocab_size)
      throw std::out_of_range(what + " holds token id " + std::to_string(t) + ", outside the vocabulary [0, " +
                              std::to_string(c.vocab_size) + ")");
}

}  // namespace

void softmax_weights(const float* logits, int vocab, float temperature, float* out) {
  const float top = *std::max_element(logits, logits + vocab) / temperature;
  cpu::best_kernels().exp_weights(logits, temperature, top, out, vocab);
}

Sampler::Sampler(const SamplingParams& p) : p_(p) {
  uint64_t s = p.seed;
  for (uint64_t& word : state_) word = splitmix64(s);
}

double Sampler::next_uniform() {
  const uint64_t result = rotl(state_[1] * 5, 7) * 9, t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return double(result >> 11) * 0x1.0p-53;
}

int Sampler::sample(float* logits, int vocab, const std::vector<int>& context, size_t generated_from) {
  // A NaN would break the orderings below (and a +inf the softmax): NaN counts as impossible, +inf as a huge
  // finite value. Nothing left to choose means the model's arithmetic broke down: say so rather than pick token 0.
  bool any_possible = false;
  for (int i = 0; i < vocab; ++i) {
    float& l = logits[i];
    if (std::isnan(l)) l = -std::numeric_limits<float>::infinity();
    else if (l == std::numeric_limits<float>::infinity()) l = 1e30f;  // still finite after / temperature
    any_possible |= l > -std::numeric_limits<float>::infinity();
  }
  if (!any_possible)
    throw std::runtime_error("every logit is NaN or -inf: the model's arithmetic broke down (damaged weights?)");
  if (p_.repetition_penalty != 1.0f) {  // CTRL-style, once per distinct token already in the context
    std::unordered_set<int> seen(context.begin(), context.end());
    for (int t : seen) {
      float& l = logits[t];
      l = l > 0 ? l / p_.repetition_penalty : l * p_.repetition_penalty;
    }
  }
  if (p_.frequency_penalty != 0.f || p_.presence_penalty != 0.f) {
    std::map<int, int> counts;  // ordered: the float updates happen in the same order everywhere
    for (size_t i = std::min(generated_from, context.size()); i < context.size(); ++i) ++counts[context[i]];
    for (const auto& [token, count] : counts) logits[token] -= p_.frequency_penalty * count + p_.presence_penalty;
  }
  if (p_.temperature <= 0.f) return int(std::max_element(logits, logits + vocab) - logits);
  if (p_.top_k <= 0 && p_.top_p >= 1.f && p_.min_p <= 0.f) {
    // No filter (OpenAI's defaults): the token is drawn from the softmax's weights in token-id order, without
    // sorting or pairing; the exponentials take the kernels' SIMD exp, bit-identical on every path.
    weights_.resize(size_t(vocab));
    softmax_weights(logits, vocab, p_.temperature, weights_.data());
    double total = 0;
    for (int i = 0; i < vocab; ++i) {  // the exp clamps its argument at −87: an impossible token must weigh 0
      if (logits[i] == -std::numeric_limits<float>::infinity()) weights_[size_t(i)] = 0;
      total += weights_[size_t(i)];
    }
    double r = next_uniform() * total;
    for (int i = 0; i < vocab; ++i) {
      r -= weights_[size_t(i)];
      if (r < 0) return i;
    }
    for (int i = vocab - 1;; --i)  // rounding left r ≥ 0: the last possible token
      if (weights_[size_t(i)] > 0) return i;
  }

  // Highest first; ties broken by token id so the order never depends on the sort implementation. Only as much
  // of the vocabulary is sorted as the filters need: a full sort per token would cost more than a decode step of
  // a small model, and every request in a batch pays it.
  auto higher = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  candidates_.resize(vocab);
  for (int i = 0; i < vocab; ++i) candidates_[i] = {logits[i] / p_.temperature, i};
  size_t n = vocab;
  size_t sorted = 0;  // candidates_[0, sorted) are the highest, in order; the rest stay in token-id order
  if (p_.top_k > 0 && size_t(p_.top_k) < n) {
    std::partial_sort(candidates_.begin(), candidates_.begin() + p_.top_k, candidates_.end(), higher);
    n = sorted = p_.top_k;
  }
  // Softmax over the survivors (as probabilities, in place), summed in the candidates' order.
  float top = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) top = std::max(top, candidates_[i].first);
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += (candidates_[i].first = std::exp(candidates_[i].first - top));
  for (size_t i = 0; i < n; ++i) candidates_[i].first = float(candidates_[i].first / total);
  if (p_.top_p < 1.f) {  // smallest prefix whose mass reaches top_p, sorting more of the rest while it is short
    double mass = 0;
    size_t keep = 0;
    for (;;) {
      while (keep < sorted && mass < p_.top_p) mass += candidates_[keep++].first;
      if (mass >= p_.top_p || sorted == n) break;
      const size_t grow = std::min(n, std::max<size_t>(64, 4 * sorted));
      std::partial_sort(candidates_.begin() + sorted, candidates_.begin() + grow, candidates_.begin() + n, higher);
      sorted = grow;
    }
    n = sorted = std::max<size_t>(keep, 1);
  }
  if (p_.min_p > 0.f) {  // drop tokens less likely than min_p times the most likely one (probability 1 / total)
    const float floor = p_.min_p * float(1.0 / total);
    auto end = std::remove_if(candidates_.begin(), candidates_.begin() + n,
                              [floor](const std::pair<float, int>& c) { return c.first < floor; });
    n = std::max<size_t>(size_t(end - candidates_.begin()), 1);
  }
  double mass = 0;
  for (size_t i = 0; i < n; ++i) mass += candidates_[i].first;
  double r = next_uniform() * mass;
  for (size_t i = 0; i < n; ++i) {
    r -= candidates_[i].first;
    if (r < 0) return candidates_[i].second;
  }
  return candidates_[n - 1].second;
}

Generator::Generator(Model& model, std::vector<std::vector<int>> prompts, int max_new_tokens,
                     const SamplingParams& params, std::vector<int> stop_token_ids)
    : model_(model), cache_(model.new_kv_cache()), stop_ids_(std::move(stop_token_ids)),
      max_new_tokens_(max_new_tokens) {
  if (max_new_tokens < 0) throw std::invalid_argument("max_new_tokens must be >= 0");
  for (size_t i = 0; i < prompts.size(); ++i) {
    check_prompt(prompts[i], model.config(), "prompt " + std::to_string(i));
    Sequence s;
    s.prompt_len = prompts[i].size();
    s.tokens = std::move(prompts[i]);
    s.finished = max_new_tokens == 0;
    seqs_.push_back(std::move(s));
    SamplingParams p = params;
    p.seed = params.seed + i;  // distinct streams per batch entry, reproducible for the same seed
    samplers_.emplace_back(p);
  }
}

bool Generator::done() const {
  return std::all_of(seqs_.begin(), seqs_.end(), [](const Sequence& s) { return s.finished; });
}

void Generator::stop(int index) {
  if (index < 0 || size_t(index) >= seqs_.size()) throw std::out_of_range("no sequence " + std::to_string(index));
  seqs_[index].finished = true;
  cache_->release(index);
}

void Generator::accept(size_t i, float* logits) {
  Sequence& s = seqs_[i];
  const ModelConfig& c = model_.config();
  const int token = samplers_[i].sample(logits, c.vocab_size, s.tokens, s.prompt_len);
  s.tokens.push_back(token);
  ++s.generated;
  const bool stop_token = std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end();
  if (stop_token || s.generated >= max_new_tokens_ || int64_t(s.tokens.size()) >= c.max_positions) {
    s.finished = true;
    s.pending = -1;
    cache_->release(int(i));
  } else {
    s.pending = token;
  }
}

void Generator::prefill() {
  std::vector<BatchRow> rows;
  std::vector<int> logit_rows;
  std::vector<size_t> which;
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (seqs_[i].finished) continue;
    for (size_t p = 0; p < seqs_[i].tokens.size(); ++p) rows.push_back({int(i), int(p), seqs_[i].tokens[p]});
    logit_rows.push_back(int(rows.size()) - 1);
    which.push_back(i);
  }
  prefilled_ = true;
  if (rows.empty()) return;
  const int vocab = model_.config().vocab_size;
  logits_.resize(size_t(which.size()) * vocab);
  model_.forward(*cache_, rows, logit_rows, logits_.data());
  for (size_t j = 0; j < which.size(); ++j) accept(which[j], logits_.data() + j * vocab);
}

std::vector<std::vector<int>> Generator::step(int steps) {
  std::vector<size_t> before(seqs_.size());
  for (size_t i = 0; i < seqs_.size(); ++i) before[i] = seqs_[i].tokens.size();
  int remaining = steps;
  if (!prefilled_ && remaining > 0) {
    prefill();
    --remaining;
  }
  const int vocab = model_.config().vocab_size;
  for (; remaining > 0 && !done(); --remaining) {
    std::vector<BatchRow> rows;
    std::vector<int> logit_rows;
    std::vector<size_t> which;
    for (size_t i = 0; i < seqs_.size(); ++i) {
      const Sequence& s = seqs_[i];
      if (s.finished) continue;
      logit_rows.push_back(int(rows.size()));
      rows.push_back({int(i), int(s.tokens.size()) - 1, s.pending});
      which.push_back(i);
    }
    logits_.resize(which.size() * size_t(vocab));
    model_.forward(*cache_, rows, logit_rows, logits_.data());
    for (size_t j = 0; j < which.size(); ++j) accept(which[j], logits_.data() + j * vocab);
  }
  std::vector<std::vector<int>> out(seqs_.size());
  for (size_t i = 0; i < seqs_.size(); ++i) out[i].assign(seqs_[i].tokens.begin() + before[i], seqs_[i].tokens.end());
  return out;
}

BatchEngine::BatchEngine(Model& model, int max_batch, int max_step_tokens)
    : model_(model), cache_(model.new_kv_cache()), max_batch_(max_batch), max_step_tokens_(max_step_tokens) {
  if (max_batch < 1) throw std::invalid_argument("max_batch must be >= 1");
  if (max_step_tokens < max_batch)
    throw std::invalid_argument("max_step_tokens must be >= max_batch (every running request decodes each step)");
  for (int slot = max_batch - 1; slot >= 0; --slot) free_slots_.push_back(slot);
}

void BatchEngine::add(int64_t id, std::vector<int> prompt, int max_new_tokens, const SamplingParams& params,
                      std::vector<int> stop_token_ids) {
  if (free_slots_.empty()) throw std::length_error("the batch is full (max_batch " + std::to_string(max_batch_) + ")");
  for (const Request& r : requests_)
    if (r.id == id) throw std::invalid_argument("request " + std::to_string(id) + " is already running");
  if (max_new_tokens < 1) throw std::invalid_argument("max_new_tokens must be >= 1");
  check_prompt(prompt, model_.config(), "the prompt");
  const size_t prompt_len = prompt.size();
  requests_.push_back(Request{id, free_slots_.back(), std::move(prompt), prompt_len, 0, max_new_tokens,
                              Sampler(params), std::move(stop_token_ids)});
  free_slots_.pop_back();
}

void BatchEngine::finish(size_t index) {
  cache_->release(requests_[index].slot);
  free_slots_.push_back(requests_[index].slot);
  requests_.erase(requests_.begin() + index);
}

bool BatchEngine::cancel(int64_t id) {
  for (size_t i = 0; i < requests_.size(); ++i)
    if (requests_[i].id == id) {
      finish(i);
      return true;
    }
  return false;
}

std::vector<BatchEngine::Event> BatchEngine::step() {
  std::vector<BatchRow> rows;
  std::vector<int> logit_rows;
  std::vector<size_t> sampling;  // requests whose last row this step has logits, in row order
  std::vector<std::pair<size_t, size_t>> fed_after;  // (request, tokens in the cache once this step has run)
  // Decode rows first: every request past its prompt feeds its last sampled token.
  for (size_t i = 0; i < requests_.size(); ++i) {
    Request& r = requests_[i];
    if (r.fed < r.prompt_len) continue;
    logit_rows.push_back(int(rows.size()));
    rows.push_back({r.slot, int(r.fed), r.tokens[r.fed]});
    sampling.push_back(i);
    fed_after.push_back({i, r.fed + 1});
  }
  // Then prompt chunks, oldest request first, within the step's row budget.
  int budget = max_step_tokens_ - int(rows.size());
  for (size_t i = 0; i < requests_.size() && budget > 0; ++i) {
    Request& r = requests_[i];
    if (r.fed >= r.prompt_len) continue;
    const size_t end = std::min(r.prompt_len, r.fed + size_t(budget));
    for (size_t p = r.fed; p < end; ++p) rows.push_back({r.slot, int(p), r.tokens[p]});
    budget -= int(end - r.fed);
    fed_after.push_back({i, end});
    if (end == r.prompt_len) {
      logit_rows.push_back(int(rows.size()) - 1);
      sampling.push_back(i);
    }
  }
  std::vector<Event> events;
  if (rows.empty()) return events;
  const ModelConfig& c = model_.config();
  logits_.resize(logit_rows.size() * size_t(c.vocab_size));
  model_.forward(*cache_, rows, logit_rows, logits_.data());
  for (const auto& [i, fed] : fed_after) requests_[i].fed = fed;

  std::vector<size_t> finished;
  for (size_t j = 0; j < sampling.size(); ++j) {
    Request& r = requests_[sampling[j]];
    const int token = r.sampler.sample(logits_.data() + j * c.vocab_size, c.vocab_size, r.tokens, r.prompt_len);
    r.tokens.push_back(token);
    Finish why = Finish::None;
    if (std::find(r.stop_ids.begin(), r.stop_ids.end(), token) != r.stop_ids.end())
      why = Finish::StopToken;
    else if (r.tokens.size() - r.prompt_len >= size_t(r.max_new_tokens) || int64_t(r.tokens.size()) >= c.max_positions)
      why = Finish::Length;
    events.push_back({r.id, token, why});
    if (why != Finish::None) finished.push_back(sampling[j]);
  }
  std::sort(finished.rbegin(), finished.rend());  // erase from the back so the other indices stay valid
  for (size_t i : finished) finish(i);
  return events;
}

}  // namespace stb
