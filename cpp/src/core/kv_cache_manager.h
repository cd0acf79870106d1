// Per-request block tables over one BlockPool: which blocks hold a request's KV, where each of its
// tokens is written (slot mapping), prefix-cache reuse at admission, sharing by fork and
// copy-on-write on the first write to a shared block. Bookkeeping only: the copies it asks for are
// performed by the executor.
//
// The scheduler's loop, per step and request:
//   new request:  prefix = get_computed_blocks(token_ids, extra_key);
//                 alloc = allocate_slots(id, token_ids, num_new_tokens, prefix);   // right after
//   running:      alloc = allocate_slots(id, token_ids, num_new_tokens);
//   nullopt means the pool cannot hold it: nothing was taken; wait or preempt someone.
//   finished / preempted: cache_blocks(id, token_ids, num_computed_tokens); free(id);
//
// Not thread-safe: the engine loop owns it.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include <octavo/request.h>  // RequestId

#include "backend/ops.h"  // BlockCopy: the pair the executor's copy_blocks consumes
#include "core/block_pool.h"

namespace octavo {


/// The longest cached prefix of a prompt, found by get_computed_blocks. It holds no references: pass
/// it to allocate_slots before anything else allocates, or the blocks may be evicted (allocate_slots
/// checks and throws).
struct ComputedPrefix {
  std::vector<BlockId> blocks;          // cached blocks holding the prefix, in order
  std::vector<BlockHash> block_hashes;  // their hashes, to tell that none was evicted meanwhile
  int num_computed_tokens = 0;          // blocks.size() * block_size, < the prompt length
  uint64_t extra_key = 0;               // the request's extra key, kept for its later blocks
};

/// What one allocate_slots call changed.
struct Allocation {
  // Blocks this call put in the request's block table, in table order: a copy-on-write destination
  // first (it replaced the shared last block), then the appended blocks.
  std::vector<BlockId> new_blocks;
  // Copy-on-write: the executor copies block src over dst before this step writes. At most one per
  // call; src stays held by the requests that share it.
  std::vector<BlockCopy> copies;
};

/// Slots of one request or of the whole pool, to measure the internal fragmentation of paging.
struct WasteReport {
  int64_t allocated_slots = 0;  // blocks held x block_size
  int64_t used_slots = 0;       // slots holding a token's KV (or reserved for this step's tokens)
  int64_t wasted_slots() const { return allocated_slots - used_slots; }
  double wasted_fraction() const {
    return allocated_slots == 0 ? 0.0 : double(wasted_slots()) / double(allocated_slots);
  }
};

class KVCacheManager {
 public:
  KVCacheManager(int num_blocks, int block_size = 16, bool enable_prefix_caching = true);

  /// The longest run of cached blocks that starts the request's tokens, on a block boundary and
  /// never the whole prompt: at least the last token is left to compute so that its logits exist
  /// (at most (token_ids.size() - 1) / block_size blocks). Takes no references. `extra_key` (LoRA id,
  /// cache salt; 0 for none) is folded into every block hash, so requests with different keys never
  /// share. Empty when prefix caching is off.
  ComputedPrefix get_computed_blocks(std::span<const int32_t> token_ids, uint64_t extra_key = 0);

  /// Reserves slots for the request's next `num_new_tokens` tokens, positions
  /// [num_tokens(request), num_tokens(request) + num_new_tokens); for a new request first takes the
  /// blocks of `prefix`, so positions start at prefix.num_computed_tokens. `token_ids` is every
  /// token the request has (prompt, then output) and must cover the new positions.
  ///
  /// Slots reserved by earlier calls are taken to be computed now: their full blocks are hashed and
  /// published to the prefix cache first (even if this call then fails, so that a preempted request
  /// recomputes from the cache). A write into a shared last block (ref count > 1) moves the request
  /// to a fresh copy, listed in Allocation::copies.
  ///
  /// Returns nullopt, with no block taken, no ref count changed and a new request left unknown,
  /// when the pool cannot hold the new blocks. Throws InvalidArgument on bad sizes or a stale prefix.
  std::optional<Allocation> allocate_slots(RequestId request, std::span<const int32_t> token_ids,
                                           int num_new_tokens, const ComputedPrefix& prefix = {});

  /// Publishes the request's full blocks among its first `num_computed_tokens` positions to the
  /// prefix cache. Idempotent. allocate_slots does this for earlier steps; call it before free() so
  /// that the last step's blocks of a finished or preempted request stay reusable.
  void cache_blocks(RequestId request, std::span<const int32_t> token_ids, int num_computed_tokens);

  /// `child` gets a copy of `parent`'s block table, each block's ref count + 1 (parallel sampling,
  /// beam search). Takes no new block; the first write to the shared last block copies it.
  void fork(RequestId parent, RequestId child);

  /// Drops the request's references, last block first so that a sequence's tail leaves the LRU
  /// before its head. Cached blocks become evictable, the rest free. Throws InvalidArgument for an
  /// unknown (or already freed) request.
  void free(RequestId request);

  bool contains(RequestId request) const { return requests_.count(request) != 0; }
  int num_requests() const { return int(requests_.size()); }
  std::span<const BlockId> block_table(RequestId request) const;
  /// Positions with a reserved slot: [0, num_tokens).
  int num_tokens(RequestId request) const;

  /// Slots of positions [start, start + num_tokens) of the request: block_id * block_size + offset.
  void slot_mapping(RequestId request, int start, int num_tokens, std::span<int64_t> slots) const;
  std::vector<int64_t> slot_mapping(RequestId request, int start, int num_tokens) const;

  /// One request's slots: its blocks x block_size against its tokens.
  WasteReport waste(RequestId request) const;
  /// The pool's: every held block once, a block shared by several requests counted as full as the
  /// fullest of them. Evictable blocks hold no live request's tokens and are not counted.
  WasteReport waste() const;

  int block_size() const { return pool_.block_size(); }
  int num_blocks() const { return pool_.num_blocks(); }
  /// Free plus evictable blocks.
  int num_free_blocks() const { return pool_.num_free_blocks(); }
  double usage() const { return pool_.usage(); }
  /// get_computed_blocks calls, in tokens: queries += the prompt length, hits += the tokens found.
  const PrefixCacheStats& prefix_cache_stats() const { return stats_; }
  const BlockPool& block_pool() const { return pool_; }

  /// Throws octavo::Error naming the first broken invariant: the pool's own, ref count == number of
  /// block tables holding the block, every table exactly covers its tokens, a cached block is full in
  /// every table that holds it. O(num_blocks + total table length).
  void check_invariants() const;

 private:
  struct RequestBlocks {
    // Grows only, except that copy-on-write replaces the last block. Invariants: holds exactly
    // ceil(num_tokens / block_size) blocks; each entry holds one reference on its block; a block with
    // ref count > 1 or a cached block is never written (appends into either go to a new block).
    std::vector<BlockId> block_table;
    // Chain hash of block_table[i] for each full, computed block published so far (the block itself
    // may be uncached when another block already held the hash).
    std::vector<BlockHash> block_hashes;
    int num_tokens = 0;
    uint64_t extra_key = 0;
  };

  RequestBlocks& find(RequestId request, const char* operation);
  const RequestBlocks& find(RequestId request, const char* operation) const;
  void cache_full_blocks(RequestBlocks& blocks, std::span<const int32_t> token_ids, int num_computed_tokens);

  BlockPool pool_;
  std::unordered_map<RequestId, RequestBlocks> requests_;
  PrefixCacheStats stats_;
};

}  // namespace octavo
