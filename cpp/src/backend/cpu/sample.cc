// CPU reference sampler (SampleParams in backend/ops.h). One OpenMP item per row.
//
// Per row: optional final soft-cap (in place); log-softmax of the raw logits (vLLM reports these);
// the top-N report; then either greedy argmax (temperature < kGreedyTemperature) or a draw:
//   1. scaled = logit / temperature (fp32, as a GPU would divide),
//   2. the filters, each keeping a prefix of one order (scaled logit descending, ties to the
//      lower id): top-k keeps the first k; top-p keeps the shortest prefix whose probability
//      (renormalised over what top-k kept) reaches top_p; min-p keeps tokens with
//      prob >= min_p * max prob,
//   3. the token is the kept one with the largest scaled + gumbel_noise(draw_key(seed, draw), id)
//      (ties to the lower id): the Gumbel-max trick, an exact draw from the kept distribution.
// Probabilities are exp(scaled - max) in double; "renormalise" is just summing a shorter prefix.
// Only the head of the order that the filters walk gets sorted, which bounds the cost for large
// vocabularies; a row without filters sorts nothing.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <octavo/error.h>

#include "backend/sampling_rng.h"
#include "backend/ops.h"

namespace octavo::cpu {

namespace {

// Below this temperature a row samples greedily (vLLM's _SAMPLING_EPS).
constexpr float kGreedyTemperature = 1e-5f;

std::string str(long long value) { return std::to_string(value); }

void validate_row(const SamplingRow& row, int32_t index) {
  const std::string where = "sample: row " + str(index) + ": ";
  if (!(row.temperature >= 0.0f) || !std::isfinite(row.temperature)) {
    throw InvalidArgument(where + "temperature is " + std::to_string(row.temperature) +
                          "; it must be finite and >= 0 (0 = greedy)");
  }
  if (!(row.top_p > 0.0f && row.top_p <= 1.0f)) {
    throw InvalidArgument(where + "top_p is " + std::to_string(row.top_p) +
                          "; it must be in (0, 1] (1 = off)");
  }
  if (!(row.min_p >= 0.0f && row.min_p <= 1.0f)) {
    throw InvalidArgument(where + "min_p is " + std::to_string(row.min_p) +
                          "; it must be in [0, 1] (0 = off)");
  }
}

// Orders token ids by value, descending, ties to the lower id.
struct Descending {
  const float* values;
  bool operator()(int32_t a, int32_t b) const {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  }
};

// Per-thread scratch for one row's draw.
struct DrawScratch {
  std::vector<float> scaled;
  std::vector<double> weights;
  std::vector<int32_t> order;
};

// The kept token with the largest scaled value + noise; ties to the lower id.
int32_t race(const float* scaled, const int32_t* candidates, int32_t count, uint64_t key) {
  int32_t best = -1;
  float best_value = -INFINITY;
  for (int32_t c = 0; c < count; ++c) {
    const int32_t id = candidates != nullptr ? candidates[c] : c;
    const float value = scaled[id] + gumbel_noise(key, id);
    if (best < 0 || value > best_value || (value == best_value && id < best)) {
      best = id;
      best_value = value;
    }
  }
  return best;
}

// Samples one row and returns the token id. Only as much of the order as the filters walk is ever
// sorted: a prefix sorted lazily, doubling, from 256 tokens (top-p on a 150k vocabulary usually
// walks a few hundred), with the same result as sorting everything.
int32_t draw_token(const float* logits, int32_t vocab, const SamplingRow& row, DrawScratch& s) {
  s.scaled.resize(vocab);
  float max_scaled = -INFINITY;
  for (int32_t i = 0; i < vocab; ++i) {
    s.scaled[i] = logits[i] / row.temperature;
    max_scaled = std::max(max_scaled, s.scaled[i]);
  }
  const uint64_t key = draw_key(row.seed, row.draw);
  const bool top_k_on = row.top_k > 0 && row.top_k < vocab;
  if (!top_k_on && row.top_p >= 1.0f && row.min_p <= 0.0f) {
    return race(s.scaled.data(), nullptr, vocab, key);
  }

  // Unnormalised probabilities: the top token weighs exp(0) = 1.
  s.weights.resize(vocab);
  s.order.resize(vocab);
  for (int32_t i = 0; i < vocab; ++i) s.weights[i] = std::exp(double(s.scaled[i]) - max_scaled);
  for (int32_t i = 0; i < vocab; ++i) s.order[i] = i;
  const Descending descending{s.scaled.data()};

  // order[0, kept) holds the candidates; order[0, sorted) is their sorted head.
  int32_t kept = vocab;
  if (top_k_on) {
    kept = row.top_k;
    std::nth_element(s.order.begin(), s.order.begin() + kept, s.order.end(), descending);
  }
  int32_t sorted = 0;
  auto sort_head = [&](int32_t needed) {
    if (needed <= sorted) return;
    const int32_t target = std::min(kept, std::max({needed, 2 * sorted, 256}));
    std::partial_sort(s.order.begin() + sorted, s.order.begin() + target,
                      s.order.begin() + kept, descending);
    sorted = target;
  };
  auto weight = [&](int32_t rank) {
    sort_head(rank + 1);
    return s.weights[s.order[rank]];
  };

  if (row.top_p < 1.0f) {
    // Sums over the candidates in array order: the set, not its order, defines the total.
    double total = 0.0;
    for (int32_t i = 0; i < kept; ++i) total += s.weights[s.order[i]];
    const double target = double(row.top_p) * total;
    double cumulative = 0.0;
    int32_t prefix = 0;
    while (prefix < kept) {
      cumulative += weight(prefix++);
      if (cumulative >= target) break;
    }
    kept = std::max(prefix, 1);
  }
  if (row.min_p > 0.0f) {
    // The max weight is 1 whatever the normalisation, so the threshold is min_p itself.
    int32_t prefix = 1;
    while (prefix < kept && weight(prefix) >= double(row.min_p)) ++prefix;
    kept = prefix;
  }
  return race(s.scaled.data(), s.order.data(), kept, key);
}

}  // namespace

void sample(const SampleParams& p) {
  if (p.num_rows < 0 || p.vocab_size <= 0) {
    throw InvalidArgument("sample: num_rows (" + str(p.num_rows) +
                          ") must be >= 0 and vocab_size (" + str(p.vocab_size) + ") positive");
  }
  if (p.num_top < 0 || p.num_top > p.vocab_size) {
    throw InvalidArgument("sample: num_top is " + str(p.num_top) + "; it must be in [0, " +
                          str(p.vocab_size) + "] (the vocabulary size)");
  }
  if (p.final_softcap < 0.0f) {
    throw InvalidArgument("sample: final_softcap is " + std::to_string(p.final_softcap) +
                          "; it must be >= 0 (0 = none)");
  }
  for (int32_t r = 0; r < p.num_rows; ++r) validate_row(p.rows[r], r);

  const int64_t vocab = p.vocab_size;
  // An exception may not leave an OpenMP region: a row whose logits have no finite maximum
  // (a NaN, +inf, or all -inf) records itself here and the op throws after the loop.
  int64_t first_bad_row = -1;
#pragma omp parallel if (p.num_rows > 1)
  {
    DrawScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int32_t r = 0; r < p.num_rows; ++r) {
      float* logits = p.logits + r * vocab;
      if (p.final_softcap > 0.0f) {
        for (int64_t i = 0; i < vocab; ++i) {
          logits[i] = p.final_softcap * std::tanh(logits[i] / p.final_softcap);
        }
      }
      // Greedy pick and log-softmax statistics in one pass; NaN would break every ordering.
      int32_t argmax = 0;
      bool has_nan = false;
      for (int32_t i = 0; i < p.vocab_size; ++i) {
        if (std::isnan(logits[i])) has_nan = true;
        if (logits[i] > logits[argmax]) argmax = i;  // strict: ties keep the lower id
      }
      if (has_nan || !std::isfinite(logits[argmax])) {
#pragma omp critical(octavo_sample_bad_row)
        if (first_bad_row < 0 || r < first_bad_row) first_bad_row = r;
        continue;
      }
      const double max_logit = logits[argmax];
      double sum = 0.0;
      for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - max_logit);
      const double log_normaliser = max_logit + std::log(sum);
      auto logprob = [&](int32_t id) { return float(double(logits[id]) - log_normaliser); };

      const SamplingRow& row = p.rows[r];
      const int32_t token = row.temperature < kGreedyTemperature
                                ? argmax
                                : draw_token(logits, p.vocab_size, row, scratch);
      p.sampled[r] = token;
      p.sampled_logprob[r] = logprob(token);

      if (p.num_top > 0) {
        std::vector<int32_t>& order = scratch.order;
        order.resize(vocab);
        for (int32_t i = 0; i < p.vocab_size; ++i) order[i] = i;
        std::partial_sort(order.begin(), order.begin() + p.num_top, order.end(),
                          Descending{logits});
        for (int32_t i = 0; i < p.num_top; ++i) {
          p.top_ids[r * p.num_top + i] = order[i];
          p.top_logprobs[r * p.num_top + i] = logprob(order[i]);
        }
      }
    }
  }
  if (first_bad_row >= 0) {
    throw InvalidArgument("sample: row " + str(first_bad_row) +
                          " has a NaN or infinite logit, or no finite one (check the model's "
                          "weights and inputs)");
  }
}

}  // namespace octavo::cpu
