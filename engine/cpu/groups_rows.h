// The row loop shared by the AVX2 and AVX-512 binary-groups kernels (included only by files compiled with those
// instruction sets). Per (row, block) the ISA builds the 16-entry codebook in registers; per step of 64 columns it
// expands the codes once into float weights and multiplies them into every activation row of the pass, so a
// GEMM over n rows decodes each weight ⌈n / kPassTokens⌉ times, not n times.
//
// An ISA supplies: Vec, kLanes (floats per Vec), kPassTokens and kPassRows (the largest pass: activation rows ×
// weight rows, sized to its registers), Consts consts(regions, salient_groups), Table table(params, consts), Step
// load_step(32 code bytes), Vec weights<Sub>(table, step) (columns Sub·kLanes .. +kLanes of the step), zero(),
// load(float*), fma(a, b, c), add(a, b), hsum(Vec); and kSalientChunks, with, if true, store_salient(params,
// consts, float[kSalientBook]) (a block's salient codebook, into books the caller zeroed) and Vec
// salient_weights(codebook, 4 code bytes, consts) (the 8 weights of a salient chunk; kLanes is 8 then).
//
// Salient chunks run after the row's blocks, in one loop over the matrix's chunks: its trip count is the same for
// every row, where a loop per block mispredicts its exit as the blocks' chunk counts vary. Their codebooks are
// stored before the blocks, so that no store sits between the activation loads of the steps (a store whose
// address matches a later load's modulo 4 KiB stalls that load).
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/kernels_groups.h"

namespace stb::cpu {

template <class F, int... I>
inline void unroll_each(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}

// Activations of a pass: step s of its first activation row at steps + s·step_stride, salient chunk c at
// salient + c·chunk_stride, the next activation rows 64 (8) floats further; and room for a row group's salient
// codebooks (kPassRows × blocks × kSalientBook floats, with salient chunks).
struct GroupsPassInput {
  const float* steps;
  int64_t step_stride;
  const float* salient;
  int64_t chunk_stride;
  float* salient_books;
};

// Rows [row, row + R) against NT activation rows: each activation load feeds R rows' FMAs, so the activations'
// cache traffic per weight falls R-fold. Not inlined: inside the caller, with every instantiation beside it, GCC
// kept the accumulators on the stack (a store and a reload per step: 1.6x slower on AVX2).
template <class Isa, int NT, int R>
[[gnu::noinline]] void groups_row_group(const BinaryGroupsCodes& g, const typename Isa::Consts& consts, int64_t row,
                                        const GroupsPassInput& x, float* out, int64_t out_stride) {
  constexpr int kSubs = kGroupsStep / Isa::kLanes;
  // Independent accumulators per (row, activation row): enough FMA chains in flight to hide the FMA latency.
  constexpr int kChains = std::max(1, std::min(4, 8 / (NT * R)));
  const int64_t steps = g.padded_cols / kGroupsStep, steps_per_block = g.block / kGroupsStep;
  const uint8_t* codes[R];
  const uint8_t* salient_codes[R];
  const uint16_t* params[R];
  for (int i = 0; i < R; ++i) {
    codes[i] = g.codes.data() + (row + i) * g.row_bytes();
    salient_codes[i] = codes[i] + g.step_bytes();
    params[i] = g.params.data() + (row + i) * g.blocks * g.params_per_block;
  }
  float* salient_books = x.salient_books;  // [R][blocks][kSalientBook]
  if constexpr (Isa::kSalientChunks) {
    if (!g.chunk_block.empty())
      for (int i = 0; i < R; ++i)
        for (int64_t b = 0; b < g.blocks; ++b)
          Isa::store_salient(params[i] + b * g.params_per_block, consts,
                             &salient_books[(i * g.blocks + b) * kSalientBook]);
  }
  typename Isa::Vec acc[R][NT][kChains];
  for (auto& per_row : acc)
    for (auto& per_token : per_row)
      for (auto& a : per_token) a = Isa::zero();
  for (int64_t b = 0; b < g.blocks; ++b) {
    typename Isa::Table tables[R];
    for (int i = 0; i < R; ++i) tables[i] = Isa::table(params[i] + b * g.params_per_block, consts);
    const int64_t last = std::min(steps, (b + 1) * steps_per_block);
    for (int64_t s = b * steps_per_block; s < last; ++s) {
      typename Isa::Step step[R];
      for (int i = 0; i < R; ++i) step[i] = Isa::load_step(codes[i] + s * (kGroupsStep / 2));
      const float* xs = x.steps + s * x.step_stride;
      unroll_each(
          [&](auto sub) {
            constexpr int kSub = decltype(sub)::value;
            typename Isa::Vec w[R];
            for (int i = 0; i < R; ++i) w[i] = Isa::template weights<kSub>(tables[i], step[i]);
            for (int t = 0; t < NT; ++t) {
              const auto xv = Isa::load(xs + t * kGroupsStep + kSub * Isa::kLanes);
              for (int i = 0; i < R; ++i) acc[i][t][kSub % kChains] = Isa::fma(w[i], xv, acc[i][t][kSub % kChains]);
            }
          },
          std::make_integer_sequence<int, kSubs>{});
    }
  }
  if constexpr (Isa::kSalientChunks) {
    auto chunk = [&](int64_t c, auto chain) {
      typename Isa::Vec w[R];
      for (int i = 0; i < R; ++i)
        w[i] = Isa::salient_weights(&salient_books[(i * g.blocks + g.chunk_block[c]) * kSalientBook],
                                    salient_codes[i] + c * (kGroupsChunk / 2), consts);
      for (int t = 0; t < NT; ++t) {
        const auto xv = Isa::load(x.salient + c * x.chunk_stride + t * kGroupsChunk);
        for (int i = 0; i < R; ++i) acc[i][t][chain] = Isa::fma(w[i], xv, acc[i][t][chain]);
      }
    };
    const int64_t chunks = int64_t(g.chunk_block.size());
    int64_t c = 0;
    for (; c + kChains <= chunks; c += kChains)
      unroll_each([&](auto chain) { chunk(c + chain, chain); }, std::make_integer_sequence<int, kChains>{});
    for (; c < chunks; ++c) chunk(c, std::integral_constant<int, 0>{});
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t) {
      auto sum = acc[i][t][0];
      for (int c = 1; c < kChains; ++c) sum = Isa::add(sum, acc[i][t][c]);
      out[t * out_stride + row + i] = Isa::hsum(sum);
    }
}

// Rows [row0, row1) against NT activation rows, R rows at a time.
template <class Isa, int NT, int R>
void groups_rows_pass(const BinaryGroupsCodes& g, const typename Isa::Consts& consts, int64_t row0, int64_t row1,
                      const GroupsPassInput& x, float* out, int64_t out_stride) {
  int64_t r = row0;
  for (; r + R <= row1; r += R) groups_row_group<Isa, NT, R>(g, consts, r, x, out, out_stride);
  for (; r < row1; ++r) groups_row_group<Isa, NT, 1>(g, consts, r, x, out, out_stride);
}

// x in step-major order (kernels_groups.h); n activation rows in passes of Isa::kPassTokens (then halving),
// kPassRows weight rows at a time when more than one activation row shares the pass.
template <class Isa, int NT = Isa::kPassTokens>
int groups_rows_largest_pass(const BinaryGroupsCodes& g, const typename Isa::Consts& consts, int64_t row0,
                             int64_t row1, const GroupsPassInput& x, int left, float* out, int64_t out_stride) {
  if constexpr (NT > 1) {
    if (left < NT) return groups_rows_largest_pass<Isa, NT / 2>(g, consts, row0, row1, x, left, out, out_stride);
  }
  groups_rows_pass<Isa, NT, NT == 1 ? 1 : Isa::kPassRows>(g, consts, row0, row1, x, out, out_stride);
  return NT;
}

template <class Isa>
void groups_rows(const BinaryGroupsCodes& g, int64_t row0, int64_t row1, const float* x, int n, float* out,
                 int64_t out_stride) {
  const auto consts = Isa::consts(g.regions, g.salient_groups);
  const float* salient = x + n * g.padded_cols;
  std::vector<float> salient_books(Isa::kSalientChunks ? size_t(Isa::kPassRows * g.blocks * kSalientBook) : 0);
  for (int t = 0; t < n;) {
    const GroupsPassInput pass{x + t * kGroupsStep, int64_t(n) * kGroupsStep, salient + t * kGroupsChunk,
                               int64_t(n) * kGroupsChunk, salient_books.data()};
    t += groups_rows_largest_pass<Isa>(g, consts, row0, row1, pass, n - t, out + t * out_stride, out_stride);
  }
}

}  // namespace stb::cpu
