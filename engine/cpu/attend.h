// The attention of one row for the query heads that share one KV head (GQA), shared by the kernel paths: each
// instantiates it with its own scores (q · k), weighted sum of values and exp.
//
// Decode attends a handful of positions per head, so the per-position costs decide: scores come a block of keys at
// a time (SIMD paths reduce 8 dot products with one transpose instead of 8 horizontal sums), the softmax uses the
// kernels' vector exp (engine/cpu/silu.h) instead of std::exp, and every key and value row is read once for all the
// heads of its group.
#pragma once
#include <algorithm>
#include <cstdint>

namespace stb::cpu {

// q [heads, hd] and out [heads, hd] contiguous; keys / values of position j at keys + j · kv_stride; positions
// [first, last]; scores: heads × (last − first + 1) floats of scratch.
//   key_scores(q, keys, kv_stride, count, hd, scale, s): s[i] = (q · key i) · scale for the count keys from `keys`;
//   exp_weights(x, 1, top, x, n): x[i] = e^(x[i] − top) (the kernels' exp_weights, in place);
//   weighted_sum(p, values, kv_stride, count, hd, out): out[d] = Σ_i p[i] · v_i[d], summed in order i from 0, one
//   multiply and one add per term (v_i = values + i · kv_stride).
// The softmax is in float with a double sum and reciprocal.
// T: float or fp16 (uint16_t) keys and values.
template <class T, class KeyScores, class ExpWeights, class WeightedSum>
void attend_heads_with(KeyScores key_scores, ExpWeights exp_weights, WeightedSum weighted_sum, const float* q, int heads,
                       const T* keys, const T* values, int64_t kv_stride, int first, int last, int hd, float scale,
                       float* scores, float* out) {
  const int len = last - first + 1;
  for (int h = 0; h < heads; ++h)
    key_scores(q + int64_t(h) * hd, keys + first * kv_stride, kv_stride, len, hd, scale, scores + int64_t(h) * len);
  for (int h = 0; h < heads; ++h) {
    float* s = scores + int64_t(h) * len;
    exp_weights(s, 1.0f, *std::max_element(s, s + len), s, len);
    double part[4] = {};  // four partial sums: one chain of dependent double adds cost more than the exps
    int i = 0;
    for (; i + 4 <= len; i += 4)
      for (int k = 0; k < 4; ++k) part[k] += s[i + k];
    for (; i < len; ++i) part[0] += s[i];
    const double inv_total = 1.0 / ((part[0] + part[1]) + (part[2] + part[3]));
    for (i = 0; i < len; ++i) s[i] = float(s[i] * inv_total);
  }
  for (int h = 0; h < heads; ++h)
    weighted_sum(scores + int64_t(h) * len, values + first * kv_stride, kv_stride, len, hd, out + int64_t(h) * hd);
}

}  // namespace stb::cpu
