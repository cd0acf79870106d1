// octavo's model directory from Python: `octavo export` writes octavo.json through the C++ writer
// (one format, defined in C++), converts weights with the engine's own rounding, and tests load an
// exported directory the way a native program does.
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <octavo/engine.h>
#include <octavo/error.h>
#include <octavo/model_dir.h>

#include "model/dtype_convert.h"
#include "model/expected_weights.h"
#include "python/bindings.h"
#include "python/weights.h"

namespace nb = nanobind;
using namespace octavo;

namespace {

// The numpy dtype that holds an octavo dtype's bits: numpy has no bfloat16, so it travels as uint16.
nb::dlpack::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return nb::dtype<float>();
    case DType::kFloat16: return nb::dlpack::dtype{uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
    case DType::kBFloat16: return nb::dtype<uint16_t>();
  }
  return nb::dtype<float>();
}

nb::ndarray<nb::numpy> convert_weight(const HostArray& array, const std::string& from,
                                      const std::string& to) {
  const DType src = parse_dtype(from, "convert_weight: source");
  const DType dst = parse_dtype(to, "convert_weight: target");
  if (array.dtype() != numpy_dtype(src)) {
    throw InvalidArgument("convert_weight: the array's numpy dtype does not hold " + from +
                          " (float32, float16, or uint16 bits for bfloat16)");
  }
  const size_t count = array.size();
  auto* out = new std::vector<std::byte>(count * dtype_size(dst));
  nb::capsule owner(out, [](void* p) noexcept { delete static_cast<std::vector<std::byte>*>(p); });
  {
    nb::gil_scoped_release release;
    convert_dtype(array.data(), src, out->data(), dst, count);
  }
  std::vector<size_t> shape(array.ndim());
  for (size_t d = 0; d < array.ndim(); ++d) shape[d] = array.shape(d);
  return nb::ndarray<nb::numpy>(out->data(), shape.size(), shape.data(), owner, nullptr,
                                numpy_dtype(dst));
}

std::vector<std::pair<std::string, std::vector<int64_t>>> expected_weight_list(const ModelSpec& spec) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (ExpectedWeight& e : expected_weights(spec)) out.emplace_back(std::move(e.name), std::move(e.shape));
  return out;
}

}  // namespace

void bind_model_dir(nb::module_& m) {
  m.attr("MODEL_DIR_FORMAT_VERSION") = kModelDirFormatVersion;
  m.def("model_spec_to_json", nb::overload_cast<const ModelSpec&>(&to_json), nb::arg("spec"),
        "The spec as JSON, as octavo.json's model_spec holds it.");
  m.def("model_spec_from_json", &model_spec_from_json, nb::arg("json"),
        "Parses and validates a ModelSpec JSON object; ValueError names the bad field.");
  m.def(
      "model_dir_config_to_json",
      [](const ModelSpec& spec, const std::string& dtype, const std::vector<int32_t>& eos) {
        return to_json(ModelDirConfig{spec, dtype, eos});
      },
      nb::arg("spec"), nb::arg("dtype"), nb::arg("eos_token_ids"), "The text of octavo.json.");
  m.def(
      "read_model_dir_config",
      [](const std::string& dir) {
        ModelDirConfig config = read_model_dir_config(dir);
        return std::make_tuple(config.spec, config.dtype, config.eos_token_ids);
      },
      nb::arg("dir"), "(spec, dtype, eos_token_ids) from DIR/octavo.json.");
  m.def("expected_weights", &expected_weight_list, nb::arg("spec"),
        "[(canonical name, shape)] of every weight the spec needs, in the engine's order.");
  m.def("convert_weight", &convert_weight, nb::arg("array"), nb::arg("from_dtype"),
        nb::arg("to_dtype"),
        "A copy of `array` converted between float32, float16 and bfloat16 (uint16 bits) with "
        "the engine's rounding (nearest, ties to even).");
  m.def(
      "engine_from_model_dir",
      [](const EngineConfig& config) {
        nb::gil_scoped_release release;
        return new Engine(config);
      },
      nb::arg("config"), nb::rv_policy::take_ownership,
      "Engine(config) loading the octavo model directory config.model, as a native program does.");
}
