// The compiled half of stbllm_rt: format access (bind_format.cpp) and the runtime (bind_model.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_format(py::module_& m);
void bind_model(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "stbllm native runtime";
  bind_format(m);
  bind_model(m);
}
