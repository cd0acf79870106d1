// The canonical weights a ModelSpec calls for, with their shapes: what the executor loads and
// checks, what `octavo export` and save_model_dir() write, and what octavo_bench fills with random
// values. One list, so the three cannot disagree.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <octavo/model_spec.h>

namespace octavo {

struct ExpectedWeight {
  std::string name;
  std::vector<int64_t> shape;
};

/// Every canonical weight the spec needs, with its shape (model_spec.h lists the names), in a
/// fixed order: embeddings, layer by layer, final norm, LM head.
std::vector<ExpectedWeight> expected_weights(const ModelSpec& spec);

}  // namespace octavo
