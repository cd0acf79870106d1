// The engine's record of one request: its tokens, where it stands and how it samples.
#pragma once

#include <cstdint>
#include <utility>
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
  // Prompt, then every output token. With async scheduling the last may be a deferred id
  // (has_pending_token) while the step that samples it runs.
  std::vector<int32_t> token_ids;
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

  // Penalties: the row of the token-count table this sequence owns while it runs (-1: none; a
  // preempted sequence gives it back and rebuilds it when it samples again), and how many of its
  // output tokens that row has counted.
  int32_t penalty_slot = -1;
  int penalty_counted_outputs = 0;
  // Prompt logprobs: the next prompt position whose logits are still to report (position p gives
  // the logprob of prompt token p + 1). A recompute after preemption reports nothing twice.
  int next_prompt_logprob_position = 0;

  // Beam search: the group this beam belongs to (0: not a beam), its cumulative logprob in
  // double (ranking compares sums of many terms), each output token's logprob, and the
  // candidates (token, logprob) it proposed this round while it waits for its siblings.
  RequestId beam_group = 0;
  double beam_cumulative_logprob = 0.0;
  std::vector<float> beam_logprobs;
  std::vector<std::pair<int32_t, float>> beam_candidates;
  bool beam_ready = false;

  int num_tokens() const { return int(token_ids.size()); }
  /// The last token is a deferred id (-1 - row): sampled by the step in flight, not yet read.
  bool has_pending_token() const { return !token_ids.empty() && token_ids.back() < 0; }
  int num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  bool finished() const { return status == RequestStatus::kFinished; }
  /// Every prompt position still needs its logits: the prefix cache cannot skip any.
  bool needs_prompt_logits() const {
    return params.prompt_logprobs.has_value() && next_prompt_logprob_position < num_prompt_tokens - 1;
  }
};

}  // namespace octavo
