// octavo::Engine: the synchronous engine. add_request() queues a prompt, step() runs one
// continuous-batching step (every running request advances: a prompt chunk or one decoded token)
// and returns what each request gained; abort() drops a request. Not thread-safe: one thread
// drives it (AsyncEngine, later, runs it on its own thread).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <octavo/config.h>
#include <octavo/model_spec.h>
#include <octavo/request.h>
#include <octavo/sampling_params.h>

namespace octavo {

class MappedModelDir;

/// A weight in host memory, in canonical naming (model_spec.h). The engine copies it during
/// construction; the caller keeps `data` alive until the constructor returns.
struct HostTensor {
  std::string name;
  std::string dtype;  // "float32", "float16" or "bfloat16"
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

struct EngineStats {
  int num_running = 0;
  int num_waiting = 0;
  int num_kv_blocks = 0;
  int num_free_kv_blocks = 0;        // free plus evictable (cached, unreferenced)
  int num_evictable_kv_blocks = 0;   // cached prefix blocks no request holds (reusable, evictable)
  uint64_t num_preemptions = 0;
  uint64_t prefix_cache_queries = 0; // tokens looked up in the prefix cache
  uint64_t prefix_cache_hits = 0;    // tokens found there
  uint64_t prompt_tokens = 0;        // prompt tokens computed (cache hits excluded)
  uint64_t generation_tokens = 0;
  // Where step() spends its time (wall clock, summed over steps that ran a batch): scheduling and
  // packing the batch on the host; the executor (uploads and launches, and the wait for the
  // sampled tokens); turning the results into outputs on the host. With async scheduling the
  // host parts of one step overlap the device's work on the step before.
  uint64_t num_steps = 0;
  uint64_t async_steps = 0;          // steps launched while the step before them still ran
  double schedule_seconds = 0.0;
  double execute_seconds = 0.0;
  double output_seconds = 0.0;
  // Within execute_seconds: the wait for the device's results, and the decode graphs captured
  // mid-run and the time that took. The rest is host time: uploads, launches and captures; on eager
  // steps launches can block on a busy device, so there the wait undercounts the device's time.
  double device_wait_seconds = 0.0;
  uint64_t graph_captures = 0;
  double graph_capture_seconds = 0.0;
  // Before any step, in the constructor: the decode graphs captured (every batch bucket at the
  // block-table widths of contexts up to 8192 tokens) and the time, warm-up passes included.
  uint64_t startup_graph_captures = 0;
  double startup_graph_capture_seconds = 0.0;
};

class Engine {
 public:
  /// Builds the backend, loads the weights (validating every name and shape against the spec)
  /// and sizes the KV pool. Throws InvalidArgument / FormatError / OutOfMemory with the reason.
  Engine(const ModelSpec& spec, const EngineConfig& config, const std::vector<HostTensor>& weights);
  /// Loads the octavo model directory `config.model` (octavo/model_dir.h), mapping its weights.
  /// dtype "auto" takes the stored dtype (float32 runs as bfloat16 on a GPU); empty eos_token_ids
  /// take octavo.json's. Throws FormatError for a missing or malformed directory, else as above.
  explicit Engine(const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// Queues a request. Throws InvalidArgument when it can never run: an empty prompt, a token id
  /// outside the vocabulary, a prompt longer than max_model_len or than the whole KV pool, bad
  /// sampling params.
  RequestId add_request(std::vector<int32_t> prompt_token_ids, const SamplingParams& params);

  /// One scheduling step. Returns an entry for every request that gained tokens or finished.
  /// With config().async_scheduling the call first launches the next step (when the step in
  /// flight allows it), then returns the results of the step before: a step may be on the device
  /// between calls, and has_unfinished() stays true until it has been read.
  std::vector<RequestOutput> step();

  /// Finishes a request with reason kAbort; its output appears in the next step(), and a token
  /// the device was computing for it is dropped. With
  /// whole_group, every sequence forked from it (n > 1) ends too; otherwise only the sequence
  /// `id`. Unknown or already-finished ids are ignored.
  void abort(RequestId id, bool whole_group = true);

  bool has_unfinished() const;
  EngineStats stats() const;
  /// The configuration after defaults were resolved (max_model_len, pool size, ...).
  const EngineConfig& config() const;
  const ModelSpec& spec() const;

 private:
  explicit Engine(const MappedModelDir& model);  // Engine(EngineConfig) delegates here

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace octavo
