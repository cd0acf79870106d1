// BENCH.md's workloads as octavo_bench runs them: the same requests bench/throughput.py makes
// (lengths from random.Random(seed), token ids from random.Random(seed + 1), one sampling seed per
// request), and the model shapes of the named random models.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <octavo/model_spec.h>

#include "python_random.h"

namespace octavo::bench {

struct LengthRange {
  int64_t low = 0, high = 0;
};

struct Workload {
  std::string name;
  std::string default_model;  // the random model it is defined on ("" for custom)
  int num_prompts = 0;
  LengthRange input, output;
};

/// nano, llama8b and latency (BENCH.md), and custom with bench/throughput.py's defaults.
inline Workload named_workload(const std::string& name) {
  if (name == "nano") return {"nano", "qwen3-0.6b", 256, {100, 1024}, {100, 1024}};
  if (name == "llama8b") return {"llama8b", "llama-3.1-8b", 512, {100, 1024}, {100, 1024}};
  if (name == "latency") return {"latency", "llama-3.1-8b", 1, {128, 128}, {256, 256}};
  if (name == "custom") return {"custom", "", 16, {100, 1024}, {100, 1024}};
  throw std::invalid_argument("unknown workload '" + name + "'; use nano, llama8b, latency or custom");
}

struct BenchRequest {
  std::vector<int32_t> prompt_token_ids;
  int output_len = 0;
  uint64_t seed = 0;  // SamplingParams.seed, the request's index as in throughput.py
};

/// Exactly bench/throughput.py's requests:
///   lengths = [(rng.randint(*input), rng.randint(*output)) for _ in range(n)], rng = Random(seed)
///   prompts = [[token_rng.randrange(vocab) for _ in range(i)] for i, _ in lengths],
///   token_rng = Random(seed + 1)
/// The (prompt, output) lengths of make_requests, alone (they do not depend on the model).
inline std::vector<std::pair<int64_t, int64_t>> make_lengths(uint64_t seed, int num_prompts,
                                                             LengthRange input, LengthRange output) {
  PythonRandom rng(seed);
  std::vector<std::pair<int64_t, int64_t>> lengths;
  for (int k = 0; k < num_prompts; ++k) {
    const int64_t in = rng.randint(input.low, input.high);  // in this order: Python evaluates
    const int64_t out = rng.randint(output.low, output.high);  // a tuple left to right
    lengths.emplace_back(in, out);
  }
  return lengths;
}

inline std::vector<BenchRequest> make_requests(uint64_t seed, int num_prompts, LengthRange input,
                                               LengthRange output, int vocab_size) {
  const std::vector<std::pair<int64_t, int64_t>> lengths =
      make_lengths(seed, num_prompts, input, output);
  PythonRandom token_rng(seed + 1);
  std::vector<BenchRequest> requests;
  for (int k = 0; k < num_prompts; ++k) {
    BenchRequest r;
    r.prompt_token_ids.reserve(size_t(lengths[k].first));
    for (int64_t t = 0; t < lengths[k].first; ++t) {
      r.prompt_token_ids.push_back(int32_t(token_rng.randbelow(uint64_t(vocab_size))));
    }
    r.output_len = int(lengths[k].second);
    r.seed = uint64_t(k);
    requests.push_back(std::move(r));
  }
  return requests;
}

/// The named random models: the shapes bench/throughput.py builds with transformers (Qwen3-0.6B)
/// and BENCH.md's Llama-3.1-8B, with the published configs' rope and norm settings.
inline std::optional<ModelSpec> named_model_spec(const std::string& name) {
  ModelSpec s;
  if (name == "qwen3-0.6b") {
    s.architecture = "Qwen3ForCausalLM";
    s.vocab_size = 151936;
    s.hidden_size = 1024;
    s.intermediate_size = 3072;
    s.num_layers = 28;
    s.num_heads = 16;
    s.num_kv_heads = 8;
    s.head_dim = 128;
    s.max_position_embeddings = 40960;
    s.norm_eps = 1e-6f;
    s.rope.theta = 1000000.0f;
    s.qk_norm = true;
    s.tied_embeddings = true;
    return s;
  }
  if (name == "llama-3.1-8b") {
    s.architecture = "LlamaForCausalLM";
    s.vocab_size = 128256;
    s.hidden_size = 4096;
    s.intermediate_size = 14336;
    s.num_layers = 32;
    s.num_heads = 32;
    s.num_kv_heads = 8;
    s.head_dim = 128;
    s.max_position_embeddings = 131072;
    s.norm_eps = 1e-5f;
    s.rope.theta = 500000.0f;
    s.rope.scaling = RopeScaling::kLlama3;
    s.rope.factor = 8.0f;
    s.rope.low_freq_factor = 1.0f;
    s.rope.high_freq_factor = 4.0f;
    s.rope.original_max_position = 8192;
    return s;
  }
  return std::nullopt;
}

/// Percentile p in [0, 100] of `sorted` (ascending) with numpy's default linear interpolation.
inline double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  const double rank = p / 100.0 * double(sorted.size() - 1);
  const size_t below = size_t(rank);
  const size_t above = below + 1 < sorted.size() ? below + 1 : below;
  return sorted[below] + (sorted[above] - sorted[below]) * (rank - double(below));
}

}  // namespace octavo::bench
