#include <octavo/engine.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>

#include <octavo/error.h>

#include "backend/backend.h"
#include "backend/sampling_rng.h"
#include "core/kv_cache_manager.h"
#include "core/request_state.h"
#include "core/scheduler.h"
#include "model/dtype_convert.h"
#include "model/executor.h"

namespace octavo {
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

  // Who each sampled row of the step belongs to: the request, and the fork index (0: the request
  // itself; i > 0: the i-th sequence to fork from it after this step).
  std::vector<std::pair<RequestState*, int>> sample_owners;

  void build_batch(const SchedulerOutput& scheduled);
  RequestState* fork(RequestState& parent, int index);
  /// Appends a sampled token to a sequence, checks its stop conditions, and returns its output.
  RequestOutput append_token(RequestState& r, const StepResult& result, int row, int top);
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
  if (c.max_num_seqs < 1) {
    throw InvalidArgument("max_num_seqs is " + num(c.max_num_seqs) + "; it must be at least 1");
  }
  if (c.max_num_batched_tokens <= 0) {
    c.max_num_batched_tokens = std::max(std::min(8192, c.max_model_len), c.max_num_seqs);
  }

  if (!(c.gpu_memory_utilization > 0.0f && c.gpu_memory_utilization <= 1.0f)) {
    throw InvalidArgument("gpu_memory_utilization is " + std::to_string(c.gpu_memory_utilization) +
                          "; it must be in (0, 1]");
  }
  const DType dtype = resolve_dtype(c, weights);
  m.backend = make_backend(c.device);
  ExecutorLimits limits{c.max_num_batched_tokens, c.max_num_seqs, c.max_model_len,
                        kMaxLogitBias + kMaxStopTokenIds + int(c.eos_token_ids.size())};
  m.executor = std::make_unique<Executor>(m.spec, *m.backend, dtype, limits, c.block_size, weights);

  // The KV pool takes what is left: on a GPU, the allowed share of the card minus everything
  // allocated so far (weights, step buffers and scratch sized for the largest step, so this is
  // the peak of any step); on the CPU, a fixed budget.
  const size_t block_bytes = Executor::kv_block_bytes(spec, c.block_size, dtype);
  if (c.num_kv_blocks <= 0) {
    size_t kv_bytes = c.cpu_kv_cache_bytes;
    if (std::optional<MemoryInfo> memory = m.backend->memory_info()) {
      const double allowed = double(memory->total_bytes) * c.gpu_memory_utilization;
      const double used = double(memory->total_bytes - memory->free_bytes);
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
  m.kv_cache = std::make_unique<KVCacheManager>(c.num_kv_blocks, c.block_size, c.enable_prefix_caching);
  m.scheduler = std::make_unique<Scheduler>(
      SchedulerConfig{c.max_num_seqs, c.max_num_batched_tokens}, *m.kv_cache);
  m.batch.clear();
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
  auto request = std::make_unique<RequestState>();
  request->id = m.next_id++;
  request->group_id = request->id;
  request->num_pending_forks = params.n - 1;
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

    if (start + n != r.num_tokens()) continue;  // a prompt chunk that does not reach the end
    const SamplingParams& p = r.params;
    // A request about to fork samples all its sequences' first tokens from the same row.
    for (int fork_index = 0; fork_index <= r.num_pending_forks; ++fork_index) {
      sample_owners.emplace_back(&r, fork_index);
      batch.sample_rows.push_back(batch.query_start.back() - 1);
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
    }
    if (p.want_logprobs) batch.num_top_logprobs = std::max(batch.num_top_logprobs, p.logprobs);
  }
}

RequestState* Engine::Impl::fork(RequestState& parent, int index) {
  auto child = std::make_unique<RequestState>(parent);
  child->id = next_id++;
  child->index = index;
  child->num_pending_forks = 0;
  child->seed = fork_seed(parent.seed, index);  // the stream its first row drew from
  kv_cache->fork(parent.id, child->id);
  RequestState* raw = child.get();
  requests.emplace(raw->id, std::move(child));
  scheduler->add_forked(raw);
  return raw;
}

RequestOutput Engine::Impl::append_token(RequestState& r, const StepResult& result, int row,
                                         int top) {
  RequestOutput out;
  out.id = r.id;
  out.group_id = r.group_id;
  out.index = r.index;
  const int32_t token = result.sampled[row];
  const float logprob = result.sampled_logprob[row];
  if (token < 0 || token >= spec.vocab_size) {
    // The GPU sampler flags rows whose logits hold NaN or inf instead of throwing mid-step:
    // this sequence ends, the rest of the batch goes on.
    out.finished = true;
    out.finish_reason = r.finish_reason = FinishReason::kAbort;
    out.error = "the model produced non-finite logits (NaN or inf) for this request";
    out.cumulative_logprob = r.cumulative_logprob;
    r.status = RequestStatus::kFinished;
    return out;
  }
  r.token_ids.push_back(token);
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
  } else if (r.num_tokens() >= r.max_num_tokens) {
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

std::vector<RequestOutput> Engine::step() {
  Impl& m = *impl_;
  std::vector<RequestOutput> outputs = std::move(m.pending_outputs);
  m.pending_outputs.clear();

  SchedulerOutput scheduled = m.scheduler->schedule();
  m.counters.num_preemptions += scheduled.preempted.size();
  if (scheduled.empty()) return outputs;

  m.build_batch(scheduled);
  StepResult result = m.executor->execute(m.batch);
  m.scheduler->on_step_done(scheduled);

  for (const ScheduledRequest& s : scheduled.scheduled) {
    const RequestState& r = *s.request;
    m.counters.prompt_tokens += std::max(0, std::min(r.num_prompt_tokens, r.num_computed_tokens) -
                                                (r.num_computed_tokens - s.num_new_tokens));
  }
  const int top = m.batch.num_top_logprobs;
  // Forks come after their parent's own row; they copy the parent before its token is appended.
  std::vector<std::pair<RequestState*, int>> owners = std::move(m.sample_owners);
  std::vector<RequestState*> forked(owners.size(), nullptr);
  for (size_t row = 0; row < owners.size(); ++row) {
    auto [request, fork_index] = owners[row];
    if (fork_index > 0) forked[row] = m.fork(*request, fork_index);
  }
  for (size_t row = 0; row < owners.size(); ++row) {
    RequestState& r = forked[row] ? *forked[row] : *owners[row].first;
    if (owners[row].second == 0) r.num_pending_forks = 0;
    outputs.push_back(m.append_token(r, result, int(row), top));
  }
  for (RequestOutput& out : outputs) {
    if (!out.finished) continue;
    auto it = m.requests.find(out.id);
    if (it == m.requests.end()) continue;  // an abort reported above
    m.scheduler->remove(it->second.get());
    m.requests.erase(it);
  }
  return outputs;
}

void Engine::abort(RequestId id, bool whole_group) {
  Impl& m = *impl_;
  std::vector<RequestId> victims;
  for (const auto& [sequence_id, request] : m.requests) {
    if (sequence_id == id || (whole_group && request->group_id == id)) victims.push_back(sequence_id);
  }
  std::sort(victims.begin(), victims.end());
  for (RequestId victim : victims) {
    RequestState& r = *m.requests.at(victim);
    m.scheduler->remove(&r);
    RequestOutput out;
    out.id = victim;
    out.group_id = r.group_id;
    out.index = r.index;
    out.finished = true;
    out.finish_reason = FinishReason::kAbort;
    out.cumulative_logprob = r.cumulative_logprob;
    m.pending_outputs.push_back(std::move(out));
    m.requests.erase(victim);
  }
}

bool Engine::has_unfinished() const {
  return impl_->scheduler->has_unfinished() || !impl_->pending_outputs.empty();
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
}

}  // namespace octavo
