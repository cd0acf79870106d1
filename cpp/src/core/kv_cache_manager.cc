#include "core/kv_cache_manager.h"

#include <algorithm>
#include <string>

#include <octavo/error.h>

namespace octavo {

namespace {

std::string str(int64_t value) { return std::to_string(value); }

int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace

KVCacheManager::KVCacheManager(int num_blocks, int block_size, bool enable_prefix_caching)
    : pool_(num_blocks, block_size, enable_prefix_caching) {}

KVCacheManager::RequestBlocks& KVCacheManager::find(RequestId request, const char* operation) {
  auto it = requests_.find(request);
  if (it == requests_.end()) {
    throw InvalidArgument(std::string("KVCacheManager::") + operation + ": request " +
                          std::to_string(request) + " holds no blocks (never allocated, or freed)");
  }
  return it->second;
}

const KVCacheManager::RequestBlocks& KVCacheManager::find(RequestId request,
                                                          const char* operation) const {
  return const_cast<KVCacheManager*>(this)->find(request, operation);
}

ComputedPrefix KVCacheManager::get_computed_blocks(std::span<const int32_t> token_ids,
                                                   uint64_t extra_key) {
  ComputedPrefix prefix;
  prefix.extra_key = extra_key;
  if (!pool_.enable_prefix_caching() || token_ids.empty()) return prefix;
  const int block_size = pool_.block_size();
  // Leave at least the last token to compute: the step that computes it produces the logits.
  const int max_blocks = int(token_ids.size() - 1) / block_size;
  BlockHash parent_hash = BlockPool::kRootHash;
  for (int i = 0; i < max_blocks; ++i) {
    std::span<const int32_t> block_tokens = token_ids.subspan(size_t(i) * block_size, block_size);
    const BlockHash hash = BlockPool::hash_block(parent_hash, block_tokens, extra_key);
    std::optional<BlockId> block = pool_.lookup(hash, parent_hash, block_tokens, extra_key);
    if (!block) break;
    prefix.blocks.push_back(*block);
    prefix.block_hashes.push_back(hash);
    parent_hash = hash;
  }
  prefix.num_computed_tokens = int(prefix.blocks.size()) * block_size;
  stats_.queries += int64_t(token_ids.size());
  stats_.hits += prefix.num_computed_tokens;
  return prefix;
}

std::optional<Allocation> KVCacheManager::allocate_slots(RequestId request,
                                                         std::span<const int32_t> token_ids,
                                                         int num_new_tokens,
                                                         const ComputedPrefix& prefix) {
  const int block_size = pool_.block_size();
  auto it = requests_.find(request);
  const bool is_new = it == requests_.end();
  if (num_new_tokens < 0) {
    throw InvalidArgument("allocate_slots: request " + std::to_string(request) + " asked for " +
                          str(num_new_tokens) + " new tokens; the count must be >= 0");
  }
  if (!is_new && !prefix.blocks.empty()) {
    throw InvalidArgument("allocate_slots: request " + std::to_string(request) +
                          " is already running; a computed prefix applies only to a new request");
  }
  const int num_tokens_before = is_new ? prefix.num_computed_tokens : it->second.num_tokens;
  const int64_t num_tokens_after = int64_t(num_tokens_before) + num_new_tokens;
  if (num_tokens_after > int64_t(token_ids.size())) {
    throw InvalidArgument("allocate_slots: request " + std::to_string(request) + " has " +
                          str(int64_t(token_ids.size())) + " token ids but asks for slots up to position " +
                          str(num_tokens_after) + " (" + str(num_tokens_before) + " reserved + " +
                          str(num_new_tokens) + " new); pass all of the request's token ids");
  }
  if (is_new && !prefix.blocks.empty()) {
    if (prefix.block_hashes.size() != prefix.blocks.size() ||
        prefix.num_computed_tokens != int(prefix.blocks.size()) * block_size ||
        prefix.num_computed_tokens >= int(token_ids.size())) {
      throw InvalidArgument("allocate_slots: the computed prefix of request " + std::to_string(request) +
                            " (" + str(int64_t(prefix.blocks.size())) + " blocks, " +
                            str(prefix.num_computed_tokens) + " tokens) is inconsistent with " +
                            str(int64_t(token_ids.size())) + " token ids; use get_computed_blocks' result as is");
    }
    BlockHash parent_hash = BlockPool::kRootHash;
    for (size_t i = 0; i < prefix.blocks.size(); ++i) {
      const BlockHash hash = BlockPool::hash_block(
          parent_hash, token_ids.subspan(i * size_t(block_size), block_size), prefix.extra_key);
      if (hash != prefix.block_hashes[i] || pool_.cached_hash(prefix.blocks[i]) != hash) {
        throw InvalidArgument("allocate_slots: computed prefix block " + str(prefix.blocks[i]) +
                              " of request " + std::to_string(request) +
                              " no longer caches these tokens (evicted since get_computed_blocks, or "
                              "another prompt's prefix); call get_computed_blocks right before allocate_slots");
      }
      parent_hash = hash;
    }
  }

  if (!is_new) cache_full_blocks(it->second, token_ids, num_tokens_before);

  // Count every block this call takes from the free + evictable pool before touching anything, so
  // that failure leaves no partial state.
  const int table_size = is_new ? int(prefix.blocks.size()) : int(it->second.block_table.size());
  const int num_appended = ceil_div(int(num_tokens_after), block_size) - table_size;
  const bool copy_on_write = !is_new && num_new_tokens > 0 && num_tokens_before % block_size != 0 &&
                             pool_.ref_count(it->second.block_table.back()) > 1;
  int num_revived = 0;  // evictable prefix blocks leave the LRU, so they too come out of the free count
  for (BlockId block : prefix.blocks) num_revived += pool_.ref_count(block) == 0;
  if (num_appended + int(copy_on_write) + num_revived > pool_.num_free_blocks()) return std::nullopt;

  if (is_new) {
    it = requests_.emplace(request, RequestBlocks{}).first;
    RequestBlocks& blocks = it->second;
    blocks.extra_key = prefix.extra_key;
    blocks.block_table = prefix.blocks;
    blocks.block_hashes = prefix.block_hashes;
    blocks.num_tokens = prefix.num_computed_tokens;
    for (BlockId block : prefix.blocks) pool_.incref(block);
  }
  RequestBlocks& blocks = it->second;
  Allocation allocation;
  if (copy_on_write) {
    const BlockId shared = blocks.block_table.back();
    const BlockId copy = pool_.allocate_one();
    allocation.copies.push_back(BlockCopy{shared, copy});
    allocation.new_blocks.push_back(copy);
    blocks.block_table.back() = copy;
    pool_.decref(shared);
  }
  for (BlockId block : pool_.allocate(num_appended)) {
    blocks.block_table.push_back(block);
    allocation.new_blocks.push_back(block);
  }
  blocks.num_tokens = int(num_tokens_after);
  return allocation;
}

void KVCacheManager::cache_full_blocks(RequestBlocks& blocks, std::span<const int32_t> token_ids,
                                       int num_computed_tokens) {
  if (!pool_.enable_prefix_caching()) return;
  const int block_size = pool_.block_size();
  const int num_full_blocks = num_computed_tokens / block_size;
  for (int i = int(blocks.block_hashes.size()); i < num_full_blocks; ++i) {
    const BlockHash parent_hash = i == 0 ? BlockPool::kRootHash : blocks.block_hashes[i - 1];
    std::span<const int32_t> block_tokens = token_ids.subspan(size_t(i) * block_size, block_size);
    const BlockHash hash = BlockPool::hash_block(parent_hash, block_tokens, blocks.extra_key);
    const BlockId block = blocks.block_table[i];
    // A block shared by fork may already have been published by another holder.
    if (!pool_.is_cached(block)) pool_.cache_block(block, hash, parent_hash, block_tokens, blocks.extra_key);
    blocks.block_hashes.push_back(hash);
  }
}

void KVCacheManager::cache_blocks(RequestId request, std::span<const int32_t> token_ids,
                                  int num_computed_tokens) {
  RequestBlocks& blocks = find(request, "cache_blocks");
  if (num_computed_tokens < 0 || num_computed_tokens > blocks.num_tokens ||
      num_computed_tokens > int64_t(token_ids.size())) {
    throw InvalidArgument("cache_blocks: request " + std::to_string(request) + " claims " +
                          str(num_computed_tokens) + " computed tokens; it has " +
                          str(blocks.num_tokens) + " slots and " + str(int64_t(token_ids.size())) +
                          " token ids");
  }
  cache_full_blocks(blocks, token_ids, num_computed_tokens);
}

void KVCacheManager::fork(RequestId parent, RequestId child) {
  const RequestBlocks& parent_blocks = find(parent, "fork");
  if (requests_.count(child) != 0) {
    throw InvalidArgument("fork: child request " + std::to_string(child) + " of " +
                          std::to_string(parent) + " already holds blocks; fork into a new id");
  }
  RequestBlocks child_blocks = parent_blocks;
  for (BlockId block : child_blocks.block_table) pool_.incref(block);
  requests_.emplace(child, std::move(child_blocks));
}

void KVCacheManager::free(RequestId request) {
  auto it = requests_.find(request);
  if (it == requests_.end()) {
    throw InvalidArgument("free: request " + std::to_string(request) +
                          " holds no blocks (never allocated, or already freed)");
  }
  const std::vector<BlockId>& block_table = it->second.block_table;
  for (auto block = block_table.rbegin(); block != block_table.rend(); ++block) pool_.decref(*block);
  requests_.erase(it);
}

std::span<const BlockId> KVCacheManager::block_table(RequestId request) const {
  return find(request, "block_table").block_table;
}

int KVCacheManager::num_tokens(RequestId request) const { return find(request, "num_tokens").num_tokens; }

void KVCacheManager::slot_mapping(RequestId request, int start, int num_tokens,
                                  std::span<int64_t> slots) const {
  const RequestBlocks& blocks = find(request, "slot_mapping");
  if (start < 0 || num_tokens < 0 || int64_t(start) + num_tokens > blocks.num_tokens) {
    throw InvalidArgument("slot_mapping: positions [" + str(start) + ", " +
                          str(int64_t(start) + num_tokens) + ") of request " + std::to_string(request) +
                          " are outside its " + str(blocks.num_tokens) + " reserved slots");
  }
  if (int64_t(slots.size()) < num_tokens) {
    throw InvalidArgument("slot_mapping: output holds " + str(int64_t(slots.size())) + " slots, " +
                          str(num_tokens) + " needed");
  }
  const int block_size = pool_.block_size();
  for (int i = 0; i < num_tokens; ++i) {
    const int position = start + i;
    slots[i] = int64_t(blocks.block_table[position / block_size]) * block_size + position % block_size;
  }
}

std::vector<int64_t> KVCacheManager::slot_mapping(RequestId request, int start, int num_tokens) const {
  std::vector<int64_t> slots(size_t(std::max(num_tokens, 0)));
  slot_mapping(request, start, num_tokens, slots);
  return slots;
}

WasteReport KVCacheManager::waste(RequestId request) const {
  const RequestBlocks& blocks = find(request, "waste");
  return {int64_t(blocks.block_table.size()) * pool_.block_size(), blocks.num_tokens};
}

WasteReport KVCacheManager::waste() const {
  const int block_size = pool_.block_size();
  std::vector<int> fill(size_t(pool_.num_blocks()), 0);
  for (const auto& [request, blocks] : requests_) {
    for (size_t i = 0; i < blocks.block_table.size(); ++i) {
      const int filled = std::min(block_size, blocks.num_tokens - int(i) * block_size);
      int& block_fill = fill[blocks.block_table[i]];
      block_fill = std::max(block_fill, filled);
    }
  }
  WasteReport report;
  for (int filled : fill) {
    if (filled == 0) continue;
    report.allocated_slots += block_size;
    report.used_slots += filled;
  }
  return report;
}

void KVCacheManager::check_invariants() const {
  pool_.check_invariants();
  auto fail = [](const std::string& what) { throw Error("KVCacheManager invariant broken: " + what); };
  const int block_size = pool_.block_size();
  std::vector<int> holders(size_t(pool_.num_blocks()), 0);
  for (const auto& [request, blocks] : requests_) {
    const std::string name = "request " + std::to_string(request);
    if (int(blocks.block_table.size()) != ceil_div(blocks.num_tokens, block_size)) {
      fail(name + " holds " + str(int64_t(blocks.block_table.size())) + " blocks for " +
           str(blocks.num_tokens) + " tokens");
    }
    if (int(blocks.block_hashes.size()) > blocks.num_tokens / block_size) {
      fail(name + " has hashes for " + str(int64_t(blocks.block_hashes.size())) +
           " blocks but only " + str(blocks.num_tokens / block_size) + " full ones");
    }
    for (size_t i = 0; i < blocks.block_table.size(); ++i) {
      const BlockId block = blocks.block_table[i];
      if (block < 0 || block >= pool_.num_blocks()) fail(name + " holds block id " + str(block));
      ++holders[block];
      if (std::optional<BlockHash> hash = pool_.cached_hash(block)) {
        // A cached block must be full here too, or the request would write into it.
        if (int64_t(i + 1) * block_size > blocks.num_tokens) {
          fail(name + " would write into cached block " + str(block) + " at table index " + str(int64_t(i)));
        }
        if (i < blocks.block_hashes.size() && *hash != blocks.block_hashes[i]) {
          fail(name + " chained block " + str(block) + " under another hash than the pool's");
        }
      }
    }
  }
  for (BlockId block = 0; block < pool_.num_blocks(); ++block) {
    if (holders[block] != pool_.ref_count(block)) {
      fail("block " + str(block) + " has ref count " + str(pool_.ref_count(block)) + " but " +
           str(holders[block]) + " block tables hold it");
    }
  }
}

}  // namespace octavo
