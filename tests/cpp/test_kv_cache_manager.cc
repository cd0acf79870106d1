// KVCacheManager: block tables, prefix reuse at admission, fork and copy-on-write, slot mapping,
// waste report, and that a failed allocation leaves nothing behind.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include <octavo/error.h>

#include "core/kv_cache_manager.h"

namespace octavo {
namespace {

constexpr int kBlockSize = 16;

std::vector<int32_t> iota_tokens(int n, int32_t first = 1000) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), first);
  return ids;
}

// Admits a request the way the scheduler does: look up its prefix, then reserve the rest of the
// prompt (all of it in one chunk).
std::optional<Allocation> admit(KVCacheManager& manager, RequestId request,
                                const std::vector<int32_t>& prompt, uint64_t extra_key = 0) {
  ComputedPrefix prefix = manager.get_computed_blocks(prompt, extra_key);
  return manager.allocate_slots(request, prompt, int(prompt.size()) - prefix.num_computed_tokens, prefix);
}

// A snapshot of everything a failed allocation must leave untouched.
struct PoolSnapshot {
  std::vector<int> ref_counts;
  std::vector<bool> cached;
  int num_free, num_evictable;
  bool operator==(const PoolSnapshot&) const = default;
};

PoolSnapshot snapshot(const KVCacheManager& manager) {
  const BlockPool& pool = manager.block_pool();
  PoolSnapshot s{{}, {}, pool.num_free_blocks(), pool.num_evictable_blocks()};
  for (BlockId block = 0; block < pool.num_blocks(); ++block) {
    s.ref_counts.push_back(pool.ref_count(block));
    s.cached.push_back(pool.is_cached(block));
  }
  return s;
}

std::vector<BlockId> table(const KVCacheManager& manager, RequestId request) {
  std::span<const BlockId> t = manager.block_table(request);
  return {t.begin(), t.end()};
}

TEST(KVCacheManager, AllocatesPromptThenDecodes) {
  KVCacheManager manager(8, kBlockSize);
  EXPECT_EQ(manager.block_size(), 16);
  std::vector<int32_t> tokens = iota_tokens(20);
  std::optional<Allocation> prefill = admit(manager, 1, tokens);
  ASSERT_TRUE(prefill);
  EXPECT_EQ(prefill->new_blocks, (std::vector<BlockId>{0, 1}));
  EXPECT_TRUE(prefill->copies.empty());
  EXPECT_EQ(table(manager, 1), (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(manager.num_tokens(1), 20);
  EXPECT_EQ(manager.num_free_blocks(), 6);
  EXPECT_DOUBLE_EQ(manager.usage(), 2.0 / 8.0);

  // Decode into the partial block: no new block until position 32.
  for (int position = 20; position < 32; ++position) {
    tokens.push_back(position);
    std::optional<Allocation> step = manager.allocate_slots(1, tokens, 1);
    ASSERT_TRUE(step);
    EXPECT_TRUE(step->new_blocks.empty());
  }
  tokens.push_back(32);
  std::optional<Allocation> step = manager.allocate_slots(1, tokens, 1);
  ASSERT_TRUE(step);
  EXPECT_EQ(step->new_blocks, (std::vector<BlockId>{2}));
  EXPECT_EQ(manager.num_tokens(1), 33);
  // A zero-token call is a no-op.
  EXPECT_TRUE(manager.allocate_slots(1, tokens, 0)->new_blocks.empty());
  manager.check_invariants();
}

TEST(KVCacheManager, ChunkedPrefillContinuesWhereTheLastChunkEnded) {
  KVCacheManager manager(8, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(40);
  ComputedPrefix prefix = manager.get_computed_blocks(prompt);
  ASSERT_TRUE(manager.allocate_slots(7, prompt, 10, prefix));
  EXPECT_EQ(manager.num_tokens(7), 10);
  ASSERT_TRUE(manager.allocate_slots(7, prompt, 25));
  ASSERT_TRUE(manager.allocate_slots(7, prompt, 5));
  EXPECT_EQ(manager.num_tokens(7), 40);
  EXPECT_EQ(table(manager, 7).size(), 3u);
  // Blocks whose tokens were reserved by earlier calls are published by the next call.
  EXPECT_TRUE(manager.block_pool().is_cached(table(manager, 7)[0]));
  EXPECT_TRUE(manager.block_pool().is_cached(table(manager, 7)[1]));
  EXPECT_FALSE(manager.block_pool().is_cached(table(manager, 7)[2]));
  manager.check_invariants();
}

TEST(KVCacheManager, RejectsBadArguments) {
  KVCacheManager manager(8, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(20);
  EXPECT_THROW(manager.allocate_slots(1, prompt, -1), InvalidArgument);
  try {
    manager.allocate_slots(1, prompt, 21);
    FAIL() << "more slots than token ids must throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("has 20 token ids but asks for slots up to position 21"),
              std::string::npos) << e.what();
  }
  EXPECT_FALSE(manager.contains(1));
  ASSERT_TRUE(admit(manager, 1, prompt));
  EXPECT_THROW(manager.cache_blocks(1, prompt, 21), InvalidArgument);
  EXPECT_THROW(manager.slot_mapping(1, 15, 6), InvalidArgument);
  EXPECT_THROW(manager.slot_mapping(1, -1, 1), InvalidArgument);
  EXPECT_THROW(manager.block_table(2), InvalidArgument);
  EXPECT_THROW(manager.num_tokens(2), InvalidArgument);
  EXPECT_THROW(manager.waste(2), InvalidArgument);
  EXPECT_THROW(manager.fork(2, 3), InvalidArgument);
  EXPECT_THROW(manager.fork(1, 1), InvalidArgument);
  EXPECT_THROW(KVCacheManager(8, 0), InvalidArgument);
  manager.check_invariants();
}

TEST(KVCacheManager, FreeReturnsBlocksAndDoubleFreeThrows) {
  KVCacheManager manager(8, kBlockSize, /*enable_prefix_caching=*/false);
  ASSERT_TRUE(admit(manager, 1, iota_tokens(40)));
  EXPECT_EQ(manager.num_free_blocks(), 5);
  manager.free(1);
  EXPECT_EQ(manager.num_free_blocks(), 8);
  EXPECT_FALSE(manager.contains(1));
  EXPECT_EQ(manager.num_requests(), 0);
  try {
    manager.free(1);
    FAIL() << "double free must throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("request 1 holds no blocks"), std::string::npos) << e.what();
  }
  manager.check_invariants();
}

TEST(KVCacheManager, ExhaustionLeavesNoPartialState) {
  KVCacheManager manager(4, kBlockSize);
  ASSERT_TRUE(admit(manager, 1, iota_tokens(40)));  // 3 blocks
  const PoolSnapshot before = snapshot(manager);
  EXPECT_FALSE(admit(manager, 2, iota_tokens(20, 5000)));  // needs 2, 1 free
  EXPECT_FALSE(manager.contains(2));
  EXPECT_EQ(snapshot(manager), before);
  // A running request that outgrows the pool: nothing changes either.
  std::vector<int32_t> tokens = iota_tokens(40 + 40);
  EXPECT_FALSE(manager.allocate_slots(1, tokens, 40));
  EXPECT_EQ(manager.num_tokens(1), 40);
  EXPECT_EQ(table(manager, 1).size(), 3u);
  manager.check_invariants();
  // The one block that is left still fits a small request.
  EXPECT_TRUE(admit(manager, 3, iota_tokens(16, 9000)));
  EXPECT_EQ(manager.num_free_blocks(), 0);
  manager.check_invariants();
}

TEST(KVCacheManager, ExhaustionWithAPrefixHitLeavesTheCachedBlocksEvictable) {
  KVCacheManager manager(4, kBlockSize);
  const std::vector<int32_t> shared = iota_tokens(48);
  ASSERT_TRUE(admit(manager, 1, shared));
  manager.cache_blocks(1, shared, 48);
  manager.free(1);  // 3 cached blocks become evictable
  ASSERT_EQ(manager.block_pool().num_evictable_blocks(), 3);
  // The same 48 tokens plus 40 more: all 3 cached blocks hit and would revive, and the 40 new tokens
  // need 3 more blocks: 3 + 3 > 4.
  std::vector<int32_t> longer = shared;
  for (int i = 0; i < 40; ++i) longer.push_back(7000 + i);
  const PoolSnapshot before = snapshot(manager);
  ComputedPrefix prefix = manager.get_computed_blocks(longer);
  EXPECT_EQ(prefix.num_computed_tokens, 48);
  EXPECT_FALSE(manager.allocate_slots(2, longer, int(longer.size()) - 48, prefix));
  EXPECT_FALSE(manager.contains(2));
  EXPECT_EQ(snapshot(manager), before);
  manager.check_invariants();
}

TEST(KVCacheManager, PrefixHitStopsAtTheLastFullSharedBlock) {
  KVCacheManager manager(16, kBlockSize);
  const std::vector<int32_t> first = iota_tokens(40);
  ASSERT_TRUE(admit(manager, 1, first));
  manager.cache_blocks(1, first, 40);  // blocks 0 and 1 are full; block 2 holds 8 tokens

  // Shares 40 tokens, then differs: the two full blocks hit, the partial third block cannot.
  std::vector<int32_t> second = first;
  for (int i = 0; i < 10; ++i) second.push_back(9000 + i);
  ComputedPrefix prefix = manager.get_computed_blocks(second);
  EXPECT_EQ(prefix.num_computed_tokens, 32);
  EXPECT_EQ(prefix.blocks, (std::vector<BlockId>{0, 1}));
  ASSERT_TRUE(manager.allocate_slots(2, second, int(second.size()) - 32, prefix));
  EXPECT_EQ(table(manager, 2), (std::vector<BlockId>{0, 1, 3, 4}));
  EXPECT_EQ(manager.block_pool().ref_count(0), 2);
  EXPECT_EQ(manager.block_pool().ref_count(1), 2);
  EXPECT_EQ(manager.num_tokens(2), 50);

  // Shares only 20 tokens (one block and a bit): one block.
  std::vector<int32_t> third(first.begin(), first.begin() + 20);
  for (int i = 0; i < 30; ++i) third.push_back(8000 + i);
  EXPECT_EQ(manager.get_computed_blocks(third).num_computed_tokens, 16);
  // Differs inside the first block: nothing.
  std::vector<int32_t> fourth = first;
  fourth[3] = -1;
  EXPECT_EQ(manager.get_computed_blocks(fourth).num_computed_tokens, 0);
  manager.check_invariants();
}

TEST(KVCacheManager, PrefixHitLeavesTheLastPromptTokenToCompute) {
  KVCacheManager manager(16, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(48);
  ASSERT_TRUE(admit(manager, 1, prompt));
  manager.cache_blocks(1, prompt, 48);  // 3 full cached blocks
  // The same 32-token prompt again: both blocks are cached, but the hit is capped at 31 tokens,
  // i.e. one block, so the last token's logits get computed.
  const std::vector<int32_t> exact(prompt.begin(), prompt.begin() + 32);
  EXPECT_EQ(manager.get_computed_blocks(exact).num_computed_tokens, 16);
  const std::vector<int32_t> one_more(prompt.begin(), prompt.begin() + 33);
  EXPECT_EQ(manager.get_computed_blocks(one_more).num_computed_tokens, 32);
  EXPECT_EQ(manager.get_computed_blocks(prompt).num_computed_tokens, 32);
  // Allocating the capped prefix still reserves the last block for the recomputed tokens.
  ComputedPrefix prefix = manager.get_computed_blocks(exact);
  std::optional<Allocation> allocation = manager.allocate_slots(2, exact, 16, prefix);
  ASSERT_TRUE(allocation);
  EXPECT_EQ(allocation->new_blocks.size(), 1u);
  EXPECT_NE(table(manager, 2)[1], table(manager, 1)[1]);  // never written into the cached block
  EXPECT_EQ(manager.get_computed_blocks(std::vector<int32_t>{}).num_computed_tokens, 0);
  manager.check_invariants();
}

TEST(KVCacheManager, PrefixCacheStatsCountTokens) {
  KVCacheManager manager(16, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(40);
  ASSERT_TRUE(admit(manager, 1, prompt));  // query 40, hit 0
  manager.cache_blocks(1, prompt, 40);
  ASSERT_TRUE(admit(manager, 2, prompt));  // query 40, hit 32
  EXPECT_EQ(manager.prefix_cache_stats().queries, 80);
  EXPECT_EQ(manager.prefix_cache_stats().hits, 32);
  EXPECT_EQ(manager.block_pool().stats().hits, 2);  // the pool counts blocks
}

TEST(KVCacheManager, ExtraKeySeparatesCaches) {
  KVCacheManager manager(16, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(40);
  ASSERT_TRUE(admit(manager, 1, prompt, /*extra_key=*/11));
  manager.cache_blocks(1, prompt, 40);
  EXPECT_EQ(manager.get_computed_blocks(prompt, 0).num_computed_tokens, 0);
  EXPECT_EQ(manager.get_computed_blocks(prompt, 12).num_computed_tokens, 0);
  EXPECT_EQ(manager.get_computed_blocks(prompt, 11).num_computed_tokens, 32);
  // The key sticks to the request: blocks it fills later are cached under it too.
  std::vector<int32_t> tokens = prompt;
  for (int i = 0; i < 9; ++i) {
    tokens.push_back(500 + i);
    ASSERT_TRUE(manager.allocate_slots(1, tokens, 1));
  }
  manager.cache_blocks(1, tokens, 49);
  tokens.push_back(1);
  EXPECT_EQ(manager.get_computed_blocks(tokens, 11).num_computed_tokens, 48);
  EXPECT_EQ(manager.get_computed_blocks(tokens, 0).num_computed_tokens, 0);
  manager.check_invariants();
}

TEST(KVCacheManager, FreedPrefixIsEvictedTailFirstAndItsHashesDropped) {
  KVCacheManager manager(4, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(64);
  ASSERT_TRUE(admit(manager, 1, prompt));
  manager.cache_blocks(1, prompt, 64);
  const std::vector<BlockId> blocks = table(manager, 1);
  manager.free(1);
  EXPECT_EQ(manager.num_free_blocks(), 4);
  EXPECT_EQ(manager.block_pool().num_evictable_blocks(), 4);

  std::vector<int32_t> query = prompt;
  query.push_back(0);
  EXPECT_EQ(manager.get_computed_blocks(query).num_computed_tokens, 64);

  // A request with other tokens needs 1 block; the free list is empty, so the sequence's last block
  // is evicted (freed first) and the prefix shrinks by one block.
  ASSERT_TRUE(admit(manager, 2, iota_tokens(10, 5000)));
  EXPECT_EQ(table(manager, 2), (std::vector<BlockId>{blocks[3]}));
  EXPECT_FALSE(manager.block_pool().is_cached(blocks[3]));
  EXPECT_EQ(manager.get_computed_blocks(query).num_computed_tokens, 48);
  ASSERT_TRUE(admit(manager, 3, iota_tokens(20, 6000)));
  EXPECT_EQ(table(manager, 3), (std::vector<BlockId>{blocks[2], blocks[1]}));
  EXPECT_EQ(manager.get_computed_blocks(query).num_computed_tokens, 16);
  manager.check_invariants();
}

TEST(KVCacheManager, CacheHitRevivesAnEvictableBlock) {
  KVCacheManager manager(4, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(40);
  ASSERT_TRUE(admit(manager, 1, prompt));
  manager.cache_blocks(1, prompt, 40);
  manager.free(1);
  EXPECT_EQ(manager.block_pool().num_evictable_blocks(), 2);

  ASSERT_TRUE(admit(manager, 2, prompt));
  const std::vector<BlockId> blocks = table(manager, 2);
  EXPECT_EQ(manager.block_pool().ref_count(blocks[0]), 1);
  EXPECT_EQ(manager.block_pool().ref_count(blocks[1]), 1);
  EXPECT_EQ(manager.block_pool().num_evictable_blocks(), 0);
  EXPECT_EQ(manager.num_free_blocks(), 1);
  manager.check_invariants();
}

TEST(KVCacheManager, StalePrefixThrows) {
  KVCacheManager manager(2, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(20);
  ASSERT_TRUE(admit(manager, 1, prompt));
  manager.cache_blocks(1, prompt, 20);
  manager.free(1);
  ComputedPrefix prefix = manager.get_computed_blocks(prompt);
  ASSERT_EQ(prefix.num_computed_tokens, 16);
  // Allocating in between evicts the cached block the prefix points at.
  ASSERT_TRUE(admit(manager, 2, iota_tokens(32, 5000)));
  manager.free(2);
  EXPECT_THROW(manager.allocate_slots(3, prompt, 4, prefix), InvalidArgument);
  // A prefix of another prompt is refused too.
  ASSERT_TRUE(admit(manager, 4, prompt));
  manager.cache_blocks(4, prompt, 20);
  ComputedPrefix other = manager.get_computed_blocks(prompt);
  std::vector<int32_t> different = iota_tokens(20, 3);
  EXPECT_THROW(manager.allocate_slots(5, different, 4, other), InvalidArgument);
  // And a prefix for a request that is already running.
  EXPECT_THROW(manager.allocate_slots(4, prompt, 0, other), InvalidArgument);
  manager.check_invariants();
}

TEST(KVCacheManager, ForkSharesEveryBlockAndCopiesOnWrite) {
  KVCacheManager manager(8, kBlockSize);
  std::vector<int32_t> tokens = iota_tokens(20);
  ASSERT_TRUE(admit(manager, 1, tokens));
  manager.fork(1, 2);
  EXPECT_EQ(table(manager, 2), table(manager, 1));
  EXPECT_EQ(manager.num_tokens(2), 20);
  EXPECT_EQ(manager.block_pool().ref_count(0), 2);
  EXPECT_EQ(manager.block_pool().ref_count(1), 2);
  EXPECT_EQ(manager.num_free_blocks(), 6);  // fork takes no block
  manager.check_invariants();

  // The parent writes position 20 into the shared partial block 1: it moves to a copy.
  tokens.push_back(111);
  std::optional<Allocation> parent_step = manager.allocate_slots(1, tokens, 1);
  ASSERT_TRUE(parent_step);
  ASSERT_EQ(parent_step->copies.size(), 1u);
  EXPECT_EQ(parent_step->copies[0].src, 1);
  EXPECT_EQ(parent_step->copies[0].dst, 2);
  EXPECT_EQ(parent_step->new_blocks, (std::vector<BlockId>{2}));
  EXPECT_EQ(table(manager, 1), (std::vector<BlockId>{0, 2}));
  EXPECT_EQ(table(manager, 2), (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(manager.block_pool().ref_count(1), 1);
  EXPECT_EQ(manager.block_pool().ref_count(2), 1);
  EXPECT_EQ(manager.block_pool().ref_count(0), 2);  // the full shared block stays shared
  manager.check_invariants();

  // The child is now the only holder of block 1: it writes in place, no copy.
  std::vector<int32_t> child_tokens = iota_tokens(20);
  child_tokens.push_back(222);
  std::optional<Allocation> child_step = manager.allocate_slots(2, child_tokens, 1);
  ASSERT_TRUE(child_step);
  EXPECT_TRUE(child_step->copies.empty());
  EXPECT_TRUE(child_step->new_blocks.empty());
  EXPECT_EQ(table(manager, 2), (std::vector<BlockId>{0, 1}));

  manager.free(1);
  manager.free(2);
  EXPECT_EQ(manager.num_free_blocks(), 8);
  manager.check_invariants();
}

TEST(KVCacheManager, ForkAtABlockBoundaryNeedsNoCopy) {
  KVCacheManager manager(8, kBlockSize);
  std::vector<int32_t> tokens = iota_tokens(32);
  ASSERT_TRUE(admit(manager, 1, tokens));
  manager.fork(1, 2);
  tokens.push_back(5);
  std::optional<Allocation> step = manager.allocate_slots(2, tokens, 1);
  ASSERT_TRUE(step);
  EXPECT_TRUE(step->copies.empty());
  EXPECT_EQ(step->new_blocks.size(), 1u);
  manager.check_invariants();
}

TEST(KVCacheManager, CopyOnWriteCountsTowardExhaustion) {
  KVCacheManager manager(2, kBlockSize);
  std::vector<int32_t> tokens = iota_tokens(20);
  ASSERT_TRUE(admit(manager, 1, tokens));  // both blocks
  manager.fork(1, 2);
  // allocate_slots publishes the computed blocks even when it fails; do it first to compare the rest.
  manager.cache_blocks(1, tokens, 20);
  tokens.push_back(1);
  const PoolSnapshot before = snapshot(manager);
  EXPECT_FALSE(manager.allocate_slots(1, tokens, 1));  // the copy needs a free block
  EXPECT_EQ(snapshot(manager), before);
  manager.free(2);
  std::optional<Allocation> step = manager.allocate_slots(1, tokens, 1);
  ASSERT_TRUE(step);
  EXPECT_TRUE(step->copies.empty());
  manager.check_invariants();
}

TEST(KVCacheManager, SlotMappingAddressesBlockAndOffset) {
  KVCacheManager manager(8, 4);
  ASSERT_TRUE(admit(manager, 1, iota_tokens(3)));  // block 0
  ASSERT_TRUE(admit(manager, 2, iota_tokens(6)));  // blocks 1, 2
  std::vector<int32_t> tokens = iota_tokens(3);
  for (int i = 0; i < 3; ++i) tokens.push_back(i);
  ASSERT_TRUE(manager.allocate_slots(1, tokens, 3));  // fills block 0, then block 3
  EXPECT_EQ(table(manager, 1), (std::vector<BlockId>{0, 3}));
  EXPECT_EQ(manager.slot_mapping(1, 0, 6), (std::vector<int64_t>{0, 1, 2, 3, 12, 13}));
  EXPECT_EQ(manager.slot_mapping(1, 3, 2), (std::vector<int64_t>{3, 12}));
  EXPECT_EQ(manager.slot_mapping(2, 0, 6), (std::vector<int64_t>{4, 5, 6, 7, 8, 9}));
  EXPECT_TRUE(manager.slot_mapping(2, 6, 0).empty());
  std::vector<int64_t> out(2);
  manager.slot_mapping(2, 4, 2, out);
  EXPECT_EQ(out, (std::vector<int64_t>{8, 9}));
  std::vector<int64_t> too_small(1);
  EXPECT_THROW(manager.slot_mapping(2, 4, 2, too_small), InvalidArgument);
}

TEST(KVCacheManager, WasteReportCountsUnusedSlots) {
  KVCacheManager manager(8, kBlockSize);
  ASSERT_TRUE(admit(manager, 1, iota_tokens(20)));  // 2 blocks, 12 slots unused
  ASSERT_TRUE(admit(manager, 2, iota_tokens(32, 5000)));  // 2 full blocks
  EXPECT_EQ(manager.waste(1).allocated_slots, 32);
  EXPECT_EQ(manager.waste(1).used_slots, 20);
  EXPECT_EQ(manager.waste(1).wasted_slots(), 12);
  EXPECT_DOUBLE_EQ(manager.waste(1).wasted_fraction(), 12.0 / 32.0);
  EXPECT_EQ(manager.waste(2).wasted_slots(), 0);
  EXPECT_EQ(manager.waste().allocated_slots, 64);
  EXPECT_EQ(manager.waste().wasted_slots(), 12);
  // A forked request shares its blocks: the pool's figure counts each block once.
  manager.fork(1, 3);
  EXPECT_EQ(manager.waste(3).wasted_slots(), 12);
  EXPECT_EQ(manager.waste().allocated_slots, 64);
  EXPECT_EQ(manager.waste().wasted_slots(), 12);
  manager.free(1);
  manager.free(2);
  manager.free(3);
  EXPECT_EQ(manager.waste().allocated_slots, 0);
  EXPECT_DOUBLE_EQ(manager.waste().wasted_fraction(), 0.0);
}

TEST(KVCacheManager, DisabledPrefixCachingFindsNothingAndKeepsNothing) {
  KVCacheManager manager(8, kBlockSize, /*enable_prefix_caching=*/false);
  const std::vector<int32_t> prompt = iota_tokens(40);
  ASSERT_TRUE(admit(manager, 1, prompt));
  manager.cache_blocks(1, prompt, 40);
  for (BlockId block : table(manager, 1)) EXPECT_FALSE(manager.block_pool().is_cached(block));
  ASSERT_TRUE(admit(manager, 2, prompt));
  EXPECT_EQ(table(manager, 2), (std::vector<BlockId>{3, 4, 5}));
  manager.free(1);
  EXPECT_EQ(manager.block_pool().num_evictable_blocks(), 0);
  EXPECT_EQ(manager.get_computed_blocks(prompt).num_computed_tokens, 0);
  EXPECT_EQ(manager.prefix_cache_stats().queries, 0);
  manager.check_invariants();
}

TEST(KVCacheManager, TheSamePrefixComputedTwiceIsCachedOnce) {
  KVCacheManager manager(8, kBlockSize);
  const std::vector<int32_t> prompt = iota_tokens(40);
  // Both admitted before either computed anything: neither hits, both compute the same blocks.
  ASSERT_TRUE(admit(manager, 1, prompt));
  ASSERT_TRUE(admit(manager, 2, prompt));
  manager.cache_blocks(1, prompt, 40);
  manager.cache_blocks(2, prompt, 40);
  EXPECT_TRUE(manager.block_pool().is_cached(table(manager, 1)[0]));
  EXPECT_FALSE(manager.block_pool().is_cached(table(manager, 2)[0]));
  manager.free(2);  // its duplicates go straight back to the free list
  EXPECT_EQ(manager.block_pool().num_evictable_blocks(), 0);
  EXPECT_EQ(manager.get_computed_blocks(prompt).blocks, (std::vector<BlockId>{0, 1}));
  manager.check_invariants();
}

}  // namespace
}  // namespace octavo
