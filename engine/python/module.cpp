// The compiled half of stbllm_rt: format access (bind_format.cpp), the runtime (bind_model.cpp)
// and single matmuls for kernel tests and benchmarks (bind_linear.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_format(py::module_& m);
void bind_model(py::module_& m);
void bind_linear(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "stbllm native runtime";
  bind_format(m);
  bind_model(m);
  bind_linear(m);
}
