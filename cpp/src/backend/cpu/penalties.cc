// CPU reference of the penalty ops and of prompt-token logprobs (contracts in backend/ops.h).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <octavo/error.h>

#include "backend/ops.h"

namespace octavo::cpu {

namespace {

std::string str(long long value) { return std::to_string(value); }

constexpr int32_t kOutputCountMask = kPromptTokenBit - 1;

float softcapped(float x, float cap) { return cap > 0.0f ? cap * std::tanh(x / cap) : x; }

}  // namespace

void update_token_counts(const TokenCountParams& p) {
  for (int32_t i = 0; i < p.num_resets; ++i) {
    const int32_t slot = p.reset_slots[i];
    if (slot < 0 || slot >= p.num_slots) {
      throw InvalidArgument("update_token_counts: reset slot " + str(slot) + " is outside [0, " +
                            str(p.num_slots) + ")");
    }
    std::fill_n(p.counts + int64_t(slot) * p.vocab_size, p.vocab_size, 0);
  }
  for (int32_t i = 0; i < p.num_entries; ++i) {
    TokenCountEntry e = p.entries[i];
    if (e.token < 0 && p.deferred_token_ids != nullptr) {
      e.token = p.deferred_token_ids[-int64_t{e.token} - 1];
      if (e.token < 0 || e.token >= p.vocab_size) continue;  // a flagged row: its sequence ends
    }
    if (e.slot < 0 || e.slot >= p.num_slots || e.token < 0 || e.token >= p.vocab_size) {
      throw InvalidArgument("update_token_counts: entry " + str(i) + " (slot " + str(e.slot) +
                            ", token " + str(e.token) + ") is outside the table of " +
                            str(p.num_slots) + " slots x " + str(p.vocab_size) + " tokens");
    }
    p.counts[int64_t(e.slot) * p.vocab_size + e.token] += e.add;
  }
}

void apply_penalties(const PenaltyParams& p) {
  for (int32_t row = 0; row < p.num_rows; ++row) {
    const PenaltyRow& r = p.rows[row];
    if (r.slot < 0) continue;
    if (r.slot >= p.num_slots) {
      throw InvalidArgument("apply_penalties: row " + str(row) + " names slot " + str(r.slot) +
                            " of " + str(p.num_slots));
    }
    float* logits = p.logits + int64_t(row) * p.vocab_size;
    const int32_t* counts = p.counts + int64_t(r.slot) * p.vocab_size;
    for (int32_t token = 0; token < p.vocab_size; ++token) {
      const int32_t entry = counts[token];
      if (entry == 0) continue;
      float x = logits[token];
      x = x > 0.0f ? x / r.repetition : x * r.repetition;
      const int32_t output_count = entry & kOutputCountMask;
      if (output_count > 0) x -= r.frequency * float(output_count) + r.presence;
      logits[token] = x;
    }
  }
}

void token_logprobs(const TokenLogprobsParams& p) {
  if (p.num_top < 0 || p.num_top > 20) {
    throw InvalidArgument("token_logprobs: num_top is " + str(p.num_top) + "; it must be in [0, 20]");
  }
  std::vector<float> values(p.vocab_size);
  std::vector<int32_t> order(p.vocab_size);
  for (int32_t row = 0; row < p.num_rows; ++row) {
    const int32_t target = p.targets[row];
    if (target < 0 || target >= p.vocab_size) {
      throw InvalidArgument("token_logprobs: row " + str(row) + " target " + str(target) +
                            " is outside the vocabulary of " + str(p.vocab_size));
    }
    const float* logits = p.logits + int64_t(row) * p.vocab_size;
    float max_value = -INFINITY;
    for (int32_t i = 0; i < p.vocab_size; ++i) {
      values[i] = softcapped(logits[i], p.final_softcap);
      max_value = std::max(max_value, values[i]);
    }
    double sum = 0.0;
    for (int32_t i = 0; i < p.vocab_size; ++i) sum += std::exp(double(values[i]) - max_value);
    const float log_normaliser = max_value + float(std::log(sum));
    int32_t rank = 1;
    for (int32_t i = 0; i < p.vocab_size; ++i) rank += values[i] > values[target];
    p.target_logprob[row] = values[target] - log_normaliser;
    p.target_rank[row] = rank;
    if (p.num_top == 0) continue;
    for (int32_t i = 0; i < p.vocab_size; ++i) order[i] = i;
    const int32_t top = std::min(p.num_top, p.vocab_size);
    std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int32_t a, int32_t b) {
      return values[a] > values[b] || (values[a] == values[b] && a < b);
    });
    for (int32_t j = 0; j < p.num_top; ++j) {
      const int32_t id = j < top ? order[j] : -1;
      p.top_ids[int64_t(row) * p.num_top + j] = id;
      p.top_logprobs[int64_t(row) * p.num_top + j] = id >= 0 ? values[id] - log_normaliser : -INFINITY;
    }
  }
}

}  // namespace octavo::cpu
