// What a request produces, step by step.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace octavo {

using RequestId = uint64_t;

enum class FinishReason : uint8_t {
  kNone,    // still running
  kLength,  // max_tokens or max_model_len reached
  kStop,    // EOS or a stop token sampled
  kAbort,   // aborted by the caller (or rejected: error holds why)
};

const char* to_string(FinishReason reason);  // "length", "stop", "abort", "" for kNone

/// One token's log-probabilities: the sampled token's, and the top-N when asked.
struct TokenLogprobs {
  float logprob = 0.0f;               // of the sampled token
  int32_t rank = 0;                   // 1-based rank of the token (0 when not in the top-N)
  std::vector<int32_t> top_ids;       // descending probability
  std::vector<float> top_logprobs;
};

/// The tokens a step added to one request, and whether it finished.
struct RequestOutput {
  RequestId id = 0;        // the sequence
  RequestId group_id = 0;  // the request add_request returned (== id for its first sequence)
  int index = 0;           // the sequence's index among the request's n
  std::vector<int32_t> new_token_ids;
  std::vector<TokenLogprobs> new_logprobs;  // one per new token when logprobs were asked for
  /// Prompt logprobs computed this step (prompt_logprobs asked), for the prompt positions that
  /// follow those already reported, in order: entry k of the whole stream is prompt token k + 1.
  /// rank is the token's exact rank in the vocabulary.
  std::vector<TokenLogprobs> new_prompt_logprobs;
  float cumulative_logprob = 0.0f;          // over every output token so far
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  int32_t stop_token_id = -1;               // the stop token that ended it, if any
  std::string error;                        // set when the request was rejected
};

}  // namespace octavo
