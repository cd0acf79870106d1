// The continuous-batching scheduler (policy only: it moves block-table bookkeeping through the
// KVCacheManager it is given and never touches device memory).
//
// Each step, under a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs):
//   1. running requests first, in admission order: each gets what it still lacks (one token when
//      decoding, the rest of its prompt, or a chunk of it, when prefilling);
//   2. when the pool cannot hold a running request's new tokens, the most recently admitted running
//      request is preempted (recompute: its blocks are freed, it goes back to the front of the
//      queue) until it can, or until it is itself the one preempted;
//   3. then waiting requests in arrival order (FCFS, no skipping, so none starves), each reusing its
//      longest cached prefix and chunked to the remaining budget; none is admitted in a step that
//      preempted. A request that needs every prompt position's logits (prompt_logprobs) skips the
//      prefix-cache lookup.
// A running request with nothing to compute (a beam waiting for its siblings' candidates, or a
// sequence whose last token the step in flight samples) is skipped; if the head of the queue cannot get blocks in a step where nothing else runs, the
// most recently admitted such request is preempted to the back of the queue to make room.
// Decode, prefill chunks and prefix-cache hits are one path: a request and its number of new tokens.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "core/kv_cache_manager.h"
#include "core/request_state.h"

namespace octavo {

struct SchedulerConfig {
  int max_num_seqs = 256;
  int max_num_batched_tokens = 8192;
};

struct ScheduledRequest {
  RequestState* request;
  int num_new_tokens;  // positions [num_computed_tokens, num_computed_tokens + num_new_tokens)
};

struct SchedulerOutput {
  std::vector<ScheduledRequest> scheduled;  // running ones first, then newly admitted
  std::vector<BlockCopy> block_copies;      // copy-on-write copies to make before the forward
  std::vector<RequestState*> preempted;     // moved back to the queue this step
  int num_scheduled_tokens = 0;
  bool empty() const { return scheduled.empty(); }
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, KVCacheManager& kv_cache);

  /// Queues a request behind every waiting one.
  void add(RequestState* request);
  /// Adds a sequence forked from a running one (its blocks already shared) to the running set.
  void add_forked(RequestState* request);
  /// Plans one step. The caller runs it, then calls on_step_done with the same output.
  SchedulerOutput schedule();
  /// Marks the scheduled tokens computed.
  void on_step_done(const SchedulerOutput& output);
  /// Drops a request wherever it is (finished or aborted) and frees its blocks, keeping the full
  /// ones in the prefix cache.
  void remove(RequestState* request);

  int num_running() const { return int(running_.size()); }
  int num_waiting() const { return int(waiting_.size()); }
  bool has_unfinished() const { return !running_.empty() || !waiting_.empty(); }
  uint64_t num_preemptions() const { return num_preemptions_; }

 private:
  void preempt(RequestState* request, bool to_front = true);
  /// The most recently admitted running request with nothing left to compute, or nullptr.
  RequestState* last_idle_running() const;
  void release_blocks(RequestState* request);

  SchedulerConfig config_;
  KVCacheManager& kv_cache_;
  std::vector<RequestState*> running_;  // admission order: the back is preempted first
  std::deque<RequestState*> waiting_;   // preempted requests re-enter at the front
  uint64_t num_preemptions_ = 0;
};

}  // namespace octavo
