// Weights as Python hands them to the engines: (canonical name, dtype, contiguous host array)
// tuples, viewed as HostTensors without a copy. Shared by bind_engine.cc and bind_async_engine.cc.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <nanobind/ndarray.h>

#include <octavo/engine.h>

using HostArray = nanobind::ndarray<nanobind::ro, nanobind::c_contig, nanobind::device::cpu>;
using WeightTuple = std::tuple<std::string, std::string, HostArray>;

/// Views of `weights`' arrays: valid while `weights` lives, so the GIL may be released while an
/// engine copies them.
inline std::vector<octavo::HostTensor> to_host_tensors(const std::vector<WeightTuple>& weights) {
  std::vector<octavo::HostTensor> tensors;
  tensors.reserve(weights.size());
  for (const auto& [name, dtype, array] : weights) {
    octavo::HostTensor t;
    t.name = name;
    t.dtype = dtype;
    for (size_t d = 0; d < array.ndim(); ++d) t.shape.push_back(int64_t(array.shape(d)));
    t.data = array.data();
    tensors.push_back(std::move(t));
  }
  return tensors;
}
