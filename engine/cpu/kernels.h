// CPU compute kernels, one table per instruction set, chosen at run time (never by compile flags: CI machines
// differ, and an AVX-512 instruction on the AMD EPYC runners is a SIGILL).
//
// Binary weights multiply int8 activations. Before a sign-block matmul each activation row is quantized in groups
// of kQ8Group values: q = round_half_even(x · 127 / max|x|), d = max|x| / 127 (the same rule in every path, so
// the quantized rows are bit-identical everywhere). A dot product is then integer arithmetic inside each group:
// Σ_b α_b Σ_g d_g Σ_j w_j q_j with w_j in {−1, 0, +1}.
#pragma once
#include <cstdint>

namespace stb::cpu {

constexpr int kQ8Group = 64;  // activation quantization group; every sign-block block is a multiple of it

inline int64_t q8_groups(int64_t cols) { return (cols + kQ8Group - 1) / kQ8Group; }

struct SignLutKernels;  // engine/cpu/sign_lut.h
struct GroupsKernels;   // engine/cpu/kernels_groups.h
struct Int8TileKernels; // engine/cpu/int8_tiles.h
struct QGroupTileKernels; // engine/cpu/qgroup_tiles.h

struct Kernels {
  const char* name;
  float (*dot_f32)(const float* w, const float* x, int64_t n);
  // One fp16 weight row against n activation rows (x_t = x + t · cols): out[t · out_stride] = Σ_j w_j · x_t[j], each
  // the same bits as for that row alone; SIMD paths convert each weight vector once for several rows.
  void (*dot_f16_rows)(const uint16_t* w, const float* x, int n, int64_t cols, float* out, int64_t out_stride);
  void (*f16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  // The attention of one row for `heads` query heads sharing one KV head (engine/cpu/attend.h): q and out
  // [heads, hd]; scores[h · len + j − first] = dot(k_j, q_h) · scale for the positions j in [first, last]
  // (k_j = keys + j · kv_stride, len = last − first + 1), softmax with exp_weights' exp and a double sum,
  // out_h = Σ_j p_hj · v_j summed in order j. The paths differ only in the dot products' summation order.
  void (*attend)(const float* q, int heads, const float* keys, const float* values, int64_t kv_stride, int first,
                 int last, int hd, float scale, float* scores, float* out);
  // The same over fp16 keys and values (a KvType::F16 cache), each converted to float before use.
  void (*attend_f16)(const float* q, int heads, const uint16_t* keys, const uint16_t* values, int64_t kv_stride,
                     int first, int last, int hd, float scale, float* scores, float* out);
  // dst[i] = float_to_half(src[i]) for i < n, bit-identical on every path (F16C rounds to nearest even too).
  void (*f32_to_f16)(const float* src, uint16_t* dst, int64_t n);
  // up[i] = silu(gate[i]) · up[i] for i < n (gate null: up[i] = silu(up[i])), bit-identical on every path
  // (engine/cpu/silu.h).
  void (*silu_gate)(const float* gate, float* up, int64_t n);
  // out[i] = e^(logits[i] / temperature − top) for i < n with the same exp, bit-identical on every path (the
  // sampler's softmax weights; top = max(logits) / temperature keeps them ≤ 1).
  void (*exp_weights)(const float* logits, float temperature, float top, float* out, int64_t n);
  // x[cols] -> q[q8_groups(cols) * kQ8Group] (zero padded), d[q8_groups(cols)].
  void (*quantize_q8)(const float* x, int64_t cols, int8_t* q, float* d);
  // One stb.sign-block.v1 weight row against n quantized activation rows (q: n × q8_groups(cols)·kQ8Group int8,
  // d: n × q8_groups(cols) scales): out[t · out_stride] = Σ_j α[j / block] · d_t[j / 64] · w_j · q_t[j], where
  // w_j = +1 / −1 by the sign bit, 0 where the mask (if any) is clear or j ≥ cols. scratch: q8_groups(cols)·64 bytes.
  void (*sign_row_q8)(const uint64_t* signs, const uint64_t* mask, const uint16_t* scales, int block, int64_t cols,
                      const int8_t* q, const float* d, int n, float* out, int64_t out_stride, int8_t* scratch);
  // One stb.int8-group.v1 weight row (w: q8_groups(cols)·64 int8, ws: its fp16 group scales) against n quantized
  // activation rows: out[t · out_stride] = Σ_g ws_g · d_t[g] · Σ_j w_j · q_t[j].
  void (*int8_row_q8)(const int8_t* w, const uint16_t* ws, int64_t cols, const int8_t* q, const float* d, int n,
                      float* out, int64_t out_stride);
  // One stb.qgroup.v1 weight row (codes: its qgroup_row_bytes(cols, bits) bytes; scales, offsets: fp16 per group of
  // `group` columns) against n quantized activation rows, each with its group sums xsum (qgroup_activation_sums):
  // out[t · out_stride] = Σ_j scale_g(j) · code_j · d_t[j / 64] · q_t[j] + Σ_g offset_g · xsum_t[g].
  // scratch: qgroup_chunks(cols) · 32 bytes.
  void (*qgroup_row_q8)(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets, int bits, int group,
                        int64_t cols, const int8_t* q, const float* d, const float* xsum, int n, float* out,
                        int64_t out_stride, uint8_t* scratch);
  // Table-lookup sign-block matmul on repacked weights; null on paths without it (they use sign_row_q8).
  const SignLutKernels* sign_lut;
  // stb.binary-groups.v2 on repacked codes; null on paths without it (they use dot_binary_groups on the planes).
  const GroupsKernels* groups;
  // stb.int8-group.v1 on repacked 16-row tiles; null on paths without it (they use int8_row_q8).
  const Int8TileKernels* int8_tiles;
  // stb.qgroup.v1 on repacked 16-row tiles; null on paths without it (they use qgroup_row_q8).
  const QGroupTileKernels* qgroup_tiles;
};

// xsum[t · groups + g] = Σ over the 32-column chunks c of group g of d_t[c / 2] · Σ_{j in c} q_t[j], for n quantized
// activation rows of `cols` inputs (the offset term of stb.qgroup.v1; groups = ⌈cols / group⌉). Portable: it is a
// small share of a matmul.
void qgroup_activation_sums(const int8_t* q, const float* d, int64_t cols, int group, int n, float* xsum);

const Kernels& scalar_kernels();
const Kernels* avx2_kernels();    // null when the build has no AVX2 path
const Kernels* avx512_kernels();  // null when the build has no AVX-512 path

// The best table this CPU and OS support. STBLLM_KERNELS=scalar|avx2|avx512 in the environment picks a lower one
// (for tests and comparisons); asking for one the machine lacks falls back to the best available.
const Kernels& best_kernels();
bool cpu_has_avx512_vnni();  // AVX-512 F/BW/VL/DQ and VNNI, enabled by the OS

float half_to_float(uint16_t h);
// float32 -> fp16 bits, rounded to nearest even with subnormals (numpy's astype(float16)); from 65520 up: inf.
uint16_t float_to_half(float f);

}  // namespace stb::cpu
