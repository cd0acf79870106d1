#include "model/random_weights.h"

#include <cmath>
#include <string>

#include "backend/cpu/dtype.h"
#include "backend/sampling_rng.h"
#include "model/expected_weights.h"

namespace octavo {

size_t RandomWeights::bytes() const {
  size_t total = 0;
  for (const auto& buffer : storage) total += buffer.size();
  return total;
}

RandomWeights make_random_weights(const ModelSpec& spec, DType dtype, uint64_t seed, float stddev) {
  RandomWeights out;
  const std::vector<ExpectedWeight> expected = expected_weights(spec);
  out.storage.reserve(expected.size());
  out.tensors.reserve(expected.size());
  // Uniform on [-a, a] has standard deviation a / sqrt(3).
  const float half_width = stddev * std::sqrt(3.0f);
  const char* dtype_name = cpu::dtype_name(dtype);
  for (size_t t = 0; t < expected.size(); ++t) {
    const ExpectedWeight& e = expected[t];
    int64_t count = 1;
    for (int64_t d : e.shape) count *= d;
    const bool is_norm = e.name.find("norm.weight") != std::string::npos;
    const float center = !is_norm ? 0.0f : spec.norm == NormKind::kRMSNormPlusOne ? 0.0f : 1.0f;
    const uint64_t stream = splitmix64(seed ^ splitmix64(t + 1));
    std::vector<std::byte> buffer(size_t(count) * dtype_size(dtype));
    std::byte* data = buffer.data();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) {
      const float value = center + half_width * float(2.0 * sampling_uniform(stream, uint64_t(i)) - 1.0);
      cpu::store_row(&value, 1, data, dtype, i);
    }
    out.tensors.push_back(HostTensor{e.name, dtype_name, e.shape, buffer.data()});
    out.storage.push_back(std::move(buffer));
  }
  return out;
}

}  // namespace octavo
