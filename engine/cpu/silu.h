// SiLU gating, up[i] = silu(gate[i]) · up[i] with silu(a) = a / (1 + e^−a), and the sampler's softmax weights, on
// every kernel path.
//
// std::exp costs ~6 ns a call and, at batch 8, SiLU over 8 × 1536 × 30 values took 2–3 ms of a ~20 ms decode step
// (docs/performance.md). This exp vectorizes, and every path performs the same IEEE operations in the same order
// (min, max, multiply, round to nearest even, subtract, Horner, exponent bits; no FMA: -ffp-contract=off), so the
// scalar, AVX2 and AVX-512 results are bit-identical.
//
// exp(x): x is clamped to [−87, 88] (so 2^n stays a normal float), n = round(x · log2 e), r = x − n·ln2 with ln2
// split in two (Cody–Waite: n · kLn2Hi is exact, kLn2Hi having few mantissa bits), then e^r ≈ 1 + r + r² · P(r)
// with Cephes expf's degree-5 polynomial (within 2 ulp of expf on the range), and the result scaled by 2^n.
// Above 88 it is +inf, so silu(a) for a < −88 is −0 (its true value is below 1e−36 in magnitude); below −87 it
// stays e^−87, so silu(a) = a there, as it should.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace stb::cpu::silu {

constexpr float kExpMax = 88.0f, kExpMin = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// The SIMD min/max semantics (the second operand when either is NaN), so a NaN input gives the same bits everywhere.
inline float min_like_simd(float a, float b) { return a < b ? a : b; }
inline float max_like_simd(float a, float b) { return a > b ? a : b; }

inline float exp_ref(float x0) {
  const float x = max_like_simd(min_like_simd(x0, kExpMax), kExpMin);
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = p * r + kP[i];
  const float y = (p * (r * r) + r) + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x0 > kExpMax ? INFINITY : y * scale;
}

inline float silu_ref(float a) { return a / (1.0f + exp_ref(-a)); }

// Sampling weights out[i] = e^(logits[i] / temperature − top) (the portable loop, also the SIMD paths' tail).
inline void exp_weights_ref(const float* logits, float temperature, float top, float* out, int64_t begin, int64_t n) {
  for (int64_t i = begin; i < n; ++i) out[i] = exp_ref(logits[i] / temperature - top);
}

// The portable loop, also the SIMD paths' tail: gate null means up[i] = silu(up[i]).
inline void silu_gate_ref(const float* gate, float* up, int64_t begin, int64_t n) {
  for (int64_t i = begin; i < n; ++i) up[i] = gate ? silu_ref(gate[i]) * up[i] : silu_ref(up[i]);
}

}  // namespace stb::cpu::silu
