#include "core/block_pool.h"

#include <algorithm>
#include <string>

#include <octavo/error.h>

namespace octavo {

namespace {

// splitmix64's finalizer: every input bit flips each output bit with probability ~1/2, so chaining
// it over the words of a block gives a well-spread 64-bit hash. Not cryptographic: collisions are
// caught by comparing contents on lookup.
constexpr uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

std::string str(int64_t value) { return std::to_string(value); }

}  // namespace

BlockPool::BlockPool(int num_blocks, int block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), enable_prefix_caching_(enable_prefix_caching) {
  if (num_blocks <= 0) {
    throw InvalidArgument("BlockPool: num_blocks is " + str(num_blocks) + "; it must be at least 1");
  }
  if (block_size <= 0) {
    throw InvalidArgument("BlockPool: block_size is " + str(block_size) + "; it must be at least 1");
  }
  blocks_.resize(num_blocks);
  free_list_.reserve(num_blocks);
  // Pushed in reverse so that a fresh pool hands out blocks 0, 1, 2, ...
  for (BlockId block = num_blocks - 1; block >= 0; --block) free_list_.push_back(block);
  if (enable_prefix_caching) {
    token_ids_.resize(size_t(num_blocks) * size_t(block_size));
    hash_table_.reserve(size_t(num_blocks));
  }
}

void BlockPool::check_block_id(BlockId block, const char* operation) const {
  if (block < 0 || block >= num_blocks_) {
    throw InvalidArgument(std::string("BlockPool::") + operation + ": block " + str(block) +
                          " is outside the pool of " + str(num_blocks_) + " blocks");
  }
}

std::span<const int32_t> BlockPool::stored_token_ids(BlockId block) const {
  return {token_ids_.data() + size_t(block) * size_t(block_size_), size_t(block_size_)};
}

std::vector<BlockId> BlockPool::allocate(int n) {
  if (n < 0) throw InvalidArgument("BlockPool::allocate: asked for " + str(n) + " blocks");
  if (n > num_free_blocks()) {
    throw OutOfMemory("BlockPool::allocate: asked for " + str(n) + " blocks but only " +
                      str(num_free_blocks()) + " of " + str(num_blocks_) +
                      " are free (finish or preempt requests, or give the KV cache more memory)");
  }
  std::vector<BlockId> allocated;
  allocated.reserve(size_t(n));
  for (int i = 0; i < n; ++i) {
    BlockId block;
    if (!free_list_.empty()) {
      block = free_list_.back();
      free_list_.pop_back();
    } else {
      // Only now is a cached prefix given up: the least recently freed one.
      block = lru_head_;
      lru_remove(block);
      uncache(block);
    }
    blocks_[block].ref_count = 1;
    blocks_[block].state = State::kUsed;
    allocated.push_back(block);
  }
  return allocated;
}

void BlockPool::incref(BlockId block) {
  check_block_id(block, "incref");
  Block& meta = blocks_[block];
  if (meta.state == State::kFree) {
    throw InvalidArgument("BlockPool::incref: block " + str(block) +
                          " is on the free list and holds nothing; allocate it instead");
  }
  if (meta.state == State::kEvictable) {
    lru_remove(block);
    meta.state = State::kUsed;
  }
  ++meta.ref_count;
}

void BlockPool::decref(BlockId block) {
  check_block_id(block, "decref");
  Block& meta = blocks_[block];
  if (meta.ref_count == 0) {
    throw InvalidArgument("BlockPool::decref: block " + str(block) +
                          " already has ref count 0 (freed twice)");
  }
  if (--meta.ref_count > 0) return;
  if (meta.cached) {
    meta.state = State::kEvictable;
    lru_push_back(block);
  } else {
    meta.state = State::kFree;
    free_list_.push_back(block);
  }
}

int BlockPool::ref_count(BlockId block) const {
  check_block_id(block, "ref_count");
  return blocks_[block].ref_count;
}

BlockHash BlockPool::hash_block(BlockHash parent_hash, std::span<const int32_t> token_ids,
                                uint64_t extra_key) {
  uint64_t hash = mix64(parent_hash ^ 0x9e3779b97f4a7c15ULL);
  hash = mix64(hash ^ extra_key);
  hash = mix64(hash ^ uint64_t(token_ids.size()));
  // Two token ids per 64-bit word halves the mixing work; the length above disambiguates an odd tail.
  size_t i = 0;
  for (; i + 1 < token_ids.size(); i += 2) {
    hash = mix64(hash ^ (uint64_t(uint32_t(token_ids[i])) | uint64_t(uint32_t(token_ids[i + 1])) << 32));
  }
  if (i < token_ids.size()) hash = mix64(hash ^ uint64_t(uint32_t(token_ids[i])));
  return hash;
}

std::optional<BlockId> BlockPool::lookup(BlockHash hash, BlockHash parent_hash,
                                         std::span<const int32_t> token_ids, uint64_t extra_key) {
  if (!enable_prefix_caching_) return std::nullopt;
  ++stats_.queries;
  auto it = hash_table_.find(hash);
  if (it == hash_table_.end()) return std::nullopt;
  const BlockId block = it->second;
  const Block& meta = blocks_[block];
  std::span<const int32_t> stored = stored_token_ids(block);
  if (meta.parent_hash != parent_hash || meta.extra_key != extra_key ||
      !std::equal(stored.begin(), stored.end(), token_ids.begin(), token_ids.end())) {
    return std::nullopt;  // a 64-bit collision: same hash, other contents
  }
  ++stats_.hits;
  return block;
}

bool BlockPool::cache_block(BlockId block, BlockHash hash, BlockHash parent_hash,
                            std::span<const int32_t> token_ids, uint64_t extra_key) {
  check_block_id(block, "cache_block");
  Block& meta = blocks_[block];
  if (meta.ref_count == 0) {
    throw InvalidArgument("BlockPool::cache_block: block " + str(block) +
                          " is not held by any request; only a held, computed block can be cached");
  }
  if (meta.cached) {
    throw InvalidArgument("BlockPool::cache_block: block " + str(block) + " is already cached");
  }
  if (int64_t(token_ids.size()) != block_size_) {
    throw InvalidArgument("BlockPool::cache_block: block " + str(block) + " has " +
                          str(int64_t(token_ids.size())) + " token ids; only a full block of " +
                          str(block_size_) + " can be cached");
  }
  if (!enable_prefix_caching_) return false;
  auto [it, inserted] = hash_table_.try_emplace(hash, block);
  if (!inserted) return false;
  meta.cached = true;
  meta.hash = hash;
  meta.parent_hash = parent_hash;
  meta.extra_key = extra_key;
  std::copy(token_ids.begin(), token_ids.end(),
            token_ids_.begin() + ptrdiff_t(block) * ptrdiff_t(block_size_));
  return true;
}

bool BlockPool::is_cached(BlockId block) const {
  check_block_id(block, "is_cached");
  return blocks_[block].cached;
}

std::optional<BlockHash> BlockPool::cached_hash(BlockId block) const {
  check_block_id(block, "cached_hash");
  if (!blocks_[block].cached) return std::nullopt;
  return blocks_[block].hash;
}

void BlockPool::lru_push_back(BlockId block) {
  Block& meta = blocks_[block];
  meta.lru_prev = lru_tail_;
  meta.lru_next = -1;
  if (lru_tail_ >= 0) {
    blocks_[lru_tail_].lru_next = block;
  } else {
    lru_head_ = block;
  }
  lru_tail_ = block;
  ++num_evictable_;
}

void BlockPool::lru_remove(BlockId block) {
  Block& meta = blocks_[block];
  if (meta.lru_prev >= 0) {
    blocks_[meta.lru_prev].lru_next = meta.lru_next;
  } else {
    lru_head_ = meta.lru_next;
  }
  if (meta.lru_next >= 0) {
    blocks_[meta.lru_next].lru_prev = meta.lru_prev;
  } else {
    lru_tail_ = meta.lru_prev;
  }
  meta.lru_prev = meta.lru_next = -1;
  --num_evictable_;
}

void BlockPool::uncache(BlockId block) {
  Block& meta = blocks_[block];
  hash_table_.erase(meta.hash);
  meta.cached = false;
  meta.hash = meta.parent_hash = meta.extra_key = 0;
}

void BlockPool::check_invariants() const {
  auto fail = [](const std::string& what) { throw Error("BlockPool invariant broken: " + what); };
  std::vector<uint8_t> on_free_list(size_t(num_blocks_), 0);
  for (BlockId block : free_list_) {
    if (block < 0 || block >= num_blocks_) fail("free list holds block id " + str(block));
    if (on_free_list[block]++) fail("block " + str(block) + " is on the free list twice");
    const Block& meta = blocks_[block];
    if (meta.state != State::kFree || meta.ref_count != 0 || meta.cached) {
      fail("block " + str(block) + " is on the free list with ref count " + str(meta.ref_count) +
           (meta.cached ? " and a cached hash" : ""));
    }
  }
  int lru_length = 0;
  BlockId prev = -1;
  for (BlockId block = lru_head_; block >= 0; block = blocks_[block].lru_next) {
    if (block >= num_blocks_ || ++lru_length > num_blocks_) fail("the LRU list is corrupt");
    const Block& meta = blocks_[block];
    if (meta.lru_prev != prev) fail("block " + str(block) + " has a wrong LRU back link");
    if (meta.state != State::kEvictable || meta.ref_count != 0 || !meta.cached) {
      fail("block " + str(block) + " is in the LRU with ref count " + str(meta.ref_count) +
           (meta.cached ? "" : " and no cached hash"));
    }
    prev = block;
  }
  if (prev != lru_tail_) fail("the LRU tail is block " + str(lru_tail_) + ", the walk ended at " + str(prev));
  if (lru_length != num_evictable_) {
    fail("the LRU holds " + str(lru_length) + " blocks, the count says " + str(num_evictable_));
  }
  int num_used = 0;
  int num_cached = 0;
  for (BlockId block = 0; block < num_blocks_; ++block) {
    const Block& meta = blocks_[block];
    if ((meta.ref_count > 0) != (meta.state == State::kUsed) || meta.ref_count < 0) {
      fail("block " + str(block) + " has ref count " + str(meta.ref_count) +
           " but is not in the matching state");
    }
    if (meta.state == State::kFree && !on_free_list[block]) {
      fail("block " + str(block) + " is free but not on the free list");
    }
    if (meta.state == State::kUsed && on_free_list[block]) {
      fail("block " + str(block) + " is both free and referenced");
    }
    num_used += meta.state == State::kUsed;
    if (meta.cached) {
      ++num_cached;
      auto it = hash_table_.find(meta.hash);
      if (it == hash_table_.end() || it->second != block) {
        fail("cached block " + str(block) + " is missing from the hash table");
      }
    }
  }
  if (int(free_list_.size()) + num_used + num_evictable_ != num_blocks_) {
    fail("free " + str(int64_t(free_list_.size())) + " + used " + str(num_used) + " + evictable " +
         str(num_evictable_) + " != total " + str(num_blocks_));
  }
  if (int(hash_table_.size()) != num_cached) {
    fail("the hash table has " + str(int64_t(hash_table_.size())) + " entries for " +
         str(num_cached) + " cached blocks");
  }
  for (const auto& [hash, block] : hash_table_) {
    if (block < 0 || block >= num_blocks_ || !blocks_[block].cached || blocks_[block].hash != hash) {
      fail("the hash table entry for block " + str(block) + " does not match the block's stored hash");
    }
  }
  if (!enable_prefix_caching_ && num_cached > 0) fail("prefix caching is off but blocks are cached");
}

}  // namespace octavo
