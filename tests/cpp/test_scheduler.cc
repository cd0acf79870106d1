// The scheduler's policy on a real KVCacheManager, without a model: token budget, sequence cap,
// FCFS admission, chunked prefill, prefix-cache hits, preemption victim choice, no starvation.
#include <gtest/gtest.h>

#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include <octavo/error.h>

#include "core/kv_cache_manager.h"
#include "core/scheduler.h"

namespace octavo {
namespace {

class SchedulerTest : public ::testing::Test {
 protected:
  void make(int num_blocks, int max_num_seqs, int budget, int block_size = 4) {
    kv = std::make_unique<KVCacheManager>(num_blocks, block_size, true);
    scheduler = std::make_unique<Scheduler>(SchedulerConfig{max_num_seqs, budget}, *kv);
  }
  RequestState* add(int prompt_len, int first_token = 100) {
    auto r = std::make_unique<RequestState>();
    r->id = requests.size() + 1;
    r->token_ids.resize(prompt_len);
    std::iota(r->token_ids.begin(), r->token_ids.end(), first_token + 1000 * int(r->id));
    r->num_prompt_tokens = prompt_len;
    requests.push_back(std::move(r));
    scheduler->add(requests.back().get());
    return requests.back().get();
  }
  // Runs the step as the engine would: computed tokens advance, requests whose scheduled tokens
  // reach their end gain one sampled token.
  SchedulerOutput step() {
    SchedulerOutput out = scheduler->schedule();
    scheduler->on_step_done(out);
    for (const ScheduledRequest& s : out.scheduled) {
      if (s.request->num_computed_tokens == s.request->num_tokens()) {
        s.request->token_ids.push_back(7);
      }
    }
    kv->check_invariants();
    return out;
  }
  static int tokens_of(const SchedulerOutput& out, const RequestState* r) {
    for (const auto& s : out.scheduled) {
      if (s.request == r) return s.num_new_tokens;
    }
    return 0;
  }

  std::unique_ptr<KVCacheManager> kv;
  std::unique_ptr<Scheduler> scheduler;
  std::vector<std::unique_ptr<RequestState>> requests;
};

TEST_F(SchedulerTest, RejectsBudgetBelowSequenceCap) {
  KVCacheManager cache(8, 4);
  EXPECT_THROW(Scheduler(SchedulerConfig{8, 4}, cache), InvalidArgument);
  EXPECT_THROW(Scheduler(SchedulerConfig{0, 4}, cache), InvalidArgument);
}

TEST_F(SchedulerTest, TokenBudgetIsRespectedAndPrefillsAreChunked) {
  make(/*num_blocks=*/64, /*max_num_seqs=*/8, /*budget=*/10);
  RequestState* a = add(25);
  RequestState* b = add(3);
  SchedulerOutput s1 = step();
  EXPECT_EQ(s1.num_scheduled_tokens, 10);
  EXPECT_EQ(tokens_of(s1, a), 10);  // FCFS: a takes the whole budget, b waits
  EXPECT_EQ(tokens_of(s1, b), 0);
  SchedulerOutput s2 = step();
  EXPECT_EQ(tokens_of(s2, a), 10);
  SchedulerOutput s3 = step();
  EXPECT_EQ(tokens_of(s3, a), 5);  // the rest of a's prompt, then b's whole prompt
  EXPECT_EQ(tokens_of(s3, b), 3);
  EXPECT_EQ(a->num_output_tokens(), 1);
  SchedulerOutput s4 = step();  // both decode
  EXPECT_EQ(tokens_of(s4, a), 1);
  EXPECT_EQ(tokens_of(s4, b), 1);
  for (int i = 0; i < 20; ++i) EXPECT_LE(step().num_scheduled_tokens, 10);
}

TEST_F(SchedulerTest, SequenceCapLimitsRunningRequests) {
  make(64, /*max_num_seqs=*/2, /*budget=*/64);
  RequestState* a = add(4);
  RequestState* b = add(4);
  RequestState* c = add(4);
  SchedulerOutput s = step();
  EXPECT_EQ(s.scheduled.size(), 2u);
  EXPECT_EQ(tokens_of(s, c), 0);
  EXPECT_EQ(scheduler->num_running(), 2);
  EXPECT_EQ(scheduler->num_waiting(), 1);
  scheduler->remove(a);
  s = step();
  EXPECT_EQ(tokens_of(s, b), 1);
  EXPECT_EQ(tokens_of(s, c), 4);
}

TEST_F(SchedulerTest, RunningRequestsComeBeforeWaitingOnes) {
  make(64, 8, /*budget=*/8);
  RequestState* a = add(6);
  step();  // a prefilled
  RequestState* b = add(20);
  SchedulerOutput s = step();
  ASSERT_GE(s.scheduled.size(), 2u);
  EXPECT_EQ(s.scheduled[0].request, a);
  EXPECT_EQ(s.scheduled[0].num_new_tokens, 1);
  EXPECT_EQ(tokens_of(s, b), 7);  // what the decode left of the budget
}

TEST_F(SchedulerTest, PrefixCacheHitSkipsTheCachedPart) {
  make(64, 8, 64);
  RequestState* a = add(13, /*first_token=*/5);
  step();
  auto* b = add(13, 5);
  // b's first 12 tokens equal a's (same first_token base differs by id: rebuild them equal)
  b->token_ids = std::vector<int32_t>(a->token_ids.begin(), a->token_ids.begin() + 13);
  SchedulerOutput s = step();
  // 3 full blocks of 4 are cached; the last prompt token is always recomputed.
  EXPECT_EQ(tokens_of(s, b), 1);
  EXPECT_EQ(b->num_computed_tokens, 13);
}

TEST_F(SchedulerTest, PreemptsTheMostRecentlyAdmittedAndRequeuesItFirst) {
  // 6 blocks of 4 tokens = 24 slots. Three requests of 8 prompt tokens take 2 blocks each.
  make(6, 8, 64);
  RequestState* a = add(8);
  RequestState* b = add(8);
  RequestState* c = add(8);
  step();  // all prefilled: 6 blocks used, each request now at 9 tokens
  EXPECT_EQ(kv->num_free_blocks(), 0);
  SchedulerOutput s = step();  // a's 9th token needs a third block: c (last admitted) is preempted
  ASSERT_EQ(s.preempted.size(), 1u);
  EXPECT_EQ(s.preempted[0], c);
  EXPECT_EQ(c->status, RequestStatus::kPreempted);
  EXPECT_EQ(c->num_computed_tokens, 0);
  EXPECT_EQ(tokens_of(s, a), 1);
  EXPECT_EQ(tokens_of(s, b), 1);
  RequestState* d = add(3);
  scheduler->remove(a);  // frees room: the preempted c comes back before the newer d
  s = step();
  EXPECT_GT(tokens_of(s, c), 0);
  EXPECT_EQ(c->status, RequestStatus::kRunning);
  (void)d;
}

TEST_F(SchedulerTest, EveryRequestFinishesUnderPressure) {
  // Many requests of random lengths through a small pool: each finishes (no starvation, no
  // livelock) and the pool is whole at the end.
  std::mt19937 rng(3);
  make(/*num_blocks=*/24, /*max_num_seqs=*/6, /*budget=*/16);
  std::vector<RequestState*> all;
  std::vector<int> output_lens;
  for (int i = 0; i < 40; ++i) {
    all.push_back(add(1 + int(rng() % 30)));
    output_lens.push_back(1 + int(rng() % 40));
  }
  int finished = 0;
  for (int steps = 0; steps < 20000 && finished < 40; ++steps) {
    step();
    for (size_t i = 0; i < all.size(); ++i) {
      RequestState* r = all[i];
      if (r->status != RequestStatus::kFinished && r->num_output_tokens() >= output_lens[i] &&
          r->num_computed_tokens < r->num_tokens()) {
        r->status = RequestStatus::kFinished;
        scheduler->remove(r);
        ++finished;
      }
    }
  }
  EXPECT_EQ(finished, 40);
  EXPECT_FALSE(scheduler->has_unfinished());
  EXPECT_EQ(kv->num_free_blocks(), kv->num_blocks());
  EXPECT_GT(scheduler->num_preemptions(), 0u);
}

}  // namespace
}  // namespace octavo
