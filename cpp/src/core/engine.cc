#include <octavo/engine.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>

#include <octavo/error.h>

#include "backend/backend.h"
#include "backend/sampling_rng.h"
#include "core/kv_cache_manager.h"
#include "core/log.h"
#include "core/request_state.h"
#include "core/scheduler.h"
#include "core/step_limits.h"
#include "model/dtype_convert.h"
#include "model/executor.h"

namespace octavo {

// vLLM's throughput defaults: a large card runs many more requests and longer prefill chunks per
// step (Llama-3.1-8B's workload on an H100: +36% output tokens/s over 256 and 1945).
void resolve_step_limits(EngineConfig& c, std::optional<size_t> device_total_bytes) {
  const bool large_device = device_total_bytes && *device_total_bytes >= kLargeDeviceBytes;
  if (c.max_num_seqs == 0) c.max_num_seqs = large_device ? 1024 : 256;
  if (c.max_num_batched_tokens <= 0) {
    c.max_num_batched_tokens =
        std::max(large_device ? 16384 : std::min(8192, c.max_model_len), c.max_num_seqs);
  }
}

namespace {

std::string num(long long v) { return std::to_string(v); }

// Per-request caps, so that a step's logit-bias upload (logit_bias, plus EOS and stop ids
// suppressed before min_tokens) has a fixed upper size.
constexpr int kMaxLogitBias = 1024;
constexpr int kMaxStopTokenIds = 256;

// The seed stream of the index-th sequence forked from a request (index 0: the request's own).
uint64_t fork_seed(uint64_t seed, int index) {
  return index == 0 ? seed : splitmix64(seed + uint64_t(index));
}

DType resolve_dtype(const EngineConfig& config, const std::vector<HostTensor>& weights) {
  if (config.dtype != "auto") return parse_dtype(config.dtype, "dtype");
  for (const HostTensor& t : weights) {
    if (t.name == "embed_tokens.weight") return parse_dtype(t.dtype, "weight 'embed_tokens.weight'");
  }
  throw FormatError("missing weight 'embed_tokens.weight': cannot infer dtype=auto");
}

}  // namespace

struct Engine::Impl {
  ModelSpec spec;
  EngineConfig config;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Executor> executor;
  std::unique_ptr<KVCacheManager> kv_cache;
  std::unique_ptr<Scheduler> scheduler;
  std::unordered_map<RequestId, std::unique_ptr<RequestState>> requests;
  std::vector<RequestOutput> pending_outputs;  // aborts, reported by the next step
  RequestId next_id = 1;
  EngineStats counters;
  StepBatch batch;

  // Who each sampled row of the step being packed belongs to: the request, and the fork index
  // (0: the request itself; i > 0: the i-th sequence to fork from it after this step).
  std::vector<std::pair<RequestState*, int>> sample_owners;
  // Who the step's prompt-logprob rows belong to, in row order: (request, number of rows).
  std::vector<std::pair<RequestState*, int>> prompt_logprob_owners;
  std::vector<int32_t> free_penalty_slots;

  // A step on the device whose results are not yet read. Its owners are named by id: a request
  // may be aborted (or end on its previous token) while the step runs.
  struct SampleOwner {
    RequestId id;
    int fork_index;
    int placeholder;  // index in token_ids of the deferred id standing for this row's token, or -1
  };
  struct LaunchedStep {
    std::vector<SampleOwner> sample_owners;
    std::vector<std::pair<RequestId, int>> prompt_logprob_owners;
    int num_top_logprobs = 0;
    int num_prompt_top_logprobs = 0;
    // Every sampled row is a lone sequence's own (no fork or beam): the next step can be
    // scheduled and launched before this one's tokens reach the host.
    bool plain = false;
  };
  std::deque<LaunchedStep> launched;  // oldest first; at most Executor::kMaxInFlight

  /// Schedules, packs and launches one step; false when there is nothing to run.
  bool launch_step();
  /// Waits for the oldest launched step and turns its results into outputs.
  void collect_step(std::vector<RequestOutput>& outputs);
  RequestState* find(RequestId id) {
    auto it = requests.find(id);
    return it == requests.end() ? nullptr : it->second.get();
  }

  // A beam-search request: its live beams (RequestStates, in rank order) and the beams that
  // ended in EOS, kept as token lists only (their KV is not needed again).
  struct FinishedBeam {
    std::vector<int32_t> output_tokens;
    std::vector<float> logprobs;
    double cumulative_logprob = 0.0;
  };
  struct BeamGroup {
    int width = 0;
    float length_penalty = 1.0f;
    bool ignore_eos = false;
    int num_prompt_tokens = 0;
    int max_num_tokens = 0;
    std::vector<RequestState*> live;
    std::vector<FinishedBeam> finished;
  };
  std::unordered_map<RequestId, BeamGroup> beam_groups;

  void build_batch(const SchedulerOutput& scheduled);
  void add_sample_row(RequestState& r, int fork_index);
  void add_penalty_counts(RequestState& r);
  void release_penalty_slot(RequestState& r);
  /// Removes a sequence for good: from the scheduler (its blocks return to the pool), its
  /// penalty slot, and the request table.
  void drop(RequestId id);
  RequestState* fork(RequestState& parent, int index);
  /// Once every live beam of the group has proposed its candidates: the next beams (forked,
  /// extended or dropped), and the group's final outputs when it is done.
  void advance_beams(RequestId group_id, std::vector<RequestOutput>& outputs);
  double beam_score(int num_output_tokens, int32_t last_token, double cumulative_logprob,
                    const BeamGroup& group) const;
  /// Appends a sampled token to a sequence (in place of its deferred id at `placeholder`, when
  /// >= 0), checks its stop conditions, and returns its output.
  RequestOutput append_token(RequestState& r, const StepResult& result, int row, int top,
                             int placeholder);
  bool is_eos(int32_t token) const {
    const auto& eos = config.eos_token_ids;
    return std::find(eos.begin(), eos.end(), token) != eos.end();
  }
};

Engine::Engine(const ModelSpec& spec, const EngineConfig& config,
               const std::vector<HostTensor>& weights)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.spec = spec;
  m.spec.validate();
  m.config = config;
  EngineConfig& c = m.config;

  if (c.block_size < 1 || c.block_size > 256 || (c.block_size & (c.block_size - 1)) != 0) {
    throw InvalidArgument("block_size is " + num(c.block_size) + "; it must be a power of two in [1, 256]");
  }
  if (c.max_model_len <= 0) c.max_model_len = spec.max_position_embeddings;
  if (c.max_model_len <= 0) {
    throw InvalidArgument("max_model_len is unset and the model states no max_position_embeddings; "
                          "set max_model_len");
  }
  if (spec.max_position_embeddings > 0 && c.max_model_len > spec.max_position_embeddings) {
    throw InvalidArgument("max_model_len " + num(c.max_model_len) + " exceeds the model's " +
                          "max_position_embeddings " + num(spec.max_position_embeddings) +
                          " (lower max_model_len)");
  }
  if (c.max_num_seqs < 0) {
    throw InvalidArgument("max_num_seqs is " + num(c.max_num_seqs) + "; it must be at least 1 "
                          "(0: the default)");
  }

  if (!(c.gpu_memory_utilization > 0.0f && c.gpu_memory_utilization <= 1.0f)) {
    throw InvalidArgument("gpu_memory_utilization is " + std::to_string(c.gpu_memory_utilization) +
                          "; it must be in (0, 1]");
  }
  const DType dtype = resolve_dtype(c, weights);
  m.backend = make_backend(c.device);
  if (!c.async_scheduling) c.async_scheduling = m.backend->queues_work();
  const std::optional<MemoryInfo> device_memory = m.backend->memory_info();
  resolve_step_limits(c, device_memory ? std::optional<size_t>(device_memory->total_bytes)
                                       : std::nullopt);
  ExecutorLimits limits{c.max_num_batched_tokens, c.max_num_seqs, c.max_model_len,
                        kMaxLogitBias + kMaxStopTokenIds + int(c.eos_token_ids.size()),
                        !c.enforce_eager};
  m.executor = std::make_unique<Executor>(m.spec, *m.backend, dtype, limits, c.block_size, weights);

  // The KV pool takes what is left: on a GPU, the allowed share of the card minus everything
  // allocated so far (weights, step buffers and scratch sized for the largest step, so this is
  // the peak of any step) and the decode graphs about to be captured; on the CPU, a fixed budget.
  const size_t block_bytes = Executor::kv_block_bytes(spec, c.block_size, dtype);
  if (c.num_kv_blocks <= 0) {
    size_t kv_bytes = c.cpu_kv_cache_bytes;
    if (std::optional<MemoryInfo> memory = m.backend->memory_info()) {
      const double allowed = double(memory->total_bytes) * c.gpu_memory_utilization;
      const double used = double(memory->total_bytes - memory->free_bytes) +
                          double(m.executor->startup_graph_bytes());
      kv_bytes = allowed > used ? size_t(allowed - used) : 0;
    }
    c.num_kv_blocks = int(std::min<size_t>(kv_bytes / block_bytes, 1 << 24));
  }
  const int blocks_per_sequence = (c.max_model_len + c.block_size - 1) / c.block_size;
  if (c.num_kv_blocks < blocks_per_sequence) {
    throw InvalidArgument("the KV pool of " + num(c.num_kv_blocks) + " blocks (" +
                          num(int64_t(c.num_kv_blocks) * c.block_size) +
                          " tokens) cannot hold one sequence of max_model_len " +
                          num(c.max_model_len) + " (lower max_model_len or give the pool more "
                          "memory: gpu_memory_utilization, kv_cache_memory_bytes or "
                          "num_gpu_blocks_override)");
  }
  m.executor->allocate_kv_cache(c.num_kv_blocks);
  m.executor->capture_graphs();
  for (int slot = m.executor->num_penalty_slots() - 1; slot >= 0; --slot) {
    m.free_penalty_slots.push_back(slot);
  }
  m.kv_cache = std::make_unique<KVCacheManager>(c.num_kv_blocks, c.block_size, c.enable_prefix_caching);
  m.scheduler = std::make_unique<Scheduler>(
      SchedulerConfig{c.max_num_seqs, c.max_num_batched_tokens}, *m.kv_cache);
  m.batch.clear();
  log_engine_ready(m.spec, c, m.backend->name(), dtype);
  const Executor::Timings& t = m.executor->timings();
  log_graphs_captured(t.startup_graph_captures, t.startup_graph_capture_seconds);
}

Engine::~Engine() = default;

RequestId Engine::add_request(std::vector<int32_t> prompt, const SamplingParams& params) {
  Impl& m = *impl_;
  params.validate();
  if (prompt.empty()) throw InvalidArgument("the prompt is empty; give at least one token");
  for (int32_t token : prompt) {
    if (token < 0 || token >= m.spec.vocab_size) {
      throw InvalidArgument("prompt token id " + num(token) + " is outside the vocabulary [0, " +
                            num(m.spec.vocab_size) + ")");
    }
  }
  if (params.logit_bias.size() > size_t(kMaxLogitBias) ||
      params.stop_token_ids.size() > size_t(kMaxStopTokenIds)) {
    throw InvalidArgument("logit_bias has " + num(params.logit_bias.size()) +
                          " entries and stop_token_ids " + num(params.stop_token_ids.size()) +
                          "; the limits are " + num(kMaxLogitBias) + " and " +
                          num(kMaxStopTokenIds));
  }
  for (const auto& [token, bias] : params.logit_bias) {
    if (token < 0 || token >= m.spec.vocab_size) {
      throw InvalidArgument("logit_bias token id " + num(token) + " is outside the vocabulary [0, " +
                            num(m.spec.vocab_size) + ")");
    }
  }
  const int prompt_len = int(prompt.size());
  if (prompt_len >= m.config.max_model_len) {
    throw InvalidArgument("prompt has " + num(prompt_len) + " tokens; max_model_len is " +
                          num(m.config.max_model_len) +
                          " and leaves room for no output (raise max_model_len or shorten the prompt)");
  }
  if (params.n > m.config.max_num_seqs) {
    throw InvalidArgument("n is " + num(params.n) + "; max_num_seqs is " +
                          num(m.config.max_num_seqs) + " (raise max_num_seqs or lower n)");
  }
  if (params.beam_width > m.config.max_num_seqs) {
    throw InvalidArgument("beam_width is " + num(params.beam_width) + "; max_num_seqs is " +
                          num(m.config.max_num_seqs) + " (raise max_num_seqs or lower beam_width)");
  }
  auto request = std::make_unique<RequestState>();
  request->id = m.next_id++;
  request->group_id = request->id;
  request->num_pending_forks = (params.beam_width > 0 ? params.beam_width : params.n) - 1;
  request->num_prompt_tokens = prompt_len;
  request->token_ids = std::move(prompt);
  request->params = params;
  request->seed = params.seed ? *params.seed : splitmix64(m.config.seed ^ splitmix64(request->id));
  request->max_num_tokens = m.config.max_model_len;
  if (params.max_tokens) {
    request->max_num_tokens = int(std::min<int64_t>(int64_t(prompt_len) + *params.max_tokens,
                                                    m.config.max_model_len));
  }
  RequestState* raw = request.get();
  if (params.beam_width > 0) {
    raw->beam_group = raw->id;
    Impl::BeamGroup& group = m.beam_groups[raw->id];
    group.width = params.beam_width;
    group.length_penalty = params.length_penalty;
    group.ignore_eos = params.ignore_eos;
    group.num_prompt_tokens = prompt_len;
    group.max_num_tokens = raw->max_num_tokens;
    group.live.push_back(raw);
  }
  m.requests.emplace(raw->id, std::move(request));
  m.scheduler->add(raw);
  return raw->id;
}

void Engine::Impl::build_batch(const SchedulerOutput& scheduled) {
  batch.clear();
  sample_owners.clear();
  int width = 0;
  for (const ScheduledRequest& s : scheduled.scheduled) {
    width = std::max(width, int(kv_cache->block_table(s.request->id).size()));
  }
  batch.block_table_width = width;
  batch.block_copies = scheduled.block_copies;
  for (const ScheduledRequest& s : scheduled.scheduled) {
    RequestState& r = *s.request;
    const int start = r.num_computed_tokens, n = s.num_new_tokens;
    batch.token_ids.insert(batch.token_ids.end(), r.token_ids.begin() + start,
                           r.token_ids.begin() + start + n);
    for (int p = start; p < start + n; ++p) batch.positions.push_back(p);
    const size_t slot_base = batch.slot_mapping.size();
    batch.slot_mapping.resize(slot_base + n);
    kv_cache->slot_mapping(r.id, start, n, std::span<int64_t>(batch.slot_mapping).subspan(slot_base, n));
    batch.query_start.push_back(batch.query_start.back() + n);
    batch.context_lens.push_back(start + n);
    batch.max_query_len = std::max(batch.max_query_len, n);
    batch.max_context_len = std::max(batch.max_context_len, start + n);
    std::span<const BlockId> table = kv_cache->block_table(r.id);
    batch.block_tables.insert(batch.block_tables.end(), table.begin(), table.end());
    batch.block_tables.resize(batch.block_tables.size() + (width - table.size()), 0);

    if (r.params.prompt_logprobs) {
      // Row p's logits give the logprob of prompt token p + 1.
      const int first = std::max(start, r.next_prompt_logprob_position);
      const int end = std::min(start + n, r.num_prompt_tokens - 1);
      for (int p = first; p < end; ++p) {
        batch.prompt_logprob_rows.push_back(batch.query_start[batch.query_start.size() - 2] + (p - start));
        batch.prompt_logprob_targets.push_back(r.token_ids[p + 1]);
      }
      if (end > first) {
        prompt_logprob_owners.emplace_back(&r, end - first);
        r.next_prompt_logprob_position = end;
        batch.num_prompt_top_logprobs = std::max(batch.num_prompt_top_logprobs, *r.params.prompt_logprobs);
      }
    }

    if (start + n != r.num_tokens()) continue;  // a prompt chunk that does not reach the end
    if (r.beam_group != 0) {
      // A beam proposes its candidates once per round; after a preemption it recomputes its KV
      // without proposing again.
      if (!r.beam_ready) add_sample_row(r, 0);
      continue;
    }
    if (r.params.has_penalties()) add_penalty_counts(r);
    // A request about to fork samples all its sequences' first tokens from the same row.
    for (int fork_index = 0; fork_index <= r.num_pending_forks; ++fork_index) {
      add_sample_row(r, fork_index);
    }
  }
  const bool any_penalties = std::any_of(batch.penalties.begin(), batch.penalties.end(),
                                         [](const PenaltyRow& row) { return row.slot >= 0; });
  if (!any_penalties) batch.penalties.clear();
}

void Engine::Impl::add_sample_row(RequestState& r, int fork_index) {
  const SamplingParams& p = r.params;
  sample_owners.emplace_back(&r, fork_index);
  batch.sample_rows.push_back(batch.query_start.back() - 1);
  if (r.beam_group != 0) {
    // Beams rank candidates by logprob: the row only needs its top 2 * beam_width report.
    batch.sampling.push_back(SamplingRow{0.0f, 0, 1.0f, 0.0f, r.seed, 0});
    batch.bias_offsets.push_back(int32_t(batch.bias_token_ids.size()));
    batch.penalties.push_back(PenaltyRow{-1, 1.0f, 0.0f, 0.0f});
    batch.num_top_logprobs = std::max(batch.num_top_logprobs, 2 * p.beam_width);
    return;
  }
  batch.sampling.push_back(SamplingRow{p.temperature, p.top_k, p.top_p, p.min_p,
                                       fork_seed(r.seed, fork_index),
                                       uint64_t(r.num_output_tokens())});
  for (const auto& [token, bias] : p.logit_bias) {
    batch.bias_token_ids.push_back(token);
    batch.bias_values.push_back(bias);
  }
  if (r.num_output_tokens() < p.min_tokens) {
    const float blocked = -std::numeric_limits<float>::infinity();
    if (!p.ignore_eos) {
      for (int32_t eos : config.eos_token_ids) {
        batch.bias_token_ids.push_back(eos);
        batch.bias_values.push_back(blocked);
      }
    }
    for (int32_t stop : p.stop_token_ids) {
      batch.bias_token_ids.push_back(stop);
      batch.bias_values.push_back(blocked);
    }
  }
  batch.bias_offsets.push_back(int32_t(batch.bias_token_ids.size()));
  batch.penalties.push_back(PenaltyRow{r.penalty_slot, p.repetition_penalty, p.frequency_penalty,
                                       p.presence_penalty});
  if (p.want_logprobs) batch.num_top_logprobs = std::max(batch.num_top_logprobs, p.logprobs);
}

void Engine::Impl::add_penalty_counts(RequestState& r) {
  if (r.penalty_slot < 0) {
    // Running sequences never outnumber the slots (both are max_num_seqs).
    if (free_penalty_slots.empty()) throw Error("internal: no free penalty slot");
    r.penalty_slot = free_penalty_slots.back();
    free_penalty_slots.pop_back();
    r.penalty_counted_outputs = 0;
    batch.count_resets.push_back(r.penalty_slot);
    std::vector<int32_t> prompt(r.token_ids.begin(), r.token_ids.begin() + r.num_prompt_tokens);
    std::sort(prompt.begin(), prompt.end());
    prompt.erase(std::unique(prompt.begin(), prompt.end()), prompt.end());
    for (int32_t token : prompt) {
      batch.count_entries.push_back(TokenCountEntry{r.penalty_slot, token, kPromptTokenBit});
    }
  }
  // A deferred id (the token the step in flight samples) is counted on the device.
  for (int i = r.penalty_counted_outputs; i < r.num_output_tokens(); ++i) {
    batch.count_entries.push_back(
        TokenCountEntry{r.penalty_slot, r.token_ids[r.num_prompt_tokens + i], 1});
  }
  r.penalty_counted_outputs = r.num_output_tokens();
}

void Engine::Impl::release_penalty_slot(RequestState& r) {
  if (r.penalty_slot < 0) return;
  free_penalty_slots.push_back(r.penalty_slot);
  r.penalty_slot = -1;
}

void Engine::Impl::drop(RequestId id) {
  auto it = requests.find(id);
  if (it == requests.end()) return;
  scheduler->remove(it->second.get());
  release_penalty_slot(*it->second);
  requests.erase(it);
}

RequestState* Engine::Impl::fork(RequestState& parent, int index) {
  auto child = std::make_unique<RequestState>(parent);
  child->id = next_id++;
  child->index = index;
  child->num_pending_forks = 0;
  child->seed = fork_seed(parent.seed, index);  // the stream its first row drew from
  child->penalty_slot = -1;  // the parent's row is its own; the child builds one when it samples
  RequestState* raw = child.get();
  requests.emplace(raw->id, std::move(child));
  if (kv_cache->contains(parent.id)) {
    kv_cache->fork(parent.id, raw->id);
    scheduler->add_forked(raw);
  } else {
    // A preempted beam: its child recomputes too.
    raw->num_computed_tokens = 0;
    scheduler->add(raw);
  }
  return raw;
}

RequestOutput Engine::Impl::append_token(RequestState& r, const StepResult& result, int row,
                                         int top, int placeholder) {
  RequestOutput out;
  out.id = r.id;
  out.group_id = r.group_id;
  out.index = r.index;
  const int32_t token = result.sampled[row];
  const float logprob = result.sampled_logprob[row];
  // The deferred id keeps the token's place until its step is collected; the step launched
  // after it may have appended its own behind it.
  if (placeholder >= 0 && (placeholder >= r.num_tokens() || r.token_ids[placeholder] >= 0)) {
    throw Error("internal: request " + num(r.id) + " lost its pending token");
  }
  if (token < 0 || token >= spec.vocab_size) {
    // The GPU sampler flags rows whose logits hold NaN or inf instead of throwing mid-step:
    // this sequence ends, the rest of the batch goes on. A step in flight may have computed KV
    // at the deferred position from a zero row; none of it is kept (nor published to the cache).
    if (placeholder >= 0) {
      r.token_ids.resize(size_t(placeholder));
      r.num_computed_tokens = std::min(r.num_computed_tokens, r.num_tokens());
    }
    out.finished = true;
    out.finish_reason = r.finish_reason = FinishReason::kAbort;
    out.error = "the model produced non-finite logits (NaN or inf) for this request";
    out.cumulative_logprob = r.cumulative_logprob;
    r.status = RequestStatus::kFinished;
    return out;
  }
  if (placeholder >= 0) {
    r.token_ids[placeholder] = token;
  } else {
    r.token_ids.push_back(token);
  }
  const int length = placeholder >= 0 ? placeholder + 1 : r.num_tokens();
  r.cumulative_logprob += logprob;
  ++counters.generation_tokens;
  out.new_token_ids.push_back(token);
  if (r.params.want_logprobs) {
    TokenLogprobs lp;
    lp.logprob = logprob;
    for (int j = 0; j < top; ++j) {
      const int32_t id = result.top_ids[size_t(row) * top + j];
      if (id == token && lp.rank == 0) lp.rank = j + 1;
      if (j < r.params.logprobs) {
        lp.top_ids.push_back(id);
        lp.top_logprobs.push_back(result.top_logprobs[size_t(row) * top + j]);
      }
    }
    out.new_logprobs.push_back(std::move(lp));
  }
  out.cumulative_logprob = r.cumulative_logprob;

  const auto& stops = r.params.stop_token_ids;
  if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
    r.finish_reason = FinishReason::kStop;
    r.stop_token_id = token;
  } else if (!r.params.ignore_eos && is_eos(token)) {
    r.finish_reason = FinishReason::kStop;
  } else if (length >= r.max_num_tokens) {
    r.finish_reason = FinishReason::kLength;
  }
  if (r.finish_reason != FinishReason::kNone) {
    r.status = RequestStatus::kFinished;
    out.finished = true;
    out.finish_reason = r.finish_reason;
    out.stop_token_id = r.stop_token_id;
  }
  return out;
}

double Engine::Impl::beam_score(int num_output_tokens, int32_t last_token,
                                double cumulative_logprob, const BeamGroup& group) const {
  // vLLM's length: prompt and output, without an ending EOS.
  int length = group.num_prompt_tokens + num_output_tokens;
  if (num_output_tokens > 0 && is_eos(last_token)) --length;
  return cumulative_logprob / std::pow(double(length), double(group.length_penalty));
}

void Engine::Impl::advance_beams(RequestId group_id, std::vector<RequestOutput>& outputs) {
  BeamGroup& group = beam_groups.at(group_id);
  for (const RequestState* beam : group.live) {
    if (!beam->beam_ready) return;  // a sibling has not proposed yet
  }
  struct Candidate {
    int parent;  // index into group.live
    int32_t token;
    float logprob;
    double cumulative;
    double score;
  };
  std::vector<Candidate> candidates;
  for (int b = 0; b < int(group.live.size()); ++b) {
    const RequestState& parent = *group.live[b];
    for (const auto& [token, logprob] : parent.beam_candidates) {
      const double cumulative = parent.beam_cumulative_logprob + logprob;
      if (!group.ignore_eos && is_eos(token)) {
        FinishedBeam done;
        done.output_tokens.assign(parent.token_ids.begin() + parent.num_prompt_tokens,
                                  parent.token_ids.end());
        done.output_tokens.push_back(token);
        done.logprobs = parent.beam_logprobs;
        done.logprobs.push_back(logprob);
        done.cumulative_logprob = cumulative;
        group.finished.push_back(std::move(done));
        continue;
      }
      candidates.push_back(Candidate{b, token, logprob, cumulative,
                                     beam_score(parent.num_output_tokens() + 1, token, cumulative,
                                                group)});
    }
  }
  // Stable: ties keep beam order, then the parent's candidate order (vLLM sorts the same way).
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& a, const Candidate& b) { return a.score > b.score; });
  if (int(candidates.size()) > group.width) candidates.resize(group.width);

  // The first candidate of a parent extends the parent itself; each further one forks it, before
  // the parent's own token is appended, sharing its blocks (copy-on-write). Parents left without
  // candidates end here and their blocks go back to the pool.
  std::vector<RequestState*> next(candidates.size(), nullptr);
  std::vector<bool> parent_taken(group.live.size(), false);
  for (size_t i = 0; i < candidates.size(); ++i) {
    RequestState& parent = *group.live[candidates[i].parent];
    if (!parent_taken[candidates[i].parent]) {
      parent_taken[candidates[i].parent] = true;
      next[i] = &parent;
    } else {
      next[i] = fork(parent, int(i));
    }
  }
  for (size_t b = 0; b < group.live.size(); ++b) {
    if (!parent_taken[b]) drop(group.live[b]->id);
  }
  for (size_t i = 0; i < candidates.size(); ++i) {
    RequestState& beam = *next[i];
    beam.token_ids.push_back(candidates[i].token);
    beam.beam_cumulative_logprob = candidates[i].cumulative;
    beam.beam_logprobs.push_back(candidates[i].logprob);
    beam.beam_candidates.clear();
    beam.beam_ready = false;
    beam.num_pending_forks = 0;
    beam.index = int(i);
    ++counters.generation_tokens;
  }
  group.live = std::move(next);

  const bool done = group.live.empty() || group.live.front()->num_tokens() >= group.max_num_tokens;
  if (!done) return;
  // The best beam_width of the finished beams and the live ones, finished first on ties.
  for (RequestState* beam : group.live) {
    FinishedBeam last;
    last.output_tokens.assign(beam->token_ids.begin() + beam->num_prompt_tokens,
                              beam->token_ids.end());
    last.logprobs = beam->beam_logprobs;
    last.cumulative_logprob = beam->beam_cumulative_logprob;
    group.finished.push_back(std::move(last));
    drop(beam->id);
  }
  std::vector<std::pair<double, const FinishedBeam*>> ranked;
  for (const FinishedBeam& beam : group.finished) {
    ranked.emplace_back(beam_score(int(beam.output_tokens.size()), beam.output_tokens.back(),
                                   beam.cumulative_logprob, group),
                        &beam);
  }
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  if (int(ranked.size()) > group.width) ranked.resize(group.width);
  for (size_t i = 0; i < ranked.size(); ++i) {
    const FinishedBeam& beam = *ranked[i].second;
    RequestOutput out;
    out.id = group_id;
    out.group_id = group_id;
    out.index = int(i);
    out.new_token_ids = beam.output_tokens;
    for (float logprob : beam.logprobs) {
      TokenLogprobs lp;
      lp.logprob = logprob;
      out.new_logprobs.push_back(std::move(lp));
    }
    out.cumulative_logprob = float(beam.cumulative_logprob);
    out.finished = true;
    out.finish_reason = !group.ignore_eos && is_eos(beam.output_tokens.back())
                            ? FinishReason::kStop
                            : FinishReason::kLength;
    outputs.push_back(std::move(out));
  }
  beam_groups.erase(group_id);
}

bool Engine::Impl::launch_step() {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  SchedulerOutput scheduled = scheduler->schedule();
  counters.num_preemptions += scheduled.preempted.size();
  for (RequestState* preempted : scheduled.preempted) release_penalty_slot(*preempted);
  if (scheduled.empty()) return false;

  build_batch(scheduled);
  const Clock::time_point packed = Clock::now();
  executor->launch(batch);
  scheduler->on_step_done(scheduled);
  for (const ScheduledRequest& s : scheduled.scheduled) {
    const RequestState& r = *s.request;
    counters.prompt_tokens += std::max(0, std::min(r.num_prompt_tokens, r.num_computed_tokens) -
                                              (r.num_computed_tokens - s.num_new_tokens));
  }

  LaunchedStep step;
  step.num_top_logprobs = batch.num_top_logprobs;
  step.num_prompt_top_logprobs = batch.num_prompt_top_logprobs;
  step.plain = std::all_of(sample_owners.begin(), sample_owners.end(), [](const auto& owner) {
    const RequestState& r = *owner.first;
    return owner.second == 0 && r.num_pending_forks == 0 && r.beam_group == 0;
  });
  const bool defer = config.async_scheduling == true && step.plain;
  for (size_t row = 0; row < sample_owners.size(); ++row) {
    auto [request, fork_index] = sample_owners[row];
    int placeholder = -1;
    // The next step reads this row's token on the device; until this step is collected the
    // sequence ends in its deferred id, so the scheduler sees its true length. A token that ends
    // the sequence by length gets none: with nothing left to compute it is not scheduled again.
    if (defer && request->num_tokens() + 1 < request->max_num_tokens) {
      request->token_ids.push_back(-1 - int32_t(row));
      placeholder = request->num_tokens() - 1;
    }
    step.sample_owners.push_back(SampleOwner{request->id, fork_index, placeholder});
  }
  for (auto [request, count] : prompt_logprob_owners) {
    step.prompt_logprob_owners.emplace_back(request->id, count);
  }
  sample_owners.clear();
  prompt_logprob_owners.clear();
  launched.push_back(std::move(step));
  const Clock::time_point done = Clock::now();
  counters.schedule_seconds += std::chrono::duration<double>(packed - start).count();
  counters.execute_seconds += std::chrono::duration<double>(done - packed).count();
  return true;
}

void Engine::Impl::collect_step(std::vector<RequestOutput>& outputs) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  const LaunchedStep step = std::move(launched.front());
  launched.pop_front();
  const StepResult result = executor->collect();
  const Clock::time_point collected = Clock::now();

  // Prompt logprobs go out with the request's sampled token when it samples this step, else alone.
  std::unordered_map<RequestState*, std::vector<TokenLogprobs>> prompt_logprobs;
  {
    const int top = step.num_prompt_top_logprobs;
    size_t row = 0;
    for (auto [id, count] : step.prompt_logprob_owners) {
      RequestState* request = find(id);
      if (request == nullptr) {  // aborted while its step ran
        row += size_t(count);
        continue;
      }
      std::vector<TokenLogprobs>& entries = prompt_logprobs[request];
      const int asked = *request->params.prompt_logprobs;
      for (int i = 0; i < count; ++i, ++row) {
        TokenLogprobs lp;
        lp.logprob = result.prompt_logprob[row];
        lp.rank = result.prompt_rank[row];
        for (int j = 0; j < asked; ++j) {
          lp.top_ids.push_back(result.prompt_top_ids[row * top + j]);
          lp.top_logprobs.push_back(result.prompt_top_logprobs[row * top + j]);
        }
        entries.push_back(std::move(lp));
      }
    }
  }

  const int top = step.num_top_logprobs;
  // A row whose sequence is gone (aborted, or ended on the token before while this step ran) is
  // dropped. Forks come after their parent's own row; they copy the parent before its token is
  // appended.
  const std::vector<SampleOwner>& owners = step.sample_owners;
  std::vector<RequestState*> sequence(owners.size(), nullptr);
  for (size_t row = 0; row < owners.size(); ++row) {
    RequestState* request = find(owners[row].id);
    if (request == nullptr) continue;
    sequence[row] = owners[row].fork_index > 0 ? fork(*request, owners[row].fork_index) : request;
  }
  std::vector<RequestId> beam_groups_to_advance;
  for (size_t row = 0; row < owners.size(); ++row) {
    if (sequence[row] == nullptr) continue;
    RequestState& r = *sequence[row];
    if (r.beam_group != 0) {
      const int32_t sampled = result.sampled[row];
      if (sampled < 0 || sampled >= spec.vocab_size) {
        RequestOutput out;
        out.id = out.group_id = r.beam_group;
        out.finished = true;
        out.finish_reason = FinishReason::kAbort;
        out.error = "the model produced non-finite logits (NaN or inf) for this request";
        outputs.push_back(std::move(out));
        r.status = RequestStatus::kFinished;
        continue;
      }
      r.beam_candidates.clear();
      for (int j = 0; j < 2 * r.params.beam_width; ++j) {
        r.beam_candidates.emplace_back(result.top_ids[row * top + j],
                                       result.top_logprobs[row * top + j]);
      }
      r.beam_ready = true;
      beam_groups_to_advance.push_back(r.beam_group);
      continue;
    }
    if (owners[row].fork_index == 0) r.num_pending_forks = 0;
    RequestOutput out = append_token(r, result, int(row), top, owners[row].placeholder);
    if (owners[row].fork_index == 0) {
      auto it = prompt_logprobs.find(&r);
      if (it != prompt_logprobs.end()) {
        out.new_prompt_logprobs = std::move(it->second);
        prompt_logprobs.erase(it);
      }
    }
    outputs.push_back(std::move(out));
  }
  for (auto& [request, entries] : prompt_logprobs) {
    RequestOutput out;
    out.id = request->id;
    out.group_id = request->group_id;
    out.index = request->index;
    out.new_prompt_logprobs = std::move(entries);
    outputs.push_back(std::move(out));
  }

  // A beam row with non-finite logits ends its whole group.
  for (auto it = beam_groups.begin(); it != beam_groups.end();) {
    const bool failed = std::any_of(it->second.live.begin(), it->second.live.end(),
                                    [](const RequestState* beam) { return beam->finished(); });
    if (!failed) {
      ++it;
      continue;
    }
    std::vector<RequestState*> live = it->second.live;
    for (RequestState* beam : live) drop(beam->id);
    it = beam_groups.erase(it);
  }
  std::sort(beam_groups_to_advance.begin(), beam_groups_to_advance.end());
  beam_groups_to_advance.erase(
      std::unique(beam_groups_to_advance.begin(), beam_groups_to_advance.end()),
      beam_groups_to_advance.end());
  for (RequestId group : beam_groups_to_advance) {
    if (beam_groups.count(group)) advance_beams(group, outputs);
  }

  for (RequestOutput& out : outputs) {
    // Finished sequences leave (ids already gone, abort echoes and beam results, are ignored).
    if (out.finished) drop(out.id);
  }
  const Clock::time_point done = Clock::now();
  ++counters.num_steps;
  counters.execute_seconds += std::chrono::duration<double>(collected - start).count();
  counters.output_seconds += std::chrono::duration<double>(done - collected).count();
}

std::vector<RequestOutput> Engine::step() {
  Impl& m = *impl_;
  std::vector<RequestOutput> outputs = std::move(m.pending_outputs);
  m.pending_outputs.clear();
  if (m.launched.empty() && !m.launch_step()) return outputs;
  // While the oldest step runs, the next one is scheduled and queued behind it, its sampled
  // rows' tokens read on the device; the host then reads the oldest step's results.
  if (m.config.async_scheduling == true && m.launched.size() == 1 && m.launched.front().plain &&
      m.launch_step()) {
    ++m.counters.async_steps;
  }
  m.collect_step(outputs);
  return outputs;
}

void Engine::abort(RequestId id, bool whole_group) {
  Impl& m = *impl_;
  std::vector<RequestId> victims;
  for (const auto& [sequence_id, request] : m.requests) {
    if (sequence_id == id || (whole_group && request->group_id == id)) victims.push_back(sequence_id);
  }
  std::sort(victims.begin(), victims.end());
  // A beam search ends as a whole: its beams are not separate outputs until it finishes.
  std::vector<RequestId> groups;
  for (RequestId victim : victims) {
    const RequestId group = m.requests.at(victim)->beam_group;
    if (group != 0 && std::find(groups.begin(), groups.end(), group) == groups.end()) {
      groups.push_back(group);
    }
  }
  for (RequestId group : groups) {
    auto it = m.beam_groups.find(group);
    if (it == m.beam_groups.end()) continue;
    for (const RequestState* beam : it->second.live) victims.push_back(beam->id);
    RequestOutput out;
    out.id = out.group_id = group;
    out.finished = true;
    out.finish_reason = FinishReason::kAbort;
    m.pending_outputs.push_back(std::move(out));
    m.beam_groups.erase(it);
  }
  std::sort(victims.begin(), victims.end());
  victims.erase(std::unique(victims.begin(), victims.end()), victims.end());
  for (RequestId victim : victims) {
    auto it = m.requests.find(victim);
    if (it == m.requests.end()) continue;
    RequestState& r = *it->second;
    if (r.beam_group == 0) {
      RequestOutput out;
      out.id = victim;
      out.group_id = r.group_id;
      out.index = r.index;
      out.finished = true;
      out.finish_reason = FinishReason::kAbort;
      out.cumulative_logprob = r.cumulative_logprob;
      m.pending_outputs.push_back(std::move(out));
    }
    m.drop(victim);
  }
}

bool Engine::has_unfinished() const {
  return impl_->scheduler->has_unfinished() || !impl_->pending_outputs.empty() ||
         !impl_->launched.empty();
}

EngineStats Engine::stats() const {
  const Impl& m = *impl_;
  EngineStats s = m.counters;
  s.num_running = m.scheduler->num_running();
  s.num_waiting = m.scheduler->num_waiting();
  s.num_kv_blocks = m.kv_cache->num_blocks();
  s.num_free_kv_blocks = m.kv_cache->num_free_blocks();
  s.num_evictable_kv_blocks = m.kv_cache->block_pool().num_evictable_blocks();
  s.prefix_cache_queries = m.kv_cache->prefix_cache_stats().queries;
  s.prefix_cache_hits = m.kv_cache->prefix_cache_stats().hits;
  const Executor::Timings& t = m.executor->timings();
  s.device_wait_seconds = t.device_wait_seconds;
  s.graph_captures = t.graph_captures;
  s.graph_capture_seconds = t.graph_capture_seconds;
  s.startup_graph_captures = t.startup_graph_captures;
  s.startup_graph_capture_seconds = t.startup_graph_capture_seconds;
  return s;
}

const EngineConfig& Engine::config() const { return impl_->config; }
const ModelSpec& Engine::spec() const { return impl_->spec; }

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kAbort: return "abort";
    case FinishReason::kNone: break;
  }
  return "";
}

void SamplingParams::validate() const {
  auto fail = [](const std::string& what) { throw InvalidArgument(what); };
  if (n < 1) fail("n is " + num(n) + "; it must be at least 1");
  if (!(temperature >= 0.0f)) fail("temperature is " + std::to_string(temperature) + "; it must be >= 0");
  if (!(top_p > 0.0f && top_p <= 1.0f)) fail("top_p is " + std::to_string(top_p) + "; it must be in (0, 1]");
  if (top_k < -1) fail("top_k is " + num(top_k) + "; use -1 or 0 for off, or a value >= 1");
  if (!(min_p >= 0.0f && min_p <= 1.0f)) fail("min_p is " + std::to_string(min_p) + "; it must be in [0, 1]");
  if (max_tokens && *max_tokens < 1) fail("max_tokens is " + num(*max_tokens) + "; it must be at least 1");
  if (min_tokens < 0) fail("min_tokens is " + num(min_tokens) + "; it must be >= 0");
  if (max_tokens && min_tokens > *max_tokens) {
    fail("min_tokens (" + num(min_tokens) + ") must not exceed max_tokens (" + num(*max_tokens) + ")");
  }
  if (logprobs < 0 || logprobs > 20) fail("logprobs is " + num(logprobs) + "; it must be in [0, 20]");
  if (prompt_logprobs && (*prompt_logprobs < 0 || *prompt_logprobs > 20)) {
    fail("prompt_logprobs is " + num(*prompt_logprobs) + "; it must be in [0, 20]");
  }
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) {
    fail("presence_penalty is " + std::to_string(presence_penalty) + "; it must be in [-2, 2]");
  }
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) {
    fail("frequency_penalty is " + std::to_string(frequency_penalty) + "; it must be in [-2, 2]");
  }
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
    fail("repetition_penalty is " + std::to_string(repetition_penalty) + "; it must be finite and > 0");
  }
  if (beam_width < 0 || beam_width > 10) {
    fail("beam_width is " + num(beam_width) + "; it must be in [1, 10] (0: no beam search)");
  }
  if (beam_width > 0 && n != 1) {
    fail("n is " + num(n) + " with beam_width " + num(beam_width) +
         "; beam search returns beam_width sequences and takes n = 1");
  }
  if (!std::isfinite(length_penalty)) fail("length_penalty is " + std::to_string(length_penalty) + "; it must be finite");
}

}  // namespace octavo
