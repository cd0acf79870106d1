// Random weights in a spec's exact shapes, for benchmarks (throughput does not depend on weight
// values) and tests that need a model without a checkpoint.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <octavo/engine.h>
#include <octavo/model_spec.h>

#include "backend/ops.h"

namespace octavo {

/// Host weights and the HostTensor views of them; the views stay valid while this lives (moving
/// it keeps them valid: the byte buffers do not move).
struct RandomWeights {
  std::vector<std::vector<std::byte>> storage;
  std::vector<HostTensor> tensors;

  size_t bytes() const;
};

/// Every weight expected_weights(spec) names, stored in `dtype`. Matrices and biases are uniform
/// with standard deviation `stddev` (transformers initialises with 0.02); norm weights are 1 plus
/// that noise (0 plus it for the (1 + w) norms), so activations keep their scale through the
/// layers. Element i of a tensor depends only on (seed, tensor, i): the same on any thread count.
RandomWeights make_random_weights(const ModelSpec& spec, DType dtype, uint64_t seed,
                                  float stddev = 0.02f);

}  // namespace octavo
