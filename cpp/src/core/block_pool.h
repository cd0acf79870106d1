// The KV block pool: which of the fixed number of KV blocks are free, which are held (and by how many
// block tables), and which hold a full, hashed block that a later request may reuse (prefix caching).
// Blocks are handles: a block id plus metadata. The device bytes live in the executor's KV pool, where
// block id b names the same block in every layer.
//
// Not thread-safe: the engine loop owns it.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace octavo {

using BlockId = int32_t;
using BlockHash = uint64_t;

/// Prefix-cache lookups since construction. The BlockPool counts blocks (one query per lookup);
/// the KVCacheManager counts tokens (see KVCacheManager::prefix_cache_stats).
struct PrefixCacheStats {
  int64_t queries = 0;
  int64_t hits = 0;
  double hit_rate() const { return queries == 0 ? 0.0 : double(hits) / double(queries); }
};

class BlockPool {
 public:
  /// Parent hash of a sequence's first block.
  static constexpr BlockHash kRootHash = 0x6f637461766f0001ULL;

  /// `num_blocks` blocks of `block_size` tokens, all free. With prefix caching off, no block is ever
  /// hashed and freed blocks go straight back to the free list.
  BlockPool(int num_blocks, int block_size, bool enable_prefix_caching = true);

  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  bool enable_prefix_caching() const { return enable_prefix_caching_; }

  /// Blocks allocate() can hand out: the free list plus the evictable (cached, unreferenced) blocks.
  int num_free_blocks() const { return int(free_list_.size()) + num_evictable_; }
  int num_evictable_blocks() const { return num_evictable_; }
  /// Blocks with ref count > 0.
  int num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  /// Fraction of the pool held by requests, in [0, 1]; evictable blocks count as free.
  double usage() const { return double(num_used_blocks()) / double(num_blocks_); }

  /// Takes `n` blocks, each with ref count 1: from the free list first, then from the head of the
  /// LRU of evictable blocks (dropping their hash entries). All or nothing: throws OutOfMemory,
  /// taking none, when fewer than `n` are free.
  std::vector<BlockId> allocate(int n);
  BlockId allocate_one() { return allocate(1).front(); }

  /// One more block table holds `block`. An evictable block (a prefix-cache hit on a block no one
  /// holds) leaves the LRU. Throws InvalidArgument for a block on the free list: allocate it instead.
  void incref(BlockId block);
  /// One block table fewer holds `block`. At ref count 0 a hashed block goes to the tail of the LRU
  /// (it keeps its hash until reused), any other block to the free list. Throws InvalidArgument
  /// when the ref count is already 0 (double free).
  void decref(BlockId block);
  int ref_count(BlockId block) const;

  /// Hash of a full block: chains the parent block's hash, its token ids and an extra key (LoRA id,
  /// cache salt, multimodal input hash; 0 for none) so that equal hashes mean equal prefixes.
  static BlockHash hash_block(BlockHash parent_hash, std::span<const int32_t> token_ids,
                              uint64_t extra_key);

  /// The cached block with this hash whose stored parent hash, token ids and extra key also equal
  /// the given ones, or nullopt. Comparing the contents makes a 64-bit hash collision a miss, never
  /// a wrong reuse. Takes no reference (incref the result to use it). Counts one query.
  std::optional<BlockId> lookup(BlockHash hash, BlockHash parent_hash,
                                std::span<const int32_t> token_ids, uint64_t extra_key);

  /// Publishes a full, computed, held block under `hash`. Returns false, leaving the block uncached,
  /// when another block already holds the hash (the same prefix computed twice, or a collision) or
  /// when prefix caching is off. Throws InvalidArgument if the block is not held, is already cached,
  /// or `token_ids` is not exactly block_size long.
  bool cache_block(BlockId block, BlockHash hash, BlockHash parent_hash,
                   std::span<const int32_t> token_ids, uint64_t extra_key);

  bool is_cached(BlockId block) const;
  /// The hash a cached block is published under, nullopt for an uncached one.
  std::optional<BlockHash> cached_hash(BlockId block) const;

  /// Lookups and hits, in blocks.
  const PrefixCacheStats& stats() const { return stats_; }

  /// Throws octavo::Error naming the first broken invariant (see the members below). O(num_blocks).
  void check_invariants() const;

 private:
  enum class State : uint8_t { kFree, kUsed, kEvictable };

  // Per-block metadata. Invariants:
  //  - state kFree      <=> ref_count 0, not cached, on free_list_;
  //  - state kEvictable <=> ref_count 0, cached, on the LRU list;
  //  - state kUsed      <=> ref_count > 0 (cached or not), on neither list.
  //  - cached <=> hash_table_[hash] == this block. Evictable blocks keep their hash until reused.
  struct Block {
    int32_t ref_count = 0;
    State state = State::kFree;
    bool cached = false;
    BlockHash hash = 0;
    BlockHash parent_hash = 0;  // kept to tell a hash collision from a hit
    uint64_t extra_key = 0;
    BlockId lru_prev = -1;  // toward the LRU head (evicted first)
    BlockId lru_next = -1;
  };

  void check_block_id(BlockId block, const char* operation) const;
  std::span<const int32_t> stored_token_ids(BlockId block) const;
  void lru_push_back(BlockId block);
  void lru_remove(BlockId block);
  void uncache(BlockId block);

  int num_blocks_;
  int block_size_;
  bool enable_prefix_caching_;
  std::vector<Block> blocks_;
  // Stack of blocks with ref count 0 and no hash; popped before any evictable block is reused.
  std::vector<BlockId> free_list_;
  // Doubly linked LRU of evictable blocks through Block::lru_prev/next: head is the least recently
  // freed and is evicted first. free() releases a sequence tail first, so tails are evicted first.
  BlockId lru_head_ = -1;
  BlockId lru_tail_ = -1;
  int num_evictable_ = 0;
  // Token ids of each cached block, block_size per block (empty when prefix caching is off).
  std::vector<int32_t> token_ids_;
  // One block per hash: a second block computed with the same prefix stays uncached.
  std::unordered_map<BlockHash, BlockId> hash_table_;
  PrefixCacheStats stats_;
};

}  // namespace octavo
