// BlockPool: free list, ref counts, the prefix-cache hash table and the LRU of evictable blocks.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include <octavo/error.h>

#include "core/block_pool.h"

namespace octavo {
namespace {

constexpr int kBlockSize = 4;

std::vector<int32_t> tokens(int32_t first) {
  std::vector<int32_t> ids(kBlockSize);
  std::iota(ids.begin(), ids.end(), first);
  return ids;
}

// Allocates one block and publishes it with the tokens first, first+1, ... under their chain hash.
BlockId cached_block(BlockPool& pool, int32_t first, BlockHash parent = BlockPool::kRootHash) {
  const BlockId block = pool.allocate_one();
  const std::vector<int32_t> ids = tokens(first);
  EXPECT_TRUE(pool.cache_block(block, BlockPool::hash_block(parent, ids, 0), parent, ids, 0));
  return block;
}

std::optional<BlockId> find(BlockPool& pool, int32_t first, BlockHash parent = BlockPool::kRootHash) {
  const std::vector<int32_t> ids = tokens(first);
  return pool.lookup(BlockPool::hash_block(parent, ids, 0), parent, ids, 0);
}

TEST(BlockPool, FreshPoolHandsOutBlocksInOrder) {
  BlockPool pool(8, kBlockSize);
  EXPECT_EQ(pool.num_blocks(), 8);
  EXPECT_EQ(pool.num_free_blocks(), 8);
  EXPECT_EQ(pool.allocate(3), (std::vector<BlockId>{0, 1, 2}));
  EXPECT_EQ(pool.num_free_blocks(), 5);
  EXPECT_EQ(pool.num_used_blocks(), 3);
  EXPECT_DOUBLE_EQ(pool.usage(), 3.0 / 8.0);
  for (BlockId block : {0, 1, 2}) EXPECT_EQ(pool.ref_count(block), 1);
  EXPECT_EQ(pool.ref_count(3), 0);
  EXPECT_TRUE(pool.allocate(0).empty());
  pool.check_invariants();
}

TEST(BlockPool, RejectsBadSizes) {
  EXPECT_THROW(BlockPool(0, kBlockSize), InvalidArgument);
  EXPECT_THROW(BlockPool(4, 0), InvalidArgument);
  BlockPool pool(4, kBlockSize);
  EXPECT_THROW(pool.allocate(-1), InvalidArgument);
  EXPECT_THROW(pool.ref_count(4), InvalidArgument);
  EXPECT_THROW(pool.decref(-1), InvalidArgument);
}

TEST(BlockPool, AllocationIsAllOrNothing) {
  BlockPool pool(4, kBlockSize);
  pool.allocate(2);
  try {
    pool.allocate(3);
    FAIL() << "allocate(3) with 2 free blocks must throw";
  } catch (const OutOfMemory& e) {
    EXPECT_NE(std::string(e.what()).find("asked for 3 blocks but only 2 of 4"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_EQ(pool.allocate(2).size(), 2u);
  EXPECT_THROW(pool.allocate_one(), OutOfMemory);
  pool.check_invariants();
}

TEST(BlockPool, RefCountsAndFreeList) {
  BlockPool pool(4, kBlockSize);
  const BlockId block = pool.allocate_one();
  pool.incref(block);
  EXPECT_EQ(pool.ref_count(block), 2);
  pool.decref(block);
  EXPECT_EQ(pool.ref_count(block), 1);
  EXPECT_EQ(pool.num_free_blocks(), 3);
  pool.decref(block);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  EXPECT_EQ(pool.num_evictable_blocks(), 0);  // uncached: straight to the free list
  pool.check_invariants();
  // The free list is a stack: the block just freed is the next one handed out.
  EXPECT_EQ(pool.allocate_one(), block);
}

TEST(BlockPool, DoubleFreeAndIncrefOfFreeBlockThrow) {
  BlockPool pool(4, kBlockSize);
  const BlockId block = pool.allocate_one();
  pool.decref(block);
  EXPECT_THROW(pool.decref(block), InvalidArgument);
  EXPECT_THROW(pool.incref(block), InvalidArgument);
  pool.check_invariants();
}

TEST(BlockPool, HashChainsParentTokensAndExtraKey) {
  const std::vector<int32_t> ids = tokens(10);
  const BlockHash hash = BlockPool::hash_block(BlockPool::kRootHash, ids, 0);
  EXPECT_EQ(hash, BlockPool::hash_block(BlockPool::kRootHash, ids, 0));
  EXPECT_NE(hash, BlockPool::hash_block(hash, ids, 0));
  EXPECT_NE(hash, BlockPool::hash_block(BlockPool::kRootHash, ids, 7));
  std::vector<int32_t> swapped = ids;
  std::swap(swapped[0], swapped[1]);
  EXPECT_NE(hash, BlockPool::hash_block(BlockPool::kRootHash, swapped, 0));
  std::vector<int32_t> changed = ids;
  changed.back() += 1;
  EXPECT_NE(hash, BlockPool::hash_block(BlockPool::kRootHash, changed, 0));
}

TEST(BlockPool, CachedBlockIsFoundAndCounted) {
  BlockPool pool(4, kBlockSize);
  const BlockId first = cached_block(pool, 100);
  const BlockId second = cached_block(pool, 200, *pool.cached_hash(first));
  EXPECT_TRUE(pool.is_cached(first));
  EXPECT_EQ(find(pool, 100), first);
  EXPECT_EQ(find(pool, 200, *pool.cached_hash(first)), second);
  EXPECT_EQ(find(pool, 200), std::nullopt);  // right tokens, wrong parent: another prefix
  EXPECT_EQ(find(pool, 300), std::nullopt);
  EXPECT_EQ(pool.stats().queries, 4);
  EXPECT_EQ(pool.stats().hits, 2);
  EXPECT_DOUBLE_EQ(pool.stats().hit_rate(), 0.5);
  pool.check_invariants();
}

TEST(BlockPool, HashCollisionIsAMissNotAWrongReuse) {
  BlockPool pool(4, kBlockSize);
  const BlockId block = pool.allocate_one();
  const BlockHash forced = 42;  // stand-in for two contents that hash alike
  ASSERT_TRUE(pool.cache_block(block, forced, BlockPool::kRootHash, tokens(1), 0));
  EXPECT_EQ(pool.lookup(forced, BlockPool::kRootHash, tokens(1), 0), block);
  EXPECT_EQ(pool.lookup(forced, BlockPool::kRootHash, tokens(2), 0), std::nullopt);
  EXPECT_EQ(pool.lookup(forced, BlockPool::kRootHash + 1, tokens(1), 0), std::nullopt);
  EXPECT_EQ(pool.lookup(forced, BlockPool::kRootHash, tokens(1), 9), std::nullopt);
  // The colliding block cannot take the hash either: it stays uncached.
  const BlockId other = pool.allocate_one();
  EXPECT_FALSE(pool.cache_block(other, forced, BlockPool::kRootHash, tokens(2), 0));
  EXPECT_FALSE(pool.is_cached(other));
  EXPECT_EQ(pool.cached_hash(block), forced);
  pool.check_invariants();
}

TEST(BlockPool, CacheBlockRejectsMisuse) {
  BlockPool pool(4, kBlockSize);
  const BlockId block = pool.allocate_one();
  EXPECT_THROW(pool.cache_block(block, 1, BlockPool::kRootHash, std::vector<int32_t>{1, 2}, 0),
               InvalidArgument);  // not a full block
  EXPECT_THROW(pool.cache_block(3, 1, BlockPool::kRootHash, tokens(0), 0), InvalidArgument);  // not held
  ASSERT_TRUE(pool.cache_block(block, 1, BlockPool::kRootHash, tokens(0), 0));
  EXPECT_THROW(pool.cache_block(block, 2, BlockPool::kRootHash, tokens(0), 0), InvalidArgument);
  pool.check_invariants();
}

TEST(BlockPool, EvictableBlocksAreReusedOnlyWhenTheFreeListIsEmpty) {
  BlockPool pool(4, kBlockSize);
  const BlockId a = cached_block(pool, 100);
  const BlockId b = cached_block(pool, 200);
  const std::vector<BlockId> plain = pool.allocate(2);
  pool.decref(a);
  pool.decref(b);
  for (BlockId block : plain) pool.decref(block);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  EXPECT_EQ(pool.num_evictable_blocks(), 2);
  EXPECT_EQ(pool.num_used_blocks(), 0);
  pool.check_invariants();

  // Evictable blocks keep their hash until reused.
  EXPECT_EQ(find(pool, 100), a);
  const std::vector<BlockId> from_free_list = pool.allocate(2);
  EXPECT_EQ((std::vector<BlockId>{from_free_list[1], from_free_list[0]}), plain);
  EXPECT_TRUE(pool.is_cached(a));
  EXPECT_TRUE(pool.is_cached(b));

  // Free list empty: the least recently freed cached block (a) goes first, and its entry with it.
  EXPECT_EQ(pool.allocate_one(), a);
  EXPECT_FALSE(pool.is_cached(a));
  EXPECT_EQ(pool.cached_hash(a), std::nullopt);
  EXPECT_EQ(find(pool, 100), std::nullopt);
  EXPECT_EQ(find(pool, 200), b);
  pool.check_invariants();
  // Reallocated, the block can be cached again under new contents.
  EXPECT_TRUE(pool.cache_block(a, BlockPool::hash_block(BlockPool::kRootHash, tokens(300), 0),
                               BlockPool::kRootHash, tokens(300), 0));
  EXPECT_EQ(find(pool, 300), a);
  pool.check_invariants();
}

TEST(BlockPool, LruEvictsInFreeOrder) {
  BlockPool pool(3, kBlockSize);
  const BlockId a = cached_block(pool, 100);
  const BlockId b = cached_block(pool, 200);
  const BlockId c = cached_block(pool, 300);
  pool.decref(c);
  pool.decref(a);
  pool.decref(b);
  EXPECT_EQ(pool.allocate(3), (std::vector<BlockId>{c, a, b}));
  EXPECT_EQ(pool.num_free_blocks(), 0);
  for (int32_t first : {100, 200, 300}) EXPECT_EQ(find(pool, first), std::nullopt);
  pool.check_invariants();
}

TEST(BlockPool, CacheHitRevivesAnEvictableBlock) {
  BlockPool pool(2, kBlockSize);
  const BlockId a = cached_block(pool, 100);
  const BlockId b = cached_block(pool, 200);
  pool.decref(a);
  pool.decref(b);
  ASSERT_EQ(pool.num_evictable_blocks(), 2);

  const std::optional<BlockId> hit = find(pool, 100);
  ASSERT_EQ(hit, a);
  pool.incref(*hit);  // ref count 0 -> 1: leaves the LRU, keeps its hash
  EXPECT_EQ(pool.ref_count(a), 1);
  EXPECT_EQ(pool.num_evictable_blocks(), 1);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_TRUE(pool.is_cached(a));
  pool.check_invariants();

  // The held block is never evicted: the only candidate is b.
  EXPECT_EQ(pool.allocate_one(), b);
  EXPECT_THROW(pool.allocate_one(), OutOfMemory);
  EXPECT_EQ(find(pool, 100), a);
  // Released again, it returns to the LRU tail still cached.
  pool.decref(a);
  EXPECT_EQ(pool.num_evictable_blocks(), 1);
  pool.check_invariants();
}

TEST(BlockPool, DisabledPrefixCachingNeverHashes) {
  BlockPool pool(2, kBlockSize, /*enable_prefix_caching=*/false);
  const BlockId block = pool.allocate_one();
  EXPECT_FALSE(pool.cache_block(block, 1, BlockPool::kRootHash, tokens(0), 0));
  EXPECT_FALSE(pool.is_cached(block));
  EXPECT_EQ(pool.lookup(1, BlockPool::kRootHash, tokens(0), 0), std::nullopt);
  pool.decref(block);
  EXPECT_EQ(pool.num_evictable_blocks(), 0);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_EQ(pool.stats().queries, 0);
  pool.check_invariants();
}

}  // namespace
}  // namespace octavo
