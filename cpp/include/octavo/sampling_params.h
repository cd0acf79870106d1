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
  /// vLLM's penalties, applied after logit_bias and before temperature: frequency_penalty times
  /// a token's output count plus presence_penalty (once) are subtracted from the logit of every
  /// token already generated, each in [-2, 2]; repetition_penalty (> 0, 1 = off) divides the
  /// positive logits and multiplies the negative ones of every token in the prompt or output.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  /// Top-N logprobs reported for every prompt token after the first (unset: none; 0: only the
  /// prompt token's own), [0, 20]. Such a request bypasses the prefix cache for its lookup, as
  /// every prompt position needs its logits.
  std::optional<int> prompt_logprobs;
  /// Beam search with this many beams (0: off), vLLM's LLM.beam_search semantics: every step each
  /// live beam proposes its 2 * beam_width most likely tokens; candidates ending in EOS (unless
  /// ignore_eos) are set aside as finished, the best beam_width others live on, ranked by
  /// cumulative logprob / (prompt + output length) ** length_penalty (an ending EOS not
  /// counted). After max_tokens steps the best beam_width of finished and live beams are
  /// returned, each as one finished output (index = rank) holding all its tokens. Sampling
  /// settings other than max_tokens and ignore_eos do not apply. [1, 10].
  int beam_width = 0;
  float length_penalty = 1.0f;

  bool has_penalties() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f;
  }

  /// Throws InvalidArgument naming the first field outside its range.
  void validate() const;
};

}  // namespace octavo
