// One matmul of the CPU backend on weights given as numpy arrays: lets tests compare every kernel path with a
// numpy reference on arbitrary shapes, and `stbllm-bench kernels` time a single GEMV/GEMM.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>

#include "stbllm/backend.h"
#include "stbllm/model.h"
#include "stbllm/qgroup.h"

namespace py = pybind11;

stb::KvType parse_kv_type(const std::string& name);  // "f16" / "f32" (bind_model.cpp)

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

struct Linear {
  stb::Matrix matrix;
  std::vector<py::object> keep_alive;  // the arrays the matrix points into
  std::unique_ptr<stb::Backend> backend;

  py::array_t<float> forward(const Array<float>& x) {
    if (x.ndim() != 2 || x.shape(1) != matrix.cols)
      throw py::value_error("x must have shape [n, " + std::to_string(matrix.cols) + "]");
    const int n = int(x.shape(0));
    py::array_t<float> y({py::ssize_t(n), py::ssize_t(matrix.rows)});
    float* dst = y.mutable_data();
    const float* src = x.data();
    py::gil_scoped_release release;
    backend->linear(matrix, src, n, dst);
    return y;
  }

  // Seconds per call, the minimum over `repeats` rounds of `iters` calls each.
  double time(const Array<float>& x, int iters, int repeats) {
    const int n = int(x.shape(0));
    std::vector<float> y(size_t(n) * matrix.rows);
    py::gil_scoped_release release;
    backend->linear(matrix, x.data(), n, y.data());  // warm-up
    double best = 1e30;
    for (int r = 0; r < repeats; ++r) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) backend->linear(matrix, x.data(), n, y.data());
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters);
    }
    return best;
  }
};

}  // namespace

void bind_linear(py::module_& m) {
  m.def(
      "activation",
      [](py::object gate, const Array<float>& up, bool silu, int threads) {
        Array<float> out(std::vector<py::ssize_t>(up.shape(), up.shape() + up.ndim()));  // the backend writes in place
        std::copy(up.data(), up.data() + up.size(), out.mutable_data());
        Array<float> g;
        if (!gate.is_none()) {
          g = Array<float>::ensure(gate);
          if (!g || g.size() != up.size()) throw py::value_error("gate and up must have the same size");
        }
        auto backend = stb::make_cpu_backend(threads);
        const float* gp = gate.is_none() ? nullptr : g.data();
        float* dst = out.mutable_data();
        {
          py::gil_scoped_release release;
          backend->activation(gp, dst, size_t(out.size()), silu);
        }
        return py::make_tuple(out, backend->kernels());
      },
      py::arg("gate"), py::arg("up"), py::arg("silu") = true, py::arg("threads") = 1,
      "The CPU backend's gated activation on copies: (silu(gate) or relu(gate)) * up, or of up alone when gate is "
      "None; returns (result, kernel path).");
  m.def(
      "attention",
      [](const Array<float>& q, const Array<float>& k, const Array<float>& v, int heads, int kv_heads,
         int sliding_window, int threads, const std::string& kv_cache) {
        const stb::KvType kv = parse_kv_type(kv_cache);
        // Prefill of one sequence: row i is position i, keys and values stored into a fresh one-layer cache.
        if (q.ndim() != 2 || k.ndim() != 2 || v.ndim() != 2 || heads <= 0 || kv_heads <= 0 || heads % kv_heads ||
            q.shape(1) % heads || k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) ||
            k.shape(1) != q.shape(1) / heads * kv_heads || v.shape(1) != k.shape(1))
          throw py::value_error("attention needs q [n, heads * hd] and k, v [n, kv_heads * hd]");
        const int n = int(q.shape(0)), hd = int(q.shape(1) / heads);
        Array<float> out({py::ssize_t(n), py::ssize_t(q.shape(1))});
        auto backend = stb::make_cpu_backend(threads);
        {
          py::gil_scoped_release release;
          auto cache = backend->new_kv_cache(1, kv_heads, hd, kv);
          cache->reserve(0, n);
          std::vector<stb::RowInfo> rows(n);
          for (int i = 0; i < n; ++i) rows[i] = {0, i};
          backend->attention(*cache, 0, q.data(), k.data(), v.data(), n, rows.data(),
                             stb::AttentionShape{heads, kv_heads, hd, sliding_window}, out.mutable_data());
        }
        return py::make_tuple(out, backend->kernels());
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("heads"), py::arg("kv_heads"), py::arg("sliding_window") = 0,
      py::arg("threads") = 1, py::arg("kv_cache") = "f32",
      "The CPU backend's causal attention over one sequence's prefill (row i at position i, GQA, optional sliding "
      "window) with a float32 or fp16 KV cache; returns (out [n, heads * hd], kernel path).");
  m.def(
      "exp_weights",
      [](const Array<float>& logits, float temperature) {
        if (logits.ndim() != 1 || logits.size() == 0 || !(temperature > 0))
          throw py::value_error("exp_weights needs a non-empty 1-D array and a temperature > 0");
        Array<float> out(logits.size());
        stb::softmax_weights(logits.data(), int(logits.size()), temperature, out.mutable_data());
        return py::make_tuple(out, stb::make_cpu_backend(1)->kernels());
      },
      py::arg("logits"), py::arg("temperature"),
      "The sampler's softmax weights e^(logits / temperature - max(logits) / temperature) by the CPU kernels; "
      "returns (weights, kernel path).");
  py::class_<Linear>(m, "Linear")
      .def(py::init([](const std::string& codec, int64_t rows, int64_t cols, py::object values, py::object signs,
                       py::object mask, py::object scales, int block, py::object bias, int threads,
                       py::object labels, py::object salient, py::object residual, py::object params, int regions,
                       py::object offsets, int bits, int group, py::object salient_labels) {
             auto l = std::make_unique<Linear>();
             stb::Matrix& mt = l->matrix;
             // Converts, checks the exact shape (the kernels trust it), and keeps the array alive.
             auto take = [&](auto tag, py::object o, const char* what, std::vector<int64_t> shape) {
               using T = decltype(tag);
               if (o.is_none()) throw py::value_error(std::string(what) + " is required for codec " + codec);
               auto a = Array<T>::ensure(o);
               if (!a) throw py::value_error(std::string(what) + " has the wrong dtype");
               std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
               if (got != shape) throw py::value_error(std::string(what) + " has the wrong shape");
               l->keep_alive.push_back(a);
               return a.data();
             };
             if (rows < 1 || cols < 1) throw py::value_error("rows and cols must be positive");
             mt.rows = rows, mt.cols = cols;
             if (codec == "f32") {
               mt.codec = stb::MatrixCodec::F32, mt.values = take(float{}, values, "values", {rows, cols});
             } else if (codec == "f16") {
               mt.codec = stb::MatrixCodec::F16, mt.values = take(uint16_t{}, values, "values", {rows, cols});
             } else if (codec == "sign-block") {
               if (block % 64 || block < 64 || block > 4096) throw py::value_error("block must be a multiple of 64 in [64, 4096]");
               mt.codec = stb::MatrixCodec::SignBlock, mt.block = block;
               mt.words_per_row = int((cols + 63) / 64), mt.blocks_per_row = int((cols + block - 1) / block);
               mt.signs = take(uint64_t{}, signs, "signs", {rows, mt.words_per_row});
               mt.scales = take(uint16_t{}, scales, "scales", {rows, mt.blocks_per_row});
               if (!mask.is_none()) mt.mask = take(uint64_t{}, mask, "mask", {rows, mt.words_per_row});
             } else if (codec == "int8-group") {
               mt.codec = stb::MatrixCodec::Int8Group, mt.groups_per_row = int((cols + 63) / 64);
               mt.values = take(int8_t{}, values, "values", {rows, int64_t(mt.groups_per_row) * 64});
               mt.scales = take(uint16_t{}, scales, "scales", {rows, mt.groups_per_row});
             } else if (codec == "binary-groups") {  // planes as in the file (docs/format.md)
               if (block % 64 || block < 64 || block > 4096)
                 throw py::value_error("block must be a multiple of 64 in [64, 4096]");
               if (regions < 1 || regions > 3) throw py::value_error("regions must be 1, 2 or 3");
               mt.codec = stb::MatrixCodec::BinaryGroups, mt.block = block, mt.regions = regions;
               mt.words_per_row = int((cols + 63) / 64), mt.blocks_per_row = int((cols + block - 1) / block);
               mt.label_planes = regions > 2 ? 2 : regions - 1, mt.params_per_block = 2 * regions + 4 * (salient_labels.is_none() ? 1 : 2);
               mt.signs = take(uint64_t{}, signs, "signs", {rows, mt.words_per_row});
               if (!mask.is_none()) mt.mask = take(uint64_t{}, mask, "mask", {rows, mt.words_per_row});
               if (mt.label_planes)
                 mt.labels = take(uint64_t{}, labels, "labels", {mt.label_planes, rows, mt.words_per_row});
               mt.salient = take(uint64_t{}, salient, "salient", {mt.words_per_row});
               for (int i = 0; i < mt.words_per_row; ++i) mt.salient_columns += __builtin_popcountll(mt.salient[i]);
               if (cols % 64 && mt.salient[mt.words_per_row - 1] >> (cols % 64))
                 throw py::value_error("salient has bits past the last column");
               if (mt.salient_columns)
                 mt.residual = take(uint64_t{}, residual, "residual", {(rows * mt.salient_columns + 63) / 64});
               if (!salient_labels.is_none()) {  // ARB's column-group bitmap: two salient groups
                 mt.salient_groups = 2;
                 if (mt.salient_columns)
                   mt.salient_labels = take(uint64_t{}, salient_labels, "salient_labels",
                                            {(rows * mt.salient_columns + 63) / 64});
               }
               mt.params = take(uint16_t{}, params, "params", {rows, mt.blocks_per_row, mt.params_per_block});
             } else if (codec == "qgroup") {  // the file's components (docs/format.md)
               if (bits < 2 || bits > 4) throw py::value_error("bits must be 2, 3 or 4");
               if (group % stb::kQGroupChunk || group < stb::kQGroupChunk || group > 4096)
                 throw py::value_error("group must be a multiple of 32 in [32, 4096]");
               mt.codec = stb::MatrixCodec::QGroup, mt.bits = bits, mt.block = group;
               mt.blocks_per_row = int((cols + group - 1) / group);
               mt.values = take(uint8_t{}, values, "values", {rows, stb::qgroup_row_bytes(cols, bits)});
               mt.scales = take(uint16_t{}, scales, "scales", {rows, mt.blocks_per_row});
               mt.offsets = take(uint16_t{}, offsets, "offsets", {rows, mt.blocks_per_row});
             } else {
               throw py::value_error("codec must be f32, f16, sign-block, int8-group, binary-groups or qgroup");
             }
             if (!bias.is_none()) mt.bias = take(float{}, bias, "bias", {rows});
             l->backend = stb::make_cpu_backend(threads);
             l->backend->pack_matrix(mt);
             return l;
           }),
           py::arg("codec"), py::arg("rows"), py::arg("cols"), py::arg("values") = py::none(),
           py::arg("signs") = py::none(), py::arg("mask") = py::none(), py::arg("scales") = py::none(),
           py::arg("block") = 128, py::arg("bias") = py::none(), py::arg("threads") = 0,
           py::arg("labels") = py::none(), py::arg("salient") = py::none(), py::arg("residual") = py::none(),
           py::arg("params") = py::none(), py::arg("regions") = 3, py::arg("offsets") = py::none(),
           py::arg("bits") = 4, py::arg("group") = 64, py::arg("salient_labels") = py::none())
      .def("forward", &Linear::forward, py::arg("x"))
      .def("time", &Linear::time, py::arg("x"), py::arg("iters") = 10, py::arg("repeats") = 3)
      .def_property_readonly("kernels", [](const Linear& l) { return l.backend->kernels(); })
      // Bytes of the backend's repacked form (what a model holds for this matrix); 0 when it uses the planes.
      .def_property_readonly("weight_bytes", [](const Linear& l) { return l.matrix.bytes; });
  m.def(
      "linears",
      [](const std::vector<Linear*>& lins, const Array<float>& x) {
        if (lins.empty() || x.ndim() != 2) throw py::value_error("linears needs matrices and x [n, cols]");
        std::vector<const stb::Matrix*> ws;
        std::vector<py::array_t<float>> outs;
        std::vector<float*> dst;
        for (Linear* l : lins) {
          if (l->matrix.cols != x.shape(1)) throw py::value_error("every matrix must take x's width");
          ws.push_back(&l->matrix);
          outs.emplace_back(std::vector<py::ssize_t>{x.shape(0), py::ssize_t(l->matrix.rows)});
          dst.push_back(outs.back().mutable_data());
        }
        {
          // The first matrix's backend runs them all; the others' repacked forms live in their own backends.
          py::gil_scoped_release release;
          lins[0]->backend->linears(ws.data(), int(ws.size()), x.data(), int(x.shape(0)), dst.data());
        }
        return outs;
      },
      py::arg("linears"), py::arg("x"),
      "Backend::linears: several matrices of one input width on the same x, run by the first one's backend; "
      "returns their outputs.");
}
