// The attention of one head of one row, shared by the kernel paths (each instantiates it with its own dot product
// and p · v accumulation; the accumulation is one multiply and one add per element on every path).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace stb::cpu {

// dot(k, q, hd) -> float; add_scaled(out, p, v, hd): out[d] += p · v[d].
template <class Dot, class AddScaled>
void attend_with(Dot dot, AddScaled add_scaled, const float* q, const float* keys, const float* values,
                 int64_t kv_stride, int first, int last, int hd, float scale, float* scores, float* out) {
  float top = -INFINITY;
  for (int j = first; j <= last; ++j) {
    scores[j - first] = dot(keys + j * kv_stride, q, hd) * scale;
    top = std::max(top, scores[j - first]);
  }
  double total = 0;
  for (int j = first; j <= last; ++j) total += (scores[j - first] = std::exp(scores[j - first] - top));
  std::fill(out, out + hd, 0.f);
  for (int j = first; j <= last; ++j) add_scaled(out, float(scores[j - first] / total), values + j * kv_stride, hd);
}

}  // namespace stb::cpu
