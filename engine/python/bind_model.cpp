// Python view of the runtime: Model (logits, sizes) and Generator (batched sampling). Compute releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "stbllm/model.h"

namespace py = pybind11;

namespace {

// The Python object keeps the model alive for as long as any generator over it exists.
struct GeneratorHandle {
  std::shared_ptr<stb::Model> model;
  std::unique_ptr<stb::Generator> generator;
};

struct BatchEngineHandle {
  std::shared_ptr<stb::Model> model;
  std::unique_ptr<stb::BatchEngine> engine;
};

const char* finish_name(stb::BatchEngine::Finish f) {
  switch (f) {
    case stb::BatchEngine::Finish::StopToken: return "stop";
    case stb::BatchEngine::Finish::Length: return "length";
    default: return nullptr;
  }
}

}  // namespace

stb::KvType parse_kv_type(const std::string& name) {
  if (name == "f16") return stb::KvType::F16;
  if (name == "f32") return stb::KvType::F32;
  throw py::value_error("kv_cache must be 'f16' or 'f32', got '" + name + "'");
}

void bind_model(py::module_& m) {
  py::class_<stb::Model, std::shared_ptr<stb::Model>>(m, "Model")
      .def(py::init([](const std::string& path, int threads, bool verify, const std::string& kv_cache) {
             if (threads < 0) throw py::value_error("threads must be >= 0 (0 = all cores)");
             const stb::KvType kv = parse_kv_type(kv_cache);
             py::gil_scoped_release release;
             return std::make_shared<stb::Model>(path, threads, verify, kv);
           }),
           py::arg("path"), py::arg("threads") = 0, py::arg("verify_checksums") = true, py::arg("kv_cache") = "f16")
      .def(
          "logits",
          [](stb::Model& model, const std::vector<int>& tokens) {
            const int vocab = model.config().vocab_size;
            if (tokens.empty()) throw py::value_error("logits() needs at least one token");
            py::array_t<float> out({py::ssize_t(tokens.size()), py::ssize_t(vocab)});
            float* dst = out.mutable_data();
            {
              py::gil_scoped_release release;
              auto cache = model.new_kv_cache();
              std::vector<stb::BatchRow> rows;
              std::vector<int> all;
              for (size_t i = 0; i < tokens.size(); ++i) {
                rows.push_back({0, int(i), tokens[i]});
                all.push_back(int(i));
              }
              model.forward(*cache, rows, all, dst);
            }
            return out;
          },
          py::arg("token_ids"), "Logits [T, vocab] of one fresh sequence; row t predicts token t+1.")
      .def_property_readonly("weight_bytes", &stb::Model::weight_bytes)
      .def_property_readonly("kv_bytes_per_token",
                             [](stb::Model& model) { return model.new_kv_cache()->bytes_per_token(); })
      .def_property_readonly("kv_cache",
                             [](stb::Model& model) { return model.kv_type() == stb::KvType::F16 ? "f16" : "f32"; })
      .def_property_readonly("threads", [](stb::Model& model) { return model.backend().threads(); })
      .def_property_readonly("simd", [](stb::Model& model) { return model.backend().kernels(); })
      .def(
          "profile", [](stb::Model& model) { return model.backend().profile(); },
          "{operation: (seconds, calls)} since load when the model was loaded with STBLLM_PROFILE=1, else {}.");

  py::class_<GeneratorHandle>(m, "Generator")
      .def(py::init([](std::shared_ptr<stb::Model> model, std::vector<std::vector<int>> prompts, int max_new_tokens,
                       float temperature, int top_k, float top_p, float min_p, float repetition_penalty,
                       uint64_t seed, std::vector<int> stop_token_ids, float frequency_penalty,
                       float presence_penalty) {
             stb::SamplingParams p{temperature, top_k, top_p, min_p, repetition_penalty, seed, frequency_penalty,
                                  presence_penalty};
             auto h = std::make_unique<GeneratorHandle>();
             h->model = model;
             h->generator = std::make_unique<stb::Generator>(*model, std::move(prompts), max_new_tokens, p,
                                                             std::move(stop_token_ids));
             return h;
           }),
           py::arg("model"), py::arg("prompts"), py::arg("max_new_tokens"), py::arg("temperature"), py::arg("top_k"),
           py::arg("top_p"), py::arg("min_p"), py::arg("repetition_penalty"), py::arg("seed"),
           py::arg("stop_token_ids"), py::arg("frequency_penalty") = 0.f, py::arg("presence_penalty") = 0.f)
      .def(
          "step",
          [](GeneratorHandle& h, int steps) {
            py::gil_scoped_release release;
            return h.generator->step(steps);
          },
          py::arg("steps") = 1, "Runs up to `steps` tokens per sequence; returns each sequence's new tokens.")
      .def("stop",
           [](GeneratorHandle& h, const std::vector<int>& indices) {
             for (int i : indices) h.generator->stop(i);
           })
      .def_property_readonly("done", [](const GeneratorHandle& h) { return h.generator->done(); });

  py::class_<BatchEngineHandle>(m, "BatchEngine",
                                "Continuous batching over one model (see stb::BatchEngine); drive it from one thread.")
      .def(py::init([](std::shared_ptr<stb::Model> model, int max_batch, int max_step_tokens) {
             auto h = std::make_unique<BatchEngineHandle>();
             h->model = model;
             h->engine = std::make_unique<stb::BatchEngine>(*model, max_batch, max_step_tokens);
             return h;
           }),
           py::arg("model"), py::arg("max_batch"), py::arg("max_step_tokens") = 256)
      .def(
          "add",
          [](BatchEngineHandle& h, int64_t id, std::vector<int> prompt, int max_new_tokens, float temperature,
             int top_k, float top_p, float min_p, float repetition_penalty, uint64_t seed,
             std::vector<int> stop_token_ids, float frequency_penalty, float presence_penalty) {
            stb::SamplingParams p{temperature, top_k, top_p, min_p, repetition_penalty, seed, frequency_penalty,
                                  presence_penalty};
            h.engine->add(id, std::move(prompt), max_new_tokens, p, std::move(stop_token_ids));
          },
          py::arg("id"), py::arg("prompt"), py::arg("max_new_tokens"), py::arg("temperature"), py::arg("top_k"),
          py::arg("top_p"), py::arg("min_p"), py::arg("repetition_penalty"), py::arg("seed"),
          py::arg("stop_token_ids"), py::arg("frequency_penalty") = 0.f, py::arg("presence_penalty") = 0.f,
          "Queues a request; it joins the batch at the next step. Raises ValueError when the batch is full.")
      .def("cancel", [](BatchEngineHandle& h, int64_t id) { return h.engine->cancel(id); }, py::arg("id"),
           "Removes a running request and frees its KV slot; False when it is not running.")
      .def(
          "step",
          [](BatchEngineHandle& h) {
            std::vector<stb::BatchEngine::Event> events;
            {
              py::gil_scoped_release release;
              events = h.engine->step();
            }
            py::list out;
            for (const auto& e : events) out.append(py::make_tuple(e.id, e.token, finish_name(e.finish)));
            return out;
          },
          "One forward pass over the batch; returns [(id, token, finish)] with finish None, 'stop' (a stop token) "
          "or 'length' (max_new_tokens or the context). Finished requests have left the batch.")
      .def_property_readonly("active", [](const BatchEngineHandle& h) { return h.engine->active(); })
      .def_property_readonly("max_batch", [](const BatchEngineHandle& h) { return h.engine->max_batch(); });
}
