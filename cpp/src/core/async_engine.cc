#include <octavo/async_engine.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>

#include <octavo/error.h>

#include "core/async_engine_testing.h"

namespace octavo {

struct AsyncEngine::Impl {
  // A request's sink and progress. The engine reports finished per sequence and forks n > 1
  // sequences only when the first token is sampled (all of them in that one step), so a request
  // is done when every sequence seen so far has finished: an abort before the fork finishes the
  // only sequence there is.
  struct Sequence {
    int index = 0;
    bool finished = false;
  };
  struct Group {
    std::shared_ptr<OutputCallback> callback;  // null: the shared queue
    std::unordered_map<RequestId, Sequence> sequences;
    bool abort_sent = false;        // shutdown(false) has aborted it
    bool callback_failed = false;   // its callback threw: aborted, later outputs dropped
  };
  enum class StopMode { kRunning, kFinish, kAbort };

  Impl(const ModelSpec& spec, const EngineConfig& config, const std::vector<HostTensor>& weights)
      : engine(spec, config, weights), config(engine.config()), spec(engine.spec()),
        stats(engine.stats()) {}

  void loop();
  void run_steps();
  /// Ends the loop for good after an exception: every unfinished request gets a final kAbort
  /// output carrying `error`, and later add_request calls throw it.
  void fail(const std::string& error);
  /// Routes one step's outputs to callbacks and the queue, retires finished requests and runs
  /// the callbacks. Loop thread only, no lock held.
  void deliver(std::vector<RequestOutput> outputs);
  /// A final kAbort output for every unfinished sequence of each request in `ids` (one for the
  /// request itself when none of its sequences has been seen). Caller holds `mutex`.
  std::vector<RequestOutput> final_aborts(const std::vector<RequestId>& ids, const std::string& error);

  /// A submitter's turn: checks that the engine takes requests (throws if not) and counts the
  /// submitter among those the loop waits for; leaving, on every path, uncounts it and lets the
  /// loop go on when it was the last.
  class SubmitterTurn {
   public:
    explicit SubmitterTurn(Impl& m) : m_(m) {
      std::lock_guard<std::mutex> lock(m.mutex);
      if (!m.failure.empty()) throw Error(m.failure);
      if (m.stop_mode != StopMode::kRunning) {
        throw Error("the AsyncEngine is shut down and accepts no new requests");
      }
      ++m.num_waiting_submitters;
    }
    ~SubmitterTurn() {
      {
        std::lock_guard<std::mutex> lock(m_.mutex);
        --m_.num_waiting_submitters;
      }
      m_.work_cv.notify_all();
    }
    SubmitterTurn(const SubmitterTurn&) = delete;
    SubmitterTurn& operator=(const SubmitterTurn&) = delete;

   private:
    Impl& m_;
  };

  // Only the loop thread and add_request() (under engine_mutex) touch the engine.
  Engine engine;
  const EngineConfig config;
  const ModelSpec spec;
  // Held while the engine runs: step() and its aborts on the loop, add_request() on submitters.
  // Lock order: engine_mutex before mutex.
  std::mutex engine_mutex;

  // Guards everything below.
  mutable std::mutex mutex;
  std::condition_variable work_cv;     // the loop: request, abort, shutdown, a submitter done
  std::condition_variable outputs_cv;  // wait_outputs: queue filled, or the loop stopped
  std::unordered_map<RequestId, Group> groups;  // unfinished requests
  std::vector<std::pair<RequestId, bool>> pending_aborts;
  std::vector<RequestOutput> queue;
  EngineStats stats;
  // Submitters between their check and their registration: the loop starts no step while there
  // are any, so a submission waits for at most the step in progress.
  int num_waiting_submitters = 0;
  int num_unfinished = 0;
  StopMode stop_mode = StopMode::kRunning;
  std::string failure;  // a step threw this: the engine takes no more requests
  bool loop_exited = false;
  std::string injected_failure;  // AsyncEngineTesting: the next step throws this

  std::mutex join_mutex;  // one shutdown() joins; concurrent ones wait for it here
  std::thread thread;
  std::thread::id loop_thread_id;  // set before the constructor returns; read-only after
};

void AsyncEngine::Impl::loop() {
  try {
    run_steps();
  } catch (const std::exception& e) {
    fail(e.what());
  } catch (...) {
    fail("unknown exception in the engine loop");
  }
  std::lock_guard<std::mutex> lock(mutex);
  loop_exited = true;
  outputs_cv.notify_all();
}

void AsyncEngine::Impl::run_steps() {
  for (;;) {
    std::vector<std::pair<RequestId, bool>> aborts;
    std::vector<RequestId> registered;
    std::string injected;
    {
      std::unique_lock<std::mutex> lock(mutex);
      work_cv.wait(lock, [&] {
        return num_waiting_submitters == 0 &&
               (!groups.empty() || !pending_aborts.empty() || stop_mode != StopMode::kRunning);
      });
      if (groups.empty() && stop_mode != StopMode::kRunning) return;
      aborts.swap(pending_aborts);
      if (groups.empty()) continue;  // aborts of requests already finished
      injected.swap(injected_failure);
      if (stop_mode == StopMode::kAbort) {
        // Re-checked every step: a submitter that passed its check before shutdown() registers
        // after the first round of aborts.
        for (auto& [id, group] : groups) {
          if (!group.abort_sent) aborts.emplace_back(id, true);
          group.abort_sent = true;
        }
      }
    }

    std::vector<RequestOutput> outputs;
    std::string error;
    {
      std::lock_guard<std::mutex> engine_lock(engine_mutex);
      try {
        if (!injected.empty()) throw BackendError(injected);
        for (const auto& [id, whole_group] : aborts) engine.abort(id, whole_group);
        outputs = engine.step();
        if (!engine.has_unfinished()) {
          // Every request registered by now must finish in `outputs`; one that does not would
          // keep the loop stepping an idle engine forever, so it is ended below.
          std::lock_guard<std::mutex> lock(mutex);
          for (const auto& [id, group] : groups) registered.push_back(id);
        }
      } catch (const std::exception& e) {
        error = e.what();
        if (error.empty()) error = "engine step failed";
      } catch (...) {
        error = "engine step failed with an unknown exception";
      }
      EngineStats snapshot = engine.stats();
      std::lock_guard<std::mutex> lock(mutex);
      stats = snapshot;
    }
    if (!error.empty()) {
      fail(error);
      return;
    }
    deliver(std::move(outputs));

    if (!registered.empty()) {
      std::vector<RequestOutput> orphans;
      {
        std::lock_guard<std::mutex> lock(mutex);
        std::vector<RequestId> left;
        for (RequestId id : registered) {
          if (groups.count(id)) left.push_back(id);
        }
        orphans = final_aborts(left, "internal: the engine dropped this request without a final output");
      }
      deliver(std::move(orphans));
    }
  }
}

std::vector<RequestOutput> AsyncEngine::Impl::final_aborts(const std::vector<RequestId>& ids,
                                                           const std::string& error) {
  std::vector<RequestOutput> outputs;
  for (RequestId id : ids) {
    const Group& group = groups.at(id);
    auto final_output = [&](RequestId sequence, int index) {
      RequestOutput out;
      out.id = sequence;
      out.group_id = id;
      out.index = index;
      out.finished = true;
      out.finish_reason = FinishReason::kAbort;
      out.error = error;
      outputs.push_back(std::move(out));
    };
    if (group.sequences.empty()) final_output(id, 0);
    // Sorted, so that a request's outputs come in sequence order whatever the hash map's order.
    std::vector<std::pair<RequestId, int>> open;
    for (const auto& [sequence, state] : group.sequences) {
      if (!state.finished) open.emplace_back(sequence, state.index);
    }
    std::sort(open.begin(), open.end());
    for (const auto& [sequence, index] : open) final_output(sequence, index);
  }
  return outputs;
}

void AsyncEngine::Impl::fail(const std::string& error) {
  std::vector<RequestOutput> outputs;
  {
    std::lock_guard<std::mutex> lock(mutex);
    failure = error;
    std::vector<RequestId> ids;
    for (const auto& [id, group] : groups) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    outputs = final_aborts(ids, error);
  }
  try {
    deliver(std::move(outputs));
  } catch (...) {
    // Out of memory while failing: the requests stay unfinished, but nothing waits on the loop.
  }
}

void AsyncEngine::Impl::deliver(std::vector<RequestOutput> outputs) {
  if (outputs.empty()) return;
  struct Call {
    std::shared_ptr<OutputCallback> callback;
    const RequestOutput* output;
  };
  std::vector<Call> calls;
  std::vector<RequestId> finished_with_callback;
  bool queued = false;
  {
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<RequestId> touched;
    for (RequestOutput& out : outputs) {
      auto it = groups.find(out.group_id);
      if (it == groups.end()) continue;  // not ours (cannot happen) or already retired
      Group& group = it->second;
      Sequence& sequence = group.sequences[out.id];
      sequence.index = out.index;
      sequence.finished = sequence.finished || out.finished;
      if (touched.empty() || touched.back() != out.group_id) touched.push_back(out.group_id);
      if (group.callback_failed) continue;
      if (group.callback) {
        calls.push_back(Call{group.callback, &out});
      } else {
        queue.push_back(std::move(out));
        queued = true;
      }
    }
    // Decided after the whole step: the sequences a request forks appear in the same step as
    // the parent's first token.
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (RequestId id : touched) {
      auto it = groups.find(id);
      const bool done = std::all_of(it->second.sequences.begin(), it->second.sequences.end(),
                                    [](const auto& entry) { return entry.second.finished; });
      if (!done) continue;
      // A callback request counts as unfinished until its last callback has returned.
      if (it->second.callback && !it->second.callback_failed) {
        finished_with_callback.push_back(id);
      } else {
        --num_unfinished;
      }
      groups.erase(it);
    }
  }
  if (queued) outputs_cv.notify_all();

  std::vector<RequestId> failed;
  for (const Call& call : calls) {
    const RequestId id = call.output->group_id;
    if (std::find(failed.begin(), failed.end(), id) != failed.end()) continue;
    try {
      (*call.callback)(*call.output);
    } catch (...) {
      failed.push_back(id);
    }
  }
  if (failed.empty() && finished_with_callback.empty()) return;
  std::lock_guard<std::mutex> lock(mutex);
  num_unfinished -= int(finished_with_callback.size());
  for (RequestId id : failed) {
    auto it = groups.find(id);
    if (it == groups.end()) continue;  // it finished in this very step
    it->second.callback_failed = true;
    pending_aborts.emplace_back(id, true);
  }
  // The loop thread runs this, so it needs no wake-up for the aborts it just queued.
}

AsyncEngine::AsyncEngine(const ModelSpec& spec, const EngineConfig& config,
                         const std::vector<HostTensor>& weights)
    : impl_(std::make_unique<Impl>(spec, config, weights)) {
  impl_->thread = std::thread([impl = impl_.get()] { impl->loop(); });
  impl_->loop_thread_id = impl_->thread.get_id();
}

AsyncEngine::~AsyncEngine() {
  try {
    shutdown(false);
  } catch (...) {
    // Only a call from the loop thread throws, and that is documented as not allowed.
  }
}

RequestId AsyncEngine::add_request(std::vector<int32_t> prompt_token_ids,
                                   const SamplingParams& params, OutputCallback on_output) {
  Impl& m = *impl_;
  const Impl::SubmitterTurn turn(m);

  std::lock_guard<std::mutex> engine_lock(m.engine_mutex);
  const RequestId id = m.engine.add_request(std::move(prompt_token_ids), params);
  const EngineStats snapshot = m.engine.stats();
  std::lock_guard<std::mutex> lock(m.mutex);
  // The loop failed while this submitter waited: the engine will never step again.
  if (!m.failure.empty()) throw Error(m.failure);
  Impl::Group& group = m.groups[id];
  if (on_output) group.callback = std::make_shared<OutputCallback>(std::move(on_output));
  ++m.num_unfinished;
  m.stats = snapshot;
  return id;
}

std::vector<RequestId> AsyncEngine::add_requests(std::vector<std::vector<int32_t>> prompts,
                                                 const std::vector<SamplingParams>& params) {
  Impl& m = *impl_;
  if (prompts.size() != params.size()) {
    throw InvalidArgument("add_requests: " + std::to_string(prompts.size()) + " prompts and " +
                          std::to_string(params.size()) + " sampling params; give one each");
  }
  const Impl::SubmitterTurn turn(m);

  std::vector<RequestId> ids;
  std::lock_guard<std::mutex> engine_lock(m.engine_mutex);
  auto register_added = [&] {
    const EngineStats snapshot = m.engine.stats();
    std::lock_guard<std::mutex> lock(m.mutex);
    for (RequestId id : ids) m.groups[id];
    m.num_unfinished += int(ids.size());
    m.stats = snapshot;
  };
  try {
    for (size_t i = 0; i < prompts.size(); ++i) {
      ids.push_back(m.engine.add_request(std::move(prompts[i]), params[i]));
    }
  } catch (...) {
    for (RequestId id : ids) m.engine.abort(id);
    register_added();
    throw;
  }
  register_added();
  std::lock_guard<std::mutex> lock(m.mutex);
  if (!m.failure.empty()) throw Error(m.failure);
  return ids;
}

void AsyncEngine::abort(RequestId id, bool whole_group) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mutex);
    if (m.loop_exited) return;
    m.pending_aborts.emplace_back(id, whole_group);
  }
  m.work_cv.notify_all();
}

std::vector<RequestOutput> AsyncEngine::wait_outputs(std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  // Far beyond any real wait, and small enough that now() + timeout cannot overflow.
  constexpr std::chrono::milliseconds kLongest = std::chrono::hours(24 * 365 * 100);
  timeout = std::clamp(timeout, std::chrono::milliseconds(0), kLongest);
  std::unique_lock<std::mutex> lock(m.mutex);
  m.outputs_cv.wait_for(lock, timeout, [&] {
    return !m.queue.empty() || (m.loop_exited && m.stop_mode != Impl::StopMode::kRunning);
  });
  return std::exchange(m.queue, {});
}

void AsyncEngine::shutdown(bool finish_in_flight) {
  Impl& m = *impl_;
  if (std::this_thread::get_id() == m.loop_thread_id) {
    throw Error("AsyncEngine::shutdown called from an output callback; the loop thread cannot "
                "wait for itself (call it from another thread)");
  }
  {
    std::lock_guard<std::mutex> lock(m.mutex);
    if (!finish_in_flight) {
      m.stop_mode = Impl::StopMode::kAbort;
    } else if (m.stop_mode == Impl::StopMode::kRunning) {
      m.stop_mode = Impl::StopMode::kFinish;
    }
  }
  m.work_cv.notify_all();
  std::lock_guard<std::mutex> join_lock(m.join_mutex);
  if (m.thread.joinable()) m.thread.join();
  // Wakes wait_outputs() callers (the loop did too when it exited, before the mode was set if it
  // had failed).
  std::lock_guard<std::mutex> lock(m.mutex);
  m.outputs_cv.notify_all();
}

EngineStats AsyncEngine::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->stats;
}

int AsyncEngine::num_unfinished() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->num_unfinished;
}

void AsyncEngineTesting::fail_next_step(AsyncEngine& engine, std::string message) {
  std::lock_guard<std::mutex> lock(engine.impl_->mutex);
  engine.impl_->injected_failure = std::move(message);
}

const EngineConfig& AsyncEngine::config() const { return impl_->config; }
const ModelSpec& AsyncEngine::spec() const { return impl_->spec; }

}  // namespace octavo
