// The engine's record of one request: its tokens, where it stands and how it samples.
#pragma once

#include <cstdint>
#include <vector>

#include <octavo/request.h>
#include <octavo/sampling_params.h>

namespace octavo {

enum class RequestStatus : uint8_t { kWaiting, kRunning, kPreempted, kFinished };

struct RequestState {
  RequestId id = 0;
  RequestId group_id = 0;      // the request's first sequence; its forks share it
  int index = 0;               // sequence index in the group
  int num_pending_forks = 0;   // n - 1 until the prompt's first token is sampled, then 0
  std::vector<int32_t> token_ids;  // prompt, then every output token
  int num_prompt_tokens = 0;
  SamplingParams params;
  uint64_t seed = 0;               // resolved: the params' or one derived from the engine's
  int max_num_tokens = 0;          // prompt + max_tokens, capped at max_model_len
  RequestStatus status = RequestStatus::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  int32_t stop_token_id = -1;
  // Tokens whose KV is in the cache (or is being written by the step in flight). A preempted
  // request restarts from 0 and recomputes prompt and output alike (prefix-cache hits aside).
  int num_computed_tokens = 0;
  float cumulative_logprob = 0.0f;

  int num_tokens() const { return int(token_ids.size()); }
  int num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  bool finished() const { return status == RequestStatus::kFinished; }
};

}  // namespace octavo
