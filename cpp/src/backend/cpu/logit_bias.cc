#include <string>

#include <octavo/error.h>

#include "backend/ops.h"

namespace octavo::cpu {

void add_logit_bias(const LogitBiasParams& p) {
  for (int32_t row = 0; row < p.num_rows; ++row) {
    float* logits = p.logits + int64_t(row) * p.vocab_size;
    for (int32_t i = p.row_offsets[row]; i < p.row_offsets[row + 1]; ++i) {
      const int32_t token = p.token_ids[i];
      if (token < 0 || token >= p.vocab_size) {
        throw InvalidArgument("logit bias: token id " + std::to_string(token) +
                              " is outside the vocabulary of " + std::to_string(p.vocab_size));
      }
      logits[token] += p.bias[i];
    }
  }
}

}  // namespace octavo::cpu
