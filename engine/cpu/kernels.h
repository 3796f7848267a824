// CPU compute kernels, one table per instruction set, chosen once at run time (never by compile flags: CI machines
// differ, and an AVX-512 instruction on the AMD EPYC runners is a SIGILL).
#pragma once
#include <cstdint>

namespace stb::cpu {

struct Kernels {
  const char* name;
  float (*dot_f32)(const float* w, const float* x, int64_t n);
  float (*dot_f16)(const uint16_t* w, const float* x, int64_t n);
  // Σ_j w_j x_j for one row of stb.sign-block.v1: w_j = scale[j / block] · (sign_j ? +1 : −1) · mask_j.
  // mask may be null (dense). block_sums[b] = Σ x over block b (used when dense: Σ w x = s·(2·Σ₊x − Σx)).
  float (*dot_sign)(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int block,
                    const float* x, const float* block_sums, int64_t n);
  void (*f16_to_f32)(const uint16_t* src, float* dst, int64_t n);
};

const Kernels& scalar_kernels();
const Kernels* avx2_kernels();  // null when the build has no AVX2 path

// The best table this CPU and OS support; STBLLM_FORCE_SCALAR=1 in the environment forces the portable one.
const Kernels& best_kernels();

float half_to_float(uint16_t h);

}  // namespace stb::cpu
