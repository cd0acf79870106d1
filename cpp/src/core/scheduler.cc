#include "core/scheduler.h"

#include <algorithm>
#include <string>

#include <octavo/error.h>

namespace octavo {

Scheduler::Scheduler(const SchedulerConfig& config, KVCacheManager& kv_cache)
    : config_(config), kv_cache_(kv_cache) {
  if (config_.max_num_seqs < 1) {
    throw InvalidArgument("max_num_seqs is " + std::to_string(config_.max_num_seqs) +
                          "; it must be at least 1");
  }
  if (config_.max_num_batched_tokens < config_.max_num_seqs) {
    // Every running request must be able to decode one token per step.
    throw InvalidArgument("max_num_batched_tokens (" + std::to_string(config_.max_num_batched_tokens) +
                          ") must be at least max_num_seqs (" + std::to_string(config_.max_num_seqs) +
                          ")");
  }
}

void Scheduler::add(RequestState* request) {
  request->status = RequestStatus::kWaiting;
  waiting_.push_back(request);
}

void Scheduler::add_forked(RequestState* request) {
  request->status = RequestStatus::kRunning;
  running_.push_back(request);
}

void Scheduler::release_blocks(RequestState* request) {
  if (!kv_cache_.contains(request->id)) return;
  kv_cache_.cache_blocks(request->id, request->token_ids, request->num_computed_tokens);
  kv_cache_.free(request->id);
}

void Scheduler::preempt(RequestState* request, bool to_front) {
  release_blocks(request);
  request->num_computed_tokens = 0;
  request->status = RequestStatus::kPreempted;
  if (to_front) {
    waiting_.push_front(request);
  } else {
    waiting_.push_back(request);
  }
  ++num_preemptions_;
}

SchedulerOutput Scheduler::schedule() {
  SchedulerOutput out;
  int token_budget = config_.max_num_batched_tokens;

  for (size_t i = 0; i < running_.size() && token_budget > 0;) {
    RequestState* request = running_[i];
    const int num_new = std::min(request->num_tokens() - request->num_computed_tokens, token_budget);
    if (num_new <= 0) {  // nothing to compute: a beam waiting for its siblings, or a sequence
                         // whose last token the step in flight samples
      ++i;
      continue;
    }
    std::optional<Allocation> allocation;
    bool self_preempted = false;
    while (!(allocation = kv_cache_.allocate_slots(request->id, request->token_ids, num_new))) {
      RequestState* victim = running_.back();
      running_.pop_back();
      preempt(victim);
      out.preempted.push_back(victim);
      if (victim == request) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    out.scheduled.push_back({request, num_new});
    out.block_copies.insert(out.block_copies.end(), allocation->copies.begin(),
                            allocation->copies.end());
    token_budget -= num_new;
    out.num_scheduled_tokens += num_new;
    ++i;
  }
  // A victim is always the last running request, at or behind index i: no request scheduled
  // earlier in this loop is ever preempted.

  if (out.preempted.empty()) {
    while (!waiting_.empty() && token_budget > 0) {
      RequestState* request = waiting_.front();
      // A preempted sequence waits for the token its last step sampled before it recomputes.
      if (request->has_pending_token()) break;
      // A request that will fork counts as all its sequences against the cap.
      int sequences = int(running_.size());
      for (const RequestState* r : running_) sequences += r->num_pending_forks;
      if (sequences + 1 + request->num_pending_forks > config_.max_num_seqs) break;
      ComputedPrefix prefix = request->needs_prompt_logits()
                                  ? ComputedPrefix{}
                                  : kv_cache_.get_computed_blocks(request->token_ids);
      const int num_new =
          std::min(request->num_tokens() - prefix.num_computed_tokens, token_budget);
      std::optional<Allocation> allocation =
          kv_cache_.allocate_slots(request->id, request->token_ids, num_new, prefix);
      if (!allocation) {
        // Beams that wait for their siblings compute nothing but hold blocks; when nothing else
        // runs they could starve a sibling of blocks forever. Preempt one (it keeps its
        // candidates and recomputes its KV later) and try again.
        RequestState* idle = out.scheduled.empty() ? last_idle_running() : nullptr;
        if (idle == nullptr) break;  // first come, first served: nobody overtakes the head
        running_.erase(std::find(running_.begin(), running_.end(), idle));
        preempt(idle, /*to_front=*/false);  // behind the sibling it makes room for
        out.preempted.push_back(idle);
        continue;
      }
      waiting_.pop_front();
      request->num_computed_tokens = prefix.num_computed_tokens;
      request->status = RequestStatus::kRunning;
      running_.push_back(request);
      out.scheduled.push_back({request, num_new});
      out.block_copies.insert(out.block_copies.end(), allocation->copies.begin(),
                              allocation->copies.end());
      token_budget -= num_new;
      out.num_scheduled_tokens += num_new;
    }
  }
  return out;
}

RequestState* Scheduler::last_idle_running() const {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    if ((*it)->num_computed_tokens >= (*it)->num_tokens()) return *it;
  }
  return nullptr;
}

void Scheduler::on_step_done(const SchedulerOutput& output) {
  for (const ScheduledRequest& s : output.scheduled) {
    s.request->num_computed_tokens += s.num_new_tokens;
  }
}

void Scheduler::remove(RequestState* request) {
  auto it = std::find(running_.begin(), running_.end(), request);
  if (it != running_.end()) running_.erase(it);
  auto wit = std::find(waiting_.begin(), waiting_.end(), request);
  if (wit != waiting_.end()) waiting_.erase(wit);
  release_blocks(request);
}

}  // namespace octavo
