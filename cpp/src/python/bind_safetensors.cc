// octavo._C.SafetensorsFile: a mapped .safetensors file whose tensors come out as read-only numpy
// views into the mapping. Each view holds a reference to the SafetensorsFile object, so the mapping
// lives as long as any array made from it. numpy has no bfloat16: BF16 tensors come out as uint16
// arrays of the raw bits (torch.from_numpy(a).view(torch.bfloat16) reinterprets them).
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "model/safetensors.h"
#include "python/bindings.h"

namespace nb = nanobind;

namespace {

using octavo::DType;
using octavo::SafetensorsFile;

std::string python_dtype(const SafetensorsFile& file, const std::string& name) {
  const octavo::SafetensorsEntry& entry = file.entry(name);
  if (!entry.dtype) return entry.dtype_name;
  switch (*entry.dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return entry.dtype_name;
}

nb::tuple shape_tuple(const SafetensorsFile& file, const std::string& name) {
  nb::list dims;
  for (int64_t dim : file.entry(name).shape) dims.append(dim);
  return nb::tuple(dims);
}

nb::ndarray<nb::numpy, nb::ro> tensor_view(nb::handle self, const std::string& name) {
  const octavo::TensorView view = nb::cast<const SafetensorsFile&>(self).tensor(name);
  const std::vector<size_t> shape(view.shape.begin(), view.shape.end());
  constexpr nb::dlpack::dtype kFloat16{uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
  const nb::dlpack::dtype dtype = view.dtype == DType::kFloat32   ? nb::dtype<float>()
                                  : view.dtype == DType::kFloat16 ? kFloat16
                                                                  : nb::dtype<uint16_t>();
  // `self` as owner: the array keeps the SafetensorsFile (and so the mapping) alive.
  return nb::ndarray<nb::numpy, nb::ro>(view.data, shape.size(), shape.data(), self, nullptr, dtype);
}

}  // namespace

void bind_safetensors(nb::module_& m) {
  nb::class_<SafetensorsFile>(m, "SafetensorsFile",
                              "A .safetensors file mapped read-only. Raises ValueError naming the file when it "
                              "is missing, truncated or malformed.")
      .def(nb::init<const std::string&>(), nb::arg("path"), nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("path", &SafetensorsFile::path)
      .def("keys", &SafetensorsFile::names, "Tensor names in header order.")
      .def("metadata", &SafetensorsFile::metadata, "The header's __metadata__ as a dict of str to str.")
      .def("__len__", &SafetensorsFile::size)
      .def("__contains__", &SafetensorsFile::contains, nb::arg("name"))
      .def("dtype", &python_dtype, nb::arg("name"),
           "'float32', 'float16', 'bfloat16', or the header's name for other dtypes ('I64', ...).")
      .def("shape", &shape_tuple, nb::arg("name"), "The shape as a tuple of ints.")
      .def("tensor", &tensor_view, nb::arg("name"),
           "A read-only numpy view of an F32, F16 or BF16 tensor (BF16 as uint16 bits); zero-copy.");
  m.def("find_safetensors_files", &octavo::find_safetensors_files, nb::arg("dir"),
        "Paths of a model directory's weights: the shards of model.safetensors.index.json in order, else "
        "model.safetensors, else every *.safetensors file sorted.");
}
