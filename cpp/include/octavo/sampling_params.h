// How one request samples and when it stops. Names and meanings follow vLLM's SamplingParams.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace octavo {

struct SamplingParams {
  /// Sequences sampled from the prompt. The prompt is prefilled once; after its first token the
  /// other n - 1 sequences fork from it, sharing its KV blocks (copy-on-write).
  int n = 1;
  float temperature = 1.0f;  // >= 0; 0 is greedy
  float top_p = 1.0f;        // (0, 1]; 1 is off
  int top_k = 0;             // 0 or -1 is off; else >= 1
  float min_p = 0.0f;        // [0, 1]; 0 is off
  std::optional<uint64_t> seed;  // unset: drawn from the engine's seed and the request id
  /// Most tokens to generate; unset: until max_model_len.
  std::optional<int> max_tokens = 16;
  int min_tokens = 0;        // EOS and stop_token_ids are suppressed until this many are out
  std::vector<int32_t> stop_token_ids;  // finish ("stop") when one is sampled; it stays in the output
  bool ignore_eos = false;
  int logprobs = 0;          // top-N logprobs reported per output token, [0, 20]; 0: only the sampled one
  bool want_logprobs = false;  // report logprobs at all (vLLM: logprobs is not None)
  /// (token id, bias) pairs added to the logits before sampling; ids must be in the vocabulary.
  std::vector<std::pair<int32_t, float>> logit_bias;

  /// Throws InvalidArgument naming the first field outside its range.
  void validate() const;
};

}  // namespace octavo
