// Seeded random workloads over KVCacheManager: many requests admitted (with prefix hits), chunked,
// decoded, forked, preempted and freed, checking the invariants after every operation and the
// contents of every block through a shadow copy of the KV pool that applies the copy-on-write copies.
#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <random>
#include <vector>

#include <octavo/error.h>

#include "core/kv_cache_manager.h"

namespace octavo {
namespace {

struct Config {
  int num_blocks;
  int block_size;
  bool enable_prefix_caching;
  uint64_t seed;
};

struct Counters {
  int64_t admitted = 0, failed_allocations = 0, prefix_hit_tokens = 0, revived_blocks = 0;
  int64_t evictions = 0, copies = 0, forks = 0, frees = 0, tokens_written = 0;
};

// What the test itself knows of a request, independent of the manager's bookkeeping.
struct SimRequest {
  std::vector<int32_t> tokens;  // every token the request has; slots exist for a prefix of them
};

class Simulation {
 public:
  explicit Simulation(const Config& config)
      : config_(config),
        manager_(config.num_blocks, config.block_size, config.enable_prefix_caching),
        rng_(config.seed),
        content_(size_t(config.num_blocks) * config.block_size, -1) {
    // A few shared system prompts so that prefix hits happen; small vocabularies so that outputs
    // of different requests sometimes coincide too.
    for (int i = 0; i < 4; ++i) {
      std::vector<int32_t> prompt(size_t(uniform(8, 48)));
      for (int32_t& token : prompt) token = int32_t(uniform(0, 50));
      shared_prefixes_.push_back(std::move(prompt));
    }
  }

  void run(int num_operations) {
    for (int op = 0; op < num_operations; ++op) {
      const int kind = uniform(0, 99);
      if (kind < 25) {
        admit();
      } else if (kind < 70) {
        step();
      } else if (kind < 80) {
        fork();
      } else if (kind < 97) {
        free_random();
      } else {
        double_free();
      }
      check();
      if (op % 97 == 0) read_back_all();
      if (::testing::Test::HasFailure()) {
        ADD_FAILURE() << "stopped at operation " << op << " of " << num_operations;
        return;
      }
    }
    read_back_all();
    while (!requests_.empty()) free_request(requests_.begin()->first);
    check();
    // No leak: every block is free or evictable.
    EXPECT_EQ(manager_.block_pool().num_used_blocks(), 0);
    EXPECT_EQ(manager_.num_free_blocks(), config_.num_blocks);
  }

  const Counters& counters() const { return counters_; }

 private:
  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  template <class Map>
  RequestId pick(const Map& map) {
    auto it = map.begin();
    std::advance(it, uniform(0, int(map.size()) - 1));
    return it->first;
  }

  void admit() {
    if (requests_.size() >= 24) return;
    SimRequest request;
    if (uniform(0, 4) > 0) {
      const std::vector<int32_t>& shared = shared_prefixes_[size_t(uniform(0, 3))];
      request.tokens.assign(shared.begin(), shared.begin() + uniform(0, int(shared.size())));
    }
    const int suffix = uniform(request.tokens.empty() ? 1 : 0, 24);
    for (int i = 0; i < suffix; ++i) request.tokens.push_back(int32_t(uniform(0, 50)));
    const RequestId id = next_id_++;
    const uint64_t extra_key = uint64_t(uniform(0, 3) == 0);  // a second "LoRA" sharing nothing

    const ComputedPrefix prefix = manager_.get_computed_blocks(request.tokens, extra_key);
    EXPECT_LT(prefix.num_computed_tokens, int(request.tokens.size()));
    // A hit must hold exactly these tokens: read them back from the shadow pool.
    for (size_t i = 0; i < prefix.blocks.size(); ++i) {
      for (int offset = 0; offset < config_.block_size; ++offset) {
        ASSERT_EQ(content_[size_t(prefix.blocks[i]) * config_.block_size + offset],
                  request.tokens[i * config_.block_size + offset])
            << "prefix block " << prefix.blocks[i] << " holds other tokens";
      }
    }
    int revived = 0;
    for (BlockId block : prefix.blocks) revived += manager_.block_pool().ref_count(block) == 0;
    const int remaining = int(request.tokens.size()) - prefix.num_computed_tokens;
    const int chunk = uniform(0, 1) ? remaining : uniform(1, remaining);
    if (allocate(id, request.tokens, chunk, prefix)) {
      ++counters_.admitted;
      counters_.prefix_hit_tokens += prefix.num_computed_tokens;
      counters_.revived_blocks += revived;
      requests_.emplace(id, std::move(request));
    } else {
      EXPECT_FALSE(manager_.contains(id));
    }
  }

  void step() {
    if (requests_.empty()) return;
    const RequestId id = pick(requests_);
    SimRequest& request = requests_.at(id);
    const int num_tokens = manager_.num_tokens(id);
    int num_new_tokens;
    if (num_tokens < int(request.tokens.size())) {
      num_new_tokens = uniform(1, int(request.tokens.size()) - num_tokens);  // prefill chunk or retry
    } else {
      num_new_tokens = uniform(1, 3);  // decode (several tokens: as speculative decoding would)
      for (int i = 0; i < num_new_tokens; ++i) request.tokens.push_back(int32_t(uniform(0, 50)));
    }
    if (!allocate(id, request.tokens, num_new_tokens, {})) {
      // The scheduler would preempt someone (recompute); a random victim, maybe this request.
      free_request(pick(requests_));
    }
  }

  void fork() {
    if (requests_.empty() || requests_.size() >= 32) return;
    const RequestId parent = pick(requests_);
    const RequestId child = next_id_++;
    manager_.fork(parent, child);
    requests_.emplace(child, requests_.at(parent));
    ++counters_.forks;
  }

  void free_random() {
    if (!requests_.empty()) free_request(pick(requests_));
  }

  void double_free() {
    if (freed_.empty()) return;
    EXPECT_THROW(manager_.free(freed_[size_t(uniform(0, int(freed_.size()) - 1))]), InvalidArgument);
  }

  void free_request(RequestId id) {
    read_back(id);
    const SimRequest& request = requests_.at(id);
    manager_.cache_blocks(id, request.tokens, manager_.num_tokens(id));
    manager_.free(id);
    requests_.erase(id);
    freed_.push_back(id);
    ++counters_.frees;
  }

  // allocate_slots, then what the executor does with the result: the copies, then the writes.
  bool allocate(RequestId id, const std::vector<int32_t>& tokens, int num_new_tokens,
                const ComputedPrefix& prefix) {
    const BlockPool& pool = manager_.block_pool();
    const int start = manager_.contains(id) ? manager_.num_tokens(id) : prefix.num_computed_tokens;
    const int free_list_before = pool.num_free_blocks() - pool.num_evictable_blocks();
    std::vector<int> ref_counts_before;
    for (BlockId block = 0; block < pool.num_blocks(); ++block) ref_counts_before.push_back(pool.ref_count(block));
    const int num_free_before = pool.num_free_blocks();

    std::optional<Allocation> allocation = manager_.allocate_slots(id, tokens, num_new_tokens, prefix);
    if (!allocation) {
      ++counters_.failed_allocations;
      // No partial state: not one ref count moved.
      for (BlockId block = 0; block < pool.num_blocks(); ++block) {
        EXPECT_EQ(pool.ref_count(block), ref_counts_before[block]) << "block " << block;
      }
      EXPECT_EQ(pool.num_free_blocks(), num_free_before);
      return false;
    }
    counters_.evictions += std::max(0, int(allocation->new_blocks.size()) - free_list_before);
    EXPECT_LE(allocation->copies.size(), 1u);
    for (const BlockCopy& copy : allocation->copies) {
      EXPECT_GE(pool.ref_count(copy.src), 1);  // still held by whoever shares it
      EXPECT_EQ(pool.ref_count(copy.dst), 1);
      std::copy_n(content_.begin() + ptrdiff_t(copy.src) * config_.block_size, config_.block_size,
                  content_.begin() + ptrdiff_t(copy.dst) * config_.block_size);
      ++counters_.copies;
    }
    write(id, tokens, start, num_new_tokens);
    return true;
  }

  void write(RequestId id, const std::vector<int32_t>& tokens, int start, int num_new_tokens) {
    const BlockPool& pool = manager_.block_pool();
    const std::vector<int64_t> slots = manager_.slot_mapping(id, start, num_new_tokens);
    for (int i = 0; i < num_new_tokens; ++i) {
      const BlockId block = BlockId(slots[i] / config_.block_size);
      // The write-side invariant: a shared or cached block is never written.
      ASSERT_EQ(pool.ref_count(block), 1) << "write of position " << start + i << " into shared block " << block;
      ASSERT_FALSE(pool.is_cached(block)) << "write into cached block " << block;
      content_[size_t(slots[i])] = tokens[size_t(start + i)];
      ++counters_.tokens_written;
    }
  }

  // Every position with a slot reads back, through the block table, the token the request wrote
  // (or found in the prefix cache).
  void read_back(RequestId id) {
    const SimRequest& request = requests_.at(id);
    const int num_tokens = manager_.num_tokens(id);
    const std::vector<int64_t> slots = manager_.slot_mapping(id, 0, num_tokens);
    for (int position = 0; position < num_tokens; ++position) {
      ASSERT_EQ(content_[size_t(slots[position])], request.tokens[size_t(position)])
          << "request " << id << " position " << position;
    }
  }

  void read_back_all() {
    for (const auto& [id, request] : requests_) read_back(id);
  }

  void check() {
    manager_.check_invariants();
    const BlockPool& pool = manager_.block_pool();
    // Recomputed here from the public block tables, not trusted from the manager.
    std::vector<int> holders(size_t(config_.num_blocks), 0);
    for (const auto& [id, request] : requests_) {
      for (BlockId block : manager_.block_table(id)) ++holders[block];
    }
    int num_used = 0;
    for (BlockId block = 0; block < config_.num_blocks; ++block) {
      ASSERT_EQ(pool.ref_count(block), holders[block]) << "block " << block;
      num_used += holders[block] > 0;
    }
    const int num_free_list = pool.num_free_blocks() - pool.num_evictable_blocks();
    ASSERT_EQ(num_free_list + num_used + pool.num_evictable_blocks(), config_.num_blocks);
    ASSERT_EQ(manager_.num_requests(), int(requests_.size()));
  }

  Config config_;
  KVCacheManager manager_;
  std::mt19937_64 rng_;
  std::vector<int32_t> content_;  // the token written in each slot of the shadow KV pool
  std::vector<std::vector<int32_t>> shared_prefixes_;
  std::map<RequestId, SimRequest> requests_;
  std::vector<RequestId> freed_;
  RequestId next_id_ = 1;
  Counters counters_;
};

void run_and_report(const Config& config, int num_operations) {
  Simulation simulation(config);
  simulation.run(num_operations);
  const Counters& c = simulation.counters();
  std::cout << "block_size " << config.block_size << ", prefix caching "
            << (config.enable_prefix_caching ? "on" : "off") << ": " << c.admitted << " admitted, "
            << c.failed_allocations << " failed allocations, " << c.prefix_hit_tokens
            << " prefix-hit tokens, " << c.revived_blocks << " revived blocks, " << c.evictions
            << " evictions, " << c.forks << " forks, " << c.copies << " copies, " << c.frees
            << " frees, " << c.tokens_written << " tokens written\n";
  // The workload must exercise every path it claims to test.
  EXPECT_GT(c.failed_allocations, 0);
  EXPECT_GT(c.copies, 0);
  EXPECT_GT(c.forks, 0);
  if (config.enable_prefix_caching) {
    EXPECT_GT(c.prefix_hit_tokens, 0);
    EXPECT_GT(c.revived_blocks, 0);
    EXPECT_GT(c.evictions, 0);
  } else {
    EXPECT_EQ(c.prefix_hit_tokens, 0);
  }
}

TEST(KVCacheRandom, SmallBlocksWithPrefixCaching) { run_and_report({96, 4, true, 1}, 20000); }
TEST(KVCacheRandom, DefaultBlocksWithPrefixCaching) { run_and_report({48, 16, true, 2}, 20000); }
TEST(KVCacheRandom, SmallBlocksWithoutPrefixCaching) { run_and_report({96, 4, false, 3}, 20000); }

// Paging wastes only the unfilled tail of each sequence's last block: fewer than block_size slots
// per live request, whatever the lengths.
TEST(KVCacheRandom, WastedSlotsStayUnderOneBlockPerRequest) {
  constexpr int kNumRequests = 1000;
  constexpr int kBlockSize = 16;
  std::mt19937_64 rng(7);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  KVCacheManager manager(kNumRequests * (2048 / kBlockSize), kBlockSize);
  std::vector<std::vector<int32_t>> tokens(kNumRequests);
  std::vector<int> output_left(kNumRequests);
  for (int id = 0; id < kNumRequests; ++id) {
    tokens[id].resize(size_t(uniform(100, 1024)));
    for (int32_t& token : tokens[id]) token = int32_t(uniform(0, 31999));
    output_left[id] = uniform(100, 1024);
    const ComputedPrefix prefix = manager.get_computed_blocks(tokens[id]);
    ASSERT_TRUE(manager.allocate_slots(RequestId(id), tokens[id],
                                       int(tokens[id].size()) - prefix.num_computed_tokens, prefix));
  }
  // Continuous decoding, one token per request per step, until every output is complete.
  double worst_fraction = 0;
  for (int step = 0;; ++step) {
    bool any = false;
    for (int id = 0; id < kNumRequests; ++id) {
      if (output_left[id] == 0) continue;
      any = true;
      --output_left[id];
      tokens[id].push_back(int32_t(uniform(0, 31999)));
      ASSERT_TRUE(manager.allocate_slots(RequestId(id), tokens[id], 1));
    }
    if (step % 64 == 0 || !any) {
      const WasteReport waste = manager.waste();
      ASSERT_LT(waste.wasted_slots(), int64_t(kNumRequests) * kBlockSize);
      worst_fraction = std::max(worst_fraction, waste.wasted_fraction());
    }
    if (!any) break;
  }
  manager.check_invariants();
  const WasteReport waste = manager.waste();
  int64_t per_request_sum = 0;
  for (int id = 0; id < kNumRequests; ++id) {
    ASSERT_LT(manager.waste(RequestId(id)).wasted_slots(), kBlockSize);
    per_request_sum += manager.waste(RequestId(id)).wasted_slots();
  }
  EXPECT_EQ(per_request_sum, waste.wasted_slots());  // nothing shared here
  std::cout << "wasted KV slots: " << waste.wasted_slots() << " of " << waste.allocated_slots
            << " allocated (" << 100.0 * waste.wasted_fraction() << "%), "
            << double(waste.wasted_slots()) / kNumRequests << " per request (block_size "
            << kBlockSize << ", " << kNumRequests << " requests, prompt and output U[100, 1024]); "
            << "worst during decode " << 100.0 * worst_fraction << "%\n";
}

}  // namespace
}  // namespace octavo
