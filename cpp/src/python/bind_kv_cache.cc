// octavo._C.BlockPool and octavo._C.KVCacheManager: the block pool and the per-request cache manager
// as the scheduler sees them. Token ids cross as lists of ints, block tables and slot mappings come
// back as lists, copy-on-write copies as (src, dst) tuples. No logic here; calls are microseconds, so
// the GIL is kept.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <utility>
#include <vector>

#include "core/block_pool.h"
#include "core/kv_cache_manager.h"
#include "python/bindings.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using octavo::BlockId;
using octavo::BlockPool;
using octavo::KVCacheManager;
using octavo::RequestId;
using TokenIds = std::vector<int32_t>;

std::vector<std::pair<BlockId, BlockId>> copy_pairs(const octavo::Allocation& allocation) {
  std::vector<std::pair<BlockId, BlockId>> pairs;
  for (const octavo::BlockCopy& copy : allocation.copies) pairs.emplace_back(copy.src, copy.dst);
  return pairs;
}

}  // namespace

void bind_kv_cache(nb::module_& m) {
  nb::class_<octavo::PrefixCacheStats>(m, "PrefixCacheStats",
                                       "Prefix-cache lookups: tokens for KVCacheManager, blocks for BlockPool.")
      .def_ro("queries", &octavo::PrefixCacheStats::queries)
      .def_ro("hits", &octavo::PrefixCacheStats::hits)
      .def_prop_ro("hit_rate", &octavo::PrefixCacheStats::hit_rate);

  nb::class_<octavo::WasteReport>(m, "WasteReport", "Allocated against used KV slots.")
      .def_ro("allocated_slots", &octavo::WasteReport::allocated_slots)
      .def_ro("used_slots", &octavo::WasteReport::used_slots)
      .def_prop_ro("wasted_slots", &octavo::WasteReport::wasted_slots)
      .def_prop_ro("wasted_fraction", &octavo::WasteReport::wasted_fraction);

  nb::class_<octavo::ComputedPrefix>(m, "ComputedPrefix",
                                     "The longest cached prefix of a prompt; pass it to allocate_slots.")
      .def(nb::init<>())
      .def_ro("blocks", &octavo::ComputedPrefix::blocks)
      .def_ro("block_hashes", &octavo::ComputedPrefix::block_hashes)
      .def_ro("num_computed_tokens", &octavo::ComputedPrefix::num_computed_tokens)
      .def_ro("extra_key", &octavo::ComputedPrefix::extra_key);

  nb::class_<octavo::Allocation>(m, "Allocation", "What one allocate_slots call changed.")
      .def_ro("new_blocks", &octavo::Allocation::new_blocks)
      .def_prop_ro("copies", &copy_pairs, "Copy-on-write (src, dst) pairs for the executor.");

  nb::class_<BlockPool>(m, "BlockPool", "Fixed pool of KV blocks: free list, ref counts, prefix cache, LRU.")
      .def(nb::init<int, int, bool>(), "num_blocks"_a, "block_size"_a, "enable_prefix_caching"_a = true)
      .def_prop_ro("num_blocks", &BlockPool::num_blocks)
      .def_prop_ro("block_size", &BlockPool::block_size)
      .def_prop_ro("enable_prefix_caching", &BlockPool::enable_prefix_caching)
      .def_prop_ro("num_free_blocks", &BlockPool::num_free_blocks)
      .def_prop_ro("num_evictable_blocks", &BlockPool::num_evictable_blocks)
      .def_prop_ro("num_used_blocks", &BlockPool::num_used_blocks)
      .def_prop_ro("usage", &BlockPool::usage)
      .def_prop_ro("stats", &BlockPool::stats, nb::rv_policy::copy)
      .def("allocate", &BlockPool::allocate, "n"_a)
      .def("incref", &BlockPool::incref, "block"_a)
      .def("decref", &BlockPool::decref, "block"_a)
      .def("ref_count", &BlockPool::ref_count, "block"_a)
      .def_static("hash_block",
                  [](octavo::BlockHash parent_hash, const TokenIds& token_ids, uint64_t extra_key) {
                    return BlockPool::hash_block(parent_hash, token_ids, extra_key);
                  },
                  "parent_hash"_a, "token_ids"_a, "extra_key"_a = 0)
      .def_ro_static("ROOT_HASH", &BlockPool::kRootHash)
      .def("lookup",
           [](BlockPool& pool, octavo::BlockHash hash, octavo::BlockHash parent_hash,
              const TokenIds& token_ids, uint64_t extra_key) {
             return pool.lookup(hash, parent_hash, token_ids, extra_key);
           },
           "hash"_a, "parent_hash"_a, "token_ids"_a, "extra_key"_a = 0)
      .def("cache_block",
           [](BlockPool& pool, BlockId block, octavo::BlockHash hash, octavo::BlockHash parent_hash,
              const TokenIds& token_ids, uint64_t extra_key) {
             return pool.cache_block(block, hash, parent_hash, token_ids, extra_key);
           },
           "block"_a, "hash"_a, "parent_hash"_a, "token_ids"_a, "extra_key"_a = 0)
      .def("is_cached", &BlockPool::is_cached, "block"_a)
      .def("cached_hash", &BlockPool::cached_hash, "block"_a)
      .def("check_invariants", &BlockPool::check_invariants);

  nb::class_<KVCacheManager>(m, "KVCacheManager",
                             "Per-request block tables over one BlockPool: prefix reuse, fork, copy-on-write.")
      .def(nb::init<int, int, bool>(), "num_blocks"_a, "block_size"_a = 16,
           "enable_prefix_caching"_a = true)
      .def("get_computed_blocks",
           [](KVCacheManager& manager, const TokenIds& token_ids, uint64_t extra_key) {
             return manager.get_computed_blocks(token_ids, extra_key);
           },
           "token_ids"_a, "extra_key"_a = 0)
      .def("allocate_slots",
           [](KVCacheManager& manager, RequestId request, const TokenIds& token_ids, int num_new_tokens,
              const octavo::ComputedPrefix* prefix) {
             return manager.allocate_slots(request, token_ids, num_new_tokens,
                                           prefix ? *prefix : octavo::ComputedPrefix{});
           },
           "request"_a, "token_ids"_a, "num_new_tokens"_a, "prefix"_a.none() = nb::none(),
           "None when the pool cannot hold the new blocks (nothing is taken).")
      .def("cache_blocks",
           [](KVCacheManager& manager, RequestId request, const TokenIds& token_ids, int num_computed_tokens) {
             manager.cache_blocks(request, token_ids, num_computed_tokens);
           },
           "request"_a, "token_ids"_a, "num_computed_tokens"_a)
      .def("fork", &KVCacheManager::fork, "parent"_a, "child"_a)
      .def("free", &KVCacheManager::free, "request"_a)
      .def("__contains__", &KVCacheManager::contains, "request"_a)
      .def_prop_ro("num_requests", &KVCacheManager::num_requests)
      .def("block_table",
           [](const KVCacheManager& manager, RequestId request) {
             std::span<const BlockId> table = manager.block_table(request);
             return std::vector<BlockId>(table.begin(), table.end());
           },
           "request"_a)
      .def("num_tokens", &KVCacheManager::num_tokens, "request"_a)
      .def("slot_mapping",
           nb::overload_cast<RequestId, int, int>(&KVCacheManager::slot_mapping, nb::const_),
           "request"_a, "start"_a, "num_tokens"_a)
      .def("waste", nb::overload_cast<RequestId>(&KVCacheManager::waste, nb::const_), "request"_a)
      .def("waste", nb::overload_cast<>(&KVCacheManager::waste, nb::const_))
      .def_prop_ro("block_size", &KVCacheManager::block_size)
      .def_prop_ro("num_blocks", &KVCacheManager::num_blocks)
      .def_prop_ro("num_free_blocks", &KVCacheManager::num_free_blocks)
      .def_prop_ro("usage", &KVCacheManager::usage)
      .def_prop_ro("prefix_cache_stats", &KVCacheManager::prefix_cache_stats, nb::rv_policy::copy)
      .def_prop_ro("block_pool", &KVCacheManager::block_pool, nb::rv_policy::reference_internal,
                   "The manager's pool, for inspection (ref counts, cached blocks); do not allocate from it.")
      .def("check_invariants", &KVCacheManager::check_invariants);
}
