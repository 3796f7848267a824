// Python view of an .stb file: the C++ reader validates, Python gets the JSON and zero-copy component buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "stbllm/binary_groups.h"
#include "stbllm/format.h"
#include "stbllm/qgroup.h"
#include "stbllm/rans.h"

namespace py = pybind11;

namespace {

// Keeps the mapping alive for as long as any numpy view of it exists.
struct FileHandle {
  std::shared_ptr<const stb::StbFile> file;
};

py::array component_array(const std::shared_ptr<FileHandle>& h, const std::string& tensor, const std::string& key) {
  const stb::Component& c = h->file->get(tensor).component(key);
  py::capsule owner(new std::shared_ptr<FileHandle>(h),
                    [](void* p) { delete static_cast<std::shared_ptr<FileHandle>*>(p); });
  py::array_t<uint8_t> a({py::ssize_t(c.length)}, {py::ssize_t(1)}, c.data, owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return std::move(a);
}

}  // namespace

void bind_format(py::module_& m) {
  static py::exception<stb::FormatError> format_error(m, "FormatError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const stb::FormatError& e) {
      py::set_error(format_error, e.what());
    }
  });

  m.def(
      "crc32c",
      [](py::buffer data, uint32_t crc) {
        py::buffer_info info = data.request();
        py::ssize_t expected_stride = info.itemsize;
        for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
          if (info.shape[size_t(d)] > 1 && info.strides[size_t(d)] != expected_stride)
            throw py::value_error("crc32c needs a C-contiguous buffer");
          expected_stride *= info.shape[size_t(d)];
        }
        const size_t n = size_t(info.size) * size_t(info.itemsize);
        py::gil_scoped_release release;
        return stb::crc32c(info.ptr, n, crc);
      },
      py::arg("data"), py::arg("crc") = 0, "CRC-32C of a contiguous buffer (continue from `crc`).");

  m.def(
      "rans_encode",
      [](py::array_t<uint8_t, py::array::c_style | py::array::forcecast> symbols, int alphabet) {
        std::vector<uint8_t> out;
        {
          py::gil_scoped_release release;
          out = stb::rans_encode(symbols.data(), size_t(symbols.size()), alphabet);
        }
        py::array_t<uint8_t> a({py::ssize_t(out.size())});
        std::copy(out.begin(), out.end(), a.mutable_data());
        return a;
      },
      py::arg("symbols"), py::arg("alphabet"),
      "Order-0 rANS stream of uint8 symbols < alphabet (docs/format.md, label_coder / code_coder \"rans\").");
  m.def(
      "rans_decode",
      [](py::array_t<uint8_t, py::array::c_style | py::array::forcecast> stream, size_t count, int alphabet) {
        py::array_t<uint8_t> out({py::ssize_t(count)});
        uint8_t* dst = out.mutable_data();
        const uint8_t* data = stream.data();
        const size_t length = size_t(stream.size());
        {
          py::gil_scoped_release release;
          stb::RansDecoder decoder(data, length, alphabet, "rans stream");
          decoder.decode(dst, count);
          decoder.finish();
        }
        return out;
      },
      py::arg("stream"), py::arg("count"), py::arg("alphabet"),
      "The `count` symbols of a rANS stream; raises FormatError unless the stream holds exactly those.");

  py::class_<FileHandle, std::shared_ptr<FileHandle>>(m, "StbFile")
      .def(py::init([](const std::string& path, bool verify_checksums) {
             std::shared_ptr<const stb::StbFile> f;
             {
               py::gil_scoped_release release;
               f = stb::StbFile::open(path, verify_checksums);
             }
             return std::make_shared<FileHandle>(FileHandle{f});
           }),
           py::arg("path"), py::arg("verify_checksums") = true)
      .def_property_readonly("json", [](const FileHandle& h) { return py::bytes(h.file->json_text()); })
      .def_property_readonly("format_version", [](const FileHandle& h) { return h.file->format_version(); })
      .def_property_readonly("required_features", [](const FileHandle& h) { return h.file->required_features(); })
      .def_property_readonly("file_size", [](const FileHandle& h) { return h.file->file_size(); })
      .def("component", &component_array, py::arg("tensor"), py::arg("key"),
           "Read-only uint8 view of one component's bytes (zero-copy from the mapping).")
      .def(
          "dequantize_qgroup",
          [](const FileHandle& h, const std::string& tensor) {
            const stb::TensorEntry& t = h.file->get(tensor);
            if (t.codec != stb::kCodecQGroup) throw stb::FormatError("tensor '" + tensor + "' is not stb.qgroup.v1");
            const int64_t rows = t.shape[0], cols = t.shape[1], groups = (cols + t.group - 1) / t.group;
            py::array_t<float> out({py::ssize_t(rows), py::ssize_t(cols)});
            float* dst = out.mutable_data();
            const uint16_t *scales = t.qgroup_scales(), *offsets = t.qgroup_offsets();
            std::vector<uint8_t> storage;
            const uint8_t* codes = t.qgroup_codes(storage);
            py::gil_scoped_release release;
            for (int64_t r = 0; r < rows; ++r)
              stb::qgroup_dequantize_row(codes + r * stb::qgroup_row_bytes(cols, t.bits),
                                         scales + r * groups, offsets + r * groups, t.bits, t.group, cols,
                                         dst + r * cols);
            return out;
          },
          py::arg("tensor"), "A stb.qgroup.v1 tensor dequantized by the runtime's row decoder (float32).")
      .def(
          "binary_groups_params",
          [](const FileHandle& h, const std::string& tensor) {
            const stb::TensorEntry& t = h.file->get(tensor);
            if (t.codec != stb::kCodecBinaryGroups || t.params_bits != 8)
              throw stb::FormatError("tensor '" + tensor + "' has no 8-bit binary-groups params");
            const std::vector<uint16_t> params = stb::binary_groups_expand_params(t);
            py::array_t<uint16_t> out({py::ssize_t(params.size())});
            std::copy(params.begin(), params.end(), out.mutable_data());
            return out;
          },
          py::arg("tensor"), "The fp16 bits of 8-bit stb.binary-groups.v2 params as the runtime expands them.");
}
