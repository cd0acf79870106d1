// octavo::AsyncEngine: the engine loop on its own thread, for servers and native programs. Many
// threads may submit and abort; each request's outputs stream either to a callback or into one
// shared queue that wait_outputs() drains. Wraps octavo::Engine (engine.h), which is synchronous.
//
// Ordering: a request's outputs are delivered in step order, each exactly once, and each
// sequence's last one has finished set (n > 1: one finished output per sequence; beam search:
// its results, all finished, in one step). Every output of one step is delivered before any of
// the next step; within a step, queued outputs become visible before that step's callbacks run.
// Callbacks run on the loop thread, so one callback never runs concurrently with another.
//
// Failure: if a step throws (a device error, a bug), every unfinished request gets a final
// output with finish_reason kAbort and `error` holding the message, the loop stops, and later
// add_request calls throw Error with that message. Nothing waits forever on a failed engine.
//
// Locking: add_request() calls Engine::add_request under the mutex that the loop thread holds
// while it runs a step, so a submission waits for at most the step in progress (the loop lets
// waiting submitters in before it starts another). abort() only queues the id: the loop applies
// it before its next step, so it never waits and may be called from a callback. Callbacks run
// with no lock held.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <octavo/config.h>
#include <octavo/engine.h>
#include <octavo/model_spec.h>
#include <octavo/request.h>
#include <octavo/sampling_params.h>

namespace octavo {

class AsyncEngine {
 public:
  /// Receives one request's outputs, on the loop thread, in step order. It must return quickly
  /// (the next step waits for it). It may call abort(), add_request(), stats() and
  /// num_unfinished(), which do not wait for the loop there; never shutdown(), wait_outputs() or
  /// the destructor. If it throws, its request is aborted and it receives nothing more.
  using OutputCallback = std::function<void(const RequestOutput&)>;

  /// Builds the Engine on the calling thread (its exceptions propagate: InvalidArgument,
  /// FormatError, OutOfMemory, BackendError), then starts the loop thread.
  AsyncEngine(const ModelSpec& spec, const EngineConfig& config,
              const std::vector<HostTensor>& weights);
  /// shutdown(false) if it has not run: in-flight requests are aborted, the thread joined.
  ~AsyncEngine();
  AsyncEngine(const AsyncEngine&) = delete;
  AsyncEngine& operator=(const AsyncEngine&) = delete;

  /// Thread-safe. Validates at once (throws InvalidArgument exactly like Engine::add_request) and
  /// returns the request's id; every output of the request carries it as group_id. Its outputs go
  /// to `on_output` when given, otherwise into the queue that wait_outputs() drains. Waits at
  /// most for the step in progress. Throws Error after shutdown() began, or with the step's
  /// message once a step has failed.
  RequestId add_request(std::vector<int32_t> prompt_token_ids, const SamplingParams& params,
                        OutputCallback on_output = {});

  /// Queues several requests under one hold of the engine, so that no step starts between them
  /// (an offline batch is scheduled as a whole, as the synchronous Engine would). Their outputs
  /// go to the queue. If one is invalid, the ones before it are aborted (their abort outputs
  /// still come) and its InvalidArgument is thrown.
  std::vector<RequestId> add_requests(std::vector<std::vector<int32_t>> prompts,
                                      const std::vector<SamplingParams>& params);

  /// Thread-safe and non-blocking; Engine::abort's meaning (whole_group: every sequence of the
  /// request `id`; otherwise only the sequence `id`). Applied before the next step starts, so
  /// the request's final output (finish_reason kAbort) comes from that step, unless it finished
  /// first. Unknown or finished ids, and calls after the loop stopped, are ignored.
  void abort(RequestId id, bool whole_group = true);

  /// Blocks until the queue holds outputs, `timeout` passes, or the loop has stopped after
  /// shutdown(); returns everything queued, in delivery order (empty on timeout). Thread-safe;
  /// with several callers each output goes to exactly one of them. Negative timeouts count as
  /// zero; timeouts beyond a century as a century.
  std::vector<RequestOutput> wait_outputs(std::chrono::milliseconds timeout);

  /// Stops accepting requests and stops the loop. finish_in_flight: run until every request has
  /// finished; otherwise abort them all (their final kAbort outputs are still delivered). Returns
  /// once the loop thread has exited. Idempotent and thread-safe; a shutdown(false) while another
  /// thread waits in shutdown(true) turns the wait into aborting. Throws Error when called from
  /// an output callback (the loop cannot wait for itself).
  void shutdown(bool finish_in_flight);

  /// The engine's counters as of the last step or submission; never waits for a step.
  EngineStats stats() const;
  /// Requests added and not yet finished (a request finishes with the last of its sequences).
  /// Decremented after the request's final output was queued or its callback returned.
  int num_unfinished() const;
  /// The configuration after the engine resolved its defaults, and the model. Immutable.
  const EngineConfig& config() const;
  const ModelSpec& spec() const;

 private:
  friend struct AsyncEngineTesting;  // fault injection for the tests (cpp/src/core)
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace octavo
