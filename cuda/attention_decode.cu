// Paged attention decode on the GPU: one query token per request (AttentionParams, backend/ops.h).
//
// Work decomposition. One CTA (128 threads) per (KV head, group tile, split, request). It handles
// all query heads that share the KV head (up to kMaxGroupTile at once; a larger group is cut into
// tiles, the only case that reads a KV head twice), so each K/V row leaves global memory once per
// KV head. The keys [first_key, context) of a request are cut into `num_splits` equal ranges
// (FlashDecoding): the launcher picks the count so that requests x KV heads x splits fills the
// GPU; a request whose keys fit one split writes its output directly, the others write unnormalised
// partial outputs plus (max, sum-exp) to the fp32 workspace, merged by the last split of the
// request and KV head to finish (a counter per column, merge_splits) in plans of a few splits, by
// decode_reduce_kernel in the others.
// Requests start in the order of params.request_order when given (the executor passes longest
// first): the block scheduler then packs a batch of uneven lengths with no long request left to
// run alone at the end (the nano run's decode steps, kernels.py nano-run: 0.80 -> 0.89 of copy
// bandwidth on an H100).
//
// Inside a CTA, K/V tiles of kTileTokens tokens are streamed global -> shared by cp.async in a
// kStages-deep pipeline (every 16-byte chunk fetched by exactly one thread, rows of one page
// contiguous, so the loads are coalesced whatever the head dim). Compute reads the tile back from
// shared memory in one of two ways:
// - CUDA cores (group tiles 1 and 2, and 4 and 8 at head dims 80, 96, 256): a "row group" of kLanes
//   lanes owns one token row at a time, lane i holding dims [8i, 8i+8) of q (for every head of the
//   group tile, pre-scaled, fp32) and of the output accumulators. A score is 8 FMAs per lane and a
//   butterfly over the row group; online softmax in fp32 per row group (rescaled only when the
//   running max grows); row groups merge at the end (shuffles within a warp, shared memory across
//   warps).
// - Tensor cores (group tiles 4 and 8 at head dims 64 and 128): the group's heads are the rows of
//   m16n8k16 MMAs for S = Q K^T and O += P V, each warp taking a quarter of every tile's keys
//   with its own online softmax; tiles are stored XOR-swizzled for ldmatrix, and P goes in as two
//   16-bit parts (high + low, the two k halves of one MMA against the same V rows) so the weights
//   keep ~fp32 precision.
// Both end in the same merge across warps through shared memory.
//
// Speed. Bound by HBM bandwidth: the K/V bytes dominate (q, outputs and partials are <1% at the
// benchmark shapes), and cp.async keeps up to 2 tiles (32 KiB at head dim 128) in flight per CTA,
// 4 CTAs per SM. On CUDA cores the issue cost grows with the group tile: at head dim 128 the
// instance of 4 reached 0.95 of copy bandwidth (batch 64 x 4096, 32/8 heads; H100), the pair
// instance 1.00 (256 x 1024, 16/8 heads), while 8 heads per CTA were issue-bound at 0.41-0.49.
// On tensor cores (group tiles 4 and 8 at head dims 64 and 128) a key costs a few instructions
// per KV head: GQA 4 reaches 0.94-0.96 on those shapes and 0.64-0.90 on small and uneven
// batches, where its CUDA-core path read 0.49-0.86; GQA 5-8 reach 0.89-0.96.
//
// Portability: the CUDA-core path uses compat.h only; the tensor-core path is NVIDIA PTX (sm_80+,
// cuda/mma_sync.h, as the prefill kernel), so a HIP build needs an MFMA twin of it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include <octavo/error.h>

#include "compat.h"
#include "cuda_ops.h"
#include "device_counters.h"
#include "launch.h"
#include "mma_sync.h"

namespace octavo::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / gpu::kWarpSize;
constexpr int kStages = 3;            // tiles in flight: one computed, kStages - 1 loading
constexpr int kRowsPerGroup = 4;      // token rows a row group handles per tile
constexpr int kMaxGroupTile = 8;      // query heads per CTA; larger GQA groups are tiled
constexpr int kMaxSplits = 256;       // bounds the reduction's shared memory
constexpr int kMinSplitTokens = 64;   // shorter splits cost more in fixed work than they gain
// Whatever the occupancy, no split is longer than this (up to kMaxBalanceSplits splits): in a
// batch of uneven lengths one CTA per long request would finish last, alone (batch 64 of
// U[100, 8192) keys: 0.68 of copy bandwidth with one split each).
constexpr int kBalanceSplitTokens = 2048;
constexpr int kMaxBalanceSplits = 8;
constexpr int kCtasPerSmTarget = 4;   // 4 CTAs x 48 KiB shared memory fit an H100 SM (2 for
                                      // group tile 8 on CUDA cores, limited by registers)
// Past this many splits a request's reduction costs more than the last CTAs per SM gain: the
// plan then aims at kFewCtasPerSm (keeping at least kManySplits splits). H100, 32/8 heads: batch
// 1 x 8k 64 -> 32 splits 17.6 -> 15.8 us, 1 x 32k 61.3 -> 53.3 us. Without the reduction the
// split kernel was as fast with half the splits (1 x 8k 13.8 / 13.9 us) or faster (1 x 32k 58.0
// -> 52.0 us); the reduction of 64 splits took ~3.6-4.6 us. H200 (2026-11-28), between the two:
// 1 x 32k 32 -> ~48 splits 48.9-50.7 -> 40.6-41.8 us (0.65 -> 0.79 of copy; 64 splits 43.5 us),
// 1 x 8k 15.4-15.7 -> 14.5-15.2 us. At 2 CTAs per SM a warp scheduler holds two warps, whose
// MMA and softmax chains it cannot hide (ncu at 1 x 32k: 0.33 issues a cycle, DRAM 59% busy).
constexpr int kManySplits = 32;
constexpr int kFewCtasPerSm = 3;

/// Compile-time geometry of one head dim.
template <int kHeadDim>
struct Geometry {
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kLanes = kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;  // lanes per row
  static_assert(kHeadDim % 8 == 0 && kLanes <= gpu::kWarpSize && kChunks <= kLanes);
  static constexpr int kRowsPerWarp = gpu::kWarpSize / kLanes;
  static constexpr int kRowGroups = kWarps * kRowsPerWarp;
  static constexpr int kTileTokens = kRowGroups * kRowsPerGroup;
  static constexpr int kTileElems = kTileTokens * kHeadDim;  // one of K or V
  static constexpr int kPipelineBytes = kStages * 2 * kTileElems * 2;
  static constexpr int kMergeBytes = kWarps * kMaxGroupTile * (kHeadDim + 2) * 4;
  static constexpr int kSharedBytes =
      kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
  static_assert(kSharedBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

int tile_tokens(int head_dim) {
  switch (head_dim) {
    case 64: return Geometry<64>::kTileTokens;
    case 80: return Geometry<80>::kTileTokens;
    case 96: return Geometry<96>::kTileTokens;
    case 128: return Geometry<128>::kTileTokens;
    case 256: return Geometry<256>::kTileTokens;
    default: return 0;
  }
}

/// Query heads per CTA for a GQA group: 1, 2 (pairs at head dim 128 only: Qwen3's small models;
/// elsewhere a pair runs in the instance of 4 with half its arithmetic masked, to keep the
/// instance list short), 4 for groups of 3-4, kMaxGroupTile for 5 and up.
int group_tile_for(int group, int head_dim) {
  if (group <= 2) return group == 2 && head_dim != 128 ? 4 : group;
  return group <= 4 ? 4 : kMaxGroupTile;
}

/// Everything the kernels need: the op's parameters plus the launcher's plan.
struct DecodeArgs {
  AttentionParams p;
  float* partial_out;    // [num_requests][num_heads][num_splits][head_dim], unnormalised
  float2* partial_stat;  // [num_requests][num_heads][num_splits]: (max score, sum of exp)
  // Zeroed counters, one per CTA column (request x KV head x group tile): the last split of a
  // column to finish merges it (merge_splits). nullptr: decode_reduce_kernel merges instead.
  int32_t* split_counters;
  int32_t group;         // query heads per KV head
  int32_t group_tiles;   // CTAs per KV head: ceil(group / group tile)
  int32_t num_splits;
  int32_t split_tokens;  // keys per split, a multiple of the tile
  int32_t block_shift;   // log2(block_size) when it is a power of two, else -1
};

// ---- device helpers ------------------------------------------------------------------------

__device__ __forceinline__ void copy_async_16(void* shared_dst, const void* global_src,
                                              bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src),
               "r"(src_bytes)
               : "memory");
#else
  *static_cast<gpu::Vec16*>(shared_dst) =
      valid ? *static_cast<const gpu::Vec16*>(global_src) : gpu::Vec16{};
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

template <typename T>
__device__ __forceinline__ T from_float(float value) {
  if constexpr (std::is_same_v<T, gpu::bf16>) {
    return __float2bfloat16(value);
  } else {
    return __float2half(value);
  }
}

/// exp(x - reference) where a reference of -inf (nothing seen yet) gives 0 rather than NaN.
__device__ __forceinline__ float safe_reference(float max_score) {
  return max_score == -INFINITY ? 0.0f : max_score;
}

/// The keys of `request` and which of them split `split` covers. num_valid_splits counts the
/// splits with keys (at least 1, so an empty request still writes its zero output once).
struct SplitRange {
  int begin;
  int end;
  int num_valid_splits;
};

__device__ __forceinline__ SplitRange split_range(const DecodeArgs& a, int request, int split) {
  const int context = a.p.context_lens[request];
  const int first_key = a.p.sliding_window > 0 ? max(0, context - a.p.sliding_window) : 0;
  const int num_keys = max(context - first_key, 0);
  SplitRange range;
  range.num_valid_splits =
      min(a.num_splits, max(1, (num_keys + a.split_tokens - 1) / a.split_tokens));
  range.begin = first_key + split * a.split_tokens;
  range.end = min(range.begin + a.split_tokens, context);
  return range;
}

// ---- merging the splits --------------------------------------------------------------------

/// Counters one launch may use (one per CTA column); a launch with more columns merges its splits
/// with decode_reduce_kernel.
constexpr size_t kSplitCounters = 16384;
constexpr int kMergeLoadsInFlight = 8;  // splits whose partial results a thread loads at once
/// Plans of at most this many splits merge in the split kernel; more go to decode_reduce_kernel,
/// whose heads x requests CTAs merge in parallel what one CTA per column would merge in several
/// rounds of loads. H100, 32/8 heads, both ways alternated in one call: 64 x 4096 (2 splits)
/// 384-389 -> 375 us, 8 x 1k (8) 15.2-15.7 -> 14.0-14.1 us, 64 uneven up to 8k (<= 4) 462-464 ->
/// 457-459 us, 8 x 8k (8) 100.8-101.6 -> 102.0 us (once 116); but 4 x 4096 (16 splits) 33 -> 34-36
/// us, 1 x 8k (32) 15.8 -> 17.3 us, 1 x 32k (32) 53.4 -> 55 us, 1 x 1k (16) 6.7 -> 7.4 us.
constexpr int kMaxMergedSplits = 8;

/// Running merge of splits' (max score, sum of exp, unnormalised output) over four dims.
struct MergeState {
  float max_score = -INFINITY;
  float sum = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

  __device__ __forceinline__ void add(float other_max, float other_sum, const float4& other_acc) {
    const float reference = safe_reference(fmaxf(max_score, other_max));
    const float self_weight = __expf(max_score - reference);  // 0 while nothing was merged
    const float other_weight = __expf(other_max - reference);
    sum = sum * self_weight + other_sum * other_weight;
    acc.x = acc.x * self_weight + other_acc.x * other_weight;
    acc.y = acc.y * self_weight + other_acc.y * other_weight;
    acc.z = acc.z * self_weight + other_acc.z * other_weight;
    acc.w = acc.w * self_weight + other_acc.w * other_weight;
    max_score = fmaxf(max_score, other_max);
  }
};

/// Run by the last CTA of a column to finish its split, after every split's partial results
/// reached global memory: out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max m). A thread
/// takes four dims of one head and, where the column's heads have fewer such quads than the CTA
/// has threads, every parts-th split; the parts then merge through shared memory (`scratch`,
/// kThreads x 6 floats). Partial results are read from L2 (load_published): other SMs wrote
/// them.
/// Against decode_reduce_kernel this saves the second launch and its wait for the whole split
/// kernel (kMaxMergedSplits says where that pays).
template <typename T, int kHeadDim>
__device__ __forceinline__ void merge_splits(const DecodeArgs& a, int request, int head_begin,
                                             int heads_here, int num_valid, float* scratch) {
  constexpr int kQuads = kHeadDim / 4;
  const int items = heads_here * kQuads;
  const int parts = max(1, kThreads / items);
  auto merge_range = [&](int item, int part) {
    const int64_t first_slot = (int64_t{request} * a.p.num_heads + head_begin + item / kQuads) *
                               a.num_splits;
    const float2* const stats = a.partial_stat + first_slot;
    const float4* const partial =
        reinterpret_cast<const float4*>(a.partial_out + first_slot * kHeadDim) + item % kQuads;
    MergeState state;
    for (int first = part; first < num_valid; first += parts * kMergeLoadsInFlight) {
      float2 stat[kMergeLoadsInFlight];
      float4 value[kMergeLoadsInFlight];
#pragma unroll
      for (int k = 0; k < kMergeLoadsInFlight; ++k) {
        const int s = first + k * parts;
        const bool here = s < num_valid;
        stat[k] = here ? gpu::load_published(stats + s) : make_float2(-INFINITY, 0.0f);
        value[k] = here ? gpu::load_published(partial + int64_t{s} * kQuads)
                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int k = 0; k < kMergeLoadsInFlight; ++k) state.add(stat[k].x, stat[k].y, value[k]);
    }
    return state;
  };
  auto store = [&](int item, const MergeState& state) {
    const float inv_sum = state.sum > 0.0f ? 1.0f / state.sum : 0.0f;
    T* const dst = static_cast<T*>(a.p.out) +
                   (int64_t{request} * a.p.num_heads + head_begin + item / kQuads) * kHeadDim +
                   4 * (item % kQuads);
    dst[0] = from_float<T>(state.acc.x * inv_sum);
    dst[1] = from_float<T>(state.acc.y * inv_sum);
    dst[2] = from_float<T>(state.acc.z * inv_sum);
    dst[3] = from_float<T>(state.acc.w * inv_sum);
  };
  if (parts == 1) {
    for (int item = threadIdx.x; item < items; item += kThreads) store(item, merge_range(item, 0));
    return;
  }
  // At most one (item, part) per thread here: items x parts <= kThreads.
  const int item = threadIdx.x % items;
  const int part = threadIdx.x / items;
  const bool active = part < parts;
  const MergeState mine = active ? merge_range(item, part) : MergeState{};
  float4* const part_acc = reinterpret_cast<float4*>(scratch);
  float2* const part_stat = reinterpret_cast<float2*>(part_acc + kThreads);
  part_acc[threadIdx.x] = mine.acc;
  part_stat[threadIdx.x] = make_float2(mine.max_score, mine.sum);
  __syncthreads();
  if (active && part == 0) {
    MergeState total = mine;
    for (int other = 1; other < parts; ++other) {
      const float2 stat = part_stat[other * items + item];
      total.add(stat.x, stat.y, part_acc[other * items + item]);
    }
    store(item, total);
  }
}

// ---- the split kernel ----------------------------------------------------------------------

/// Whether an instance computes on tensor cores: group tiles 4 and 8 at head dims 64 and 128. There
/// the CUDA-core path spends ~300 instructions per key and KV head on 8 heads' dot products, score
/// shuffles and softmax, and is issue-bound at ~0.45 of copy bandwidth; as MMAs (the group's heads
/// are the rows of an m16n8 tile) a key costs a few instructions and the kernel streams again.
/// Group tile 4 leaves 12 of the 16 rows idle and still measured faster than its CUDA-core path
/// (llama8b +3.4%; small and uneven GQA 4 batches 0.56-0.85 -> 0.74-0.90 of copy bandwidth).
constexpr bool uses_tensor_cores(int group_tile, int head_dim) {
  return (group_tile == 4 || group_tile == 8) && (head_dim == 64 || head_dim == 128);
}

/// CTAs per SM an instance is built for (its register budget) and planned with: 4 (128
/// registers) reaches the 4 CTAs that fit in shared memory; group tile 8 on CUDA cores needs ~250
/// registers for q and the accumulators of 8 heads, so 2.
constexpr int ctas_per_sm(int group_tile, int head_dim) {
  return group_tile <= 4 || uses_tensor_cores(group_tile, head_dim) ? kCtasPerSmTarget
                                                                    : kCtasPerSmTarget / 2;
}

/// The score with the logit soft-cap applied: cap * tanh(score / cap), as
/// 1 - 2 / (exp(2x) + 1), which saturates cleanly to +-1 for large |x|.
__device__ __forceinline__ float soft_capped(float score, float cap, float inv_cap) {
  return cap * (1.0f - __fdividef(2.0f, __expf(2.0f * (score * inv_cap)) + 1.0f));
}

/// Element offset of 16-byte chunk `chunk` of row `row` of a K or V tile in shared memory. The
/// tensor-core path reads 8 x 8 blocks with ldmatrix, eight rows at one chunk; rows are a multiple
/// of 128 bytes apart, so without the XOR the eight would share banks.
template <int kHeadDim, bool kSwizzle>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * kHeadDim + (kSwizzle ? chunk ^ (row & 7) : chunk) * 8;
}

template <typename T, int kHeadDim, int kGroupTile>
__global__ void __launch_bounds__(kThreads, ctas_per_sm(kGroupTile, kHeadDim))
    decode_kernel(const DecodeArgs a) {
  gpu::wait_for_previous_kernels();
  gpu::allow_next_launch();
  using Geo = Geometry<kHeadDim>;
  constexpr bool kTensorCores = uses_tensor_cores(kGroupTile, kHeadDim);
  constexpr int kLanes = Geo::kLanes;
  constexpr int kRowGroups = Geo::kRowGroups;
  constexpr int kTileTokens = Geo::kTileTokens;
  const AttentionParams& p = a.p;

  const int kv_head = blockIdx.x / a.group_tiles;
  const int group_tile = blockIdx.x % a.group_tiles;
  const int split = blockIdx.y;
  const int request = p.request_order != nullptr ? p.request_order[blockIdx.z] : blockIdx.z;
  const SplitRange range = split_range(a, request, split);
  if (split >= range.num_valid_splits) return;
  const bool direct = range.num_valid_splits == 1;
  const int head_begin = kv_head * a.group + group_tile * kGroupTile;
  const int heads_here = min(kGroupTile, a.group - group_tile * kGroupTile);
  const int query_pos = p.context_lens[request] - 1;

  const int warp = threadIdx.x / gpu::kWarpSize;
  const int lane = threadIdx.x % gpu::kWarpSize;
  const int dim_lane = lane % kLanes;  // owns dims [8 * dim_lane, 8 * dim_lane + 8)
  const int row_group = warp * Geo::kRowsPerWarp + lane / kLanes;
  const bool lane_has_dims = dim_lane < Geo::kChunks;  // false only for head dims 80 and 96

  __shared__ alignas(16) unsigned char shared[Geo::kSharedBytes];
  T* const tiles = reinterpret_cast<T*>(shared);

  // Keys and values of this KV head: element offsets inside one block of the layer's pool.
  const T* const cache = static_cast<const T*>(p.layer_cache);
  const int64_t head_run = int64_t{p.block_size} * kHeadDim;
  const int64_t block_stride = 2 * int64_t{p.num_kv_heads} * head_run;
  const int64_t v_offset = int64_t{p.num_kv_heads} * head_run;
  const int32_t* const block_table =
      p.block_tables + int64_t{request} * p.max_blocks_per_request;

  auto load_tile = [&](int tile, int stage) {
    const int tile_begin = range.begin + tile * kTileTokens;
    T* const k_dst = tiles + stage * 2 * Geo::kTileElems;
    T* const v_dst = k_dst + Geo::kTileElems;
    constexpr int kTileChunks = kTileTokens * Geo::kChunks;
#pragma unroll
    for (int i = 0; i < (kTileChunks + kThreads - 1) / kThreads; ++i) {
      const int chunk = i * kThreads + threadIdx.x;
      if (kTileChunks % kThreads != 0 && chunk >= kTileChunks) break;
      const int row = chunk / Geo::kChunks;
      const int col = chunk % Geo::kChunks;
      const int pos = tile_begin + row;
      const bool valid = pos < range.end;
      const T* src = cache;
      if (valid) {
        const int page = a.block_shift >= 0 ? pos >> a.block_shift : pos / p.block_size;
        const int offset = pos - page * p.block_size;
        src = cache + block_table[page] * block_stride + kv_head * head_run +
              int64_t{offset} * kHeadDim + col * 8;
      }
      const int dst = tile_offset<kHeadDim, kTensorCores>(row, col);
      copy_async_16(k_dst + dst, src, valid);
      copy_async_16(v_dst + dst, valid ? src + v_offset : src, valid);
    }
  };

  const int num_tiles =
      range.end > range.begin ? (range.end - range.begin + kTileTokens - 1) / kTileTokens : 0;
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < num_tiles) load_tile(stage, stage);
    copy_async_commit();
  }
  // Waits until tile `tile` has landed for every thread (so the stage loaded next is free),
  // starts the load kStages - 1 tiles ahead and returns the tile's K rows (V follows).
  auto await_tile = [&](int tile) {
    copy_async_wait<kStages - 2>();
    __syncthreads();
    const int ahead = tile + kStages - 1;
    if (ahead < num_tiles) load_tile(ahead, ahead % kStages);
    copy_async_commit();
    return tiles + (tile % kStages) * 2 * Geo::kTileElems;
  };

  // Each warp's softmax state goes to shared memory for the merge across warps: [warp][group
  // tile][head_dim] unnormalised sums, then the max and the sum of exp per (warp, head).
  float* const merge_acc = reinterpret_cast<float*>(shared);
  float* const merge_max = merge_acc + kWarps * kGroupTile * kHeadDim;
  float* const merge_sum = merge_max + kWarps * kGroupTile;
  const bool use_softcap = p.softcap > 0.0f;
  const float inv_softcap = use_softcap ? 1.0f / p.softcap : 0.0f;
  const bool use_alibi = p.alibi_slopes != nullptr;
  if constexpr (kTensorCores) {
    // S = Q K^T and O += P V as m16n8 MMAs: rows are the tile's query heads (kGroupTile of the 16
    // rows; the others stay zero and are never stored), columns each warp's quarter of a tile's
    // keys. A thread owns row lane / 4 and, per 8-key block, keys 2 (lane % 4) and
    // 2 (lane % 4) + 1.
    constexpr int kWarpTokens = kTileTokens / kWarps;
    constexpr int kTokenBlocks = kWarpTokens / 8;
    constexpr int kKSteps = kHeadDim / 16;
    constexpr int kDimBlocks = kHeadDim / 8;
    const int row = lane / 4;
    const int quad = lane % 4;
    const bool row_is_head = row < heads_here;
    const int head = head_begin + row;
    uint32_t q_frag[kKSteps][2];  // the A fragment's registers of row `row` (rows 8-15 are zero)
    const T* const q_row =
        static_cast<const T*>(p.q) + int64_t{request} * p.q_stride + int64_t{head} * kHeadDim;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const T* const pair = q_row + 16 * ks + 2 * quad;  // k 2 quad (+1), then 8 further
      q_frag[ks][0] = row_is_head ? *reinterpret_cast<const uint32_t*>(pair) : 0u;
      q_frag[ks][1] = row_is_head ? *reinterpret_cast<const uint32_t*>(pair + 8) : 0u;
    }
    const float slope = use_alibi && row_is_head ? p.alibi_slopes[head] : 0.0f;
    float out[kDimBlocks][4];  // [0], [1]: dims 8 d + 2 quad (+1) of row `row`; [2], [3] unused
#pragma unroll
    for (int d = 0; d < kDimBlocks; ++d) out[d][0] = out[d][1] = out[d][2] = out[d][3] = 0.0f;
    float row_max = -INFINITY;
    float row_sum = 0.0f;  // this thread's keys only; the quad's sum is taken at the end
    const int warp_first = warp * kWarpTokens;
    // The ldmatrix address of this thread in a tile: row lane % 8 of 8-key block `tb` of this
    // warp's keys, in 8 x 8 block lane / 8 of the four that 32-dim slice `c` holds.
    auto fragment_address = [&](const T* tile, int tb, int c) {
      return shared_address(tile + tile_offset<kHeadDim, true>(warp_first + tb * 8 + (lane & 7),
                                                               4 * c + lane / 8));
    };

    for (int tile = 0; tile < num_tiles; ++tile) {
      const T* const k_tile = await_tile(tile);
      const T* const v_tile = k_tile + Geo::kTileElems;
      const int first_pos = range.begin + tile * kTileTokens + warp_first;

      float s[kTokenBlocks][4];
#pragma unroll
      for (int tb = 0; tb < kTokenBlocks; ++tb) {
        s[tb][0] = s[tb][1] = s[tb][2] = s[tb][3] = 0.0f;
#pragma unroll
        for (int c = 0; c < kHeadDim / 32; ++c) {
          uint32_t b[4];
          ldmatrix_x4(b, fragment_address(k_tile, tb, c));
          const uint32_t a_low[4] = {q_frag[2 * c][0], 0u, q_frag[2 * c][1], 0u};
          const uint32_t a_high[4] = {q_frag[2 * c + 1][0], 0u, q_frag[2 * c + 1][1], 0u};
          mma_16816<T>(s[tb], a_low, b[0], b[1]);
          mma_16816<T>(s[tb], a_high, b[2], b[3]);
        }
      }
      float tile_max = -INFINITY;
#pragma unroll
      for (int tb = 0; tb < kTokenBlocks; ++tb) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int pos = first_pos + tb * 8 + 2 * quad + j;
          float x = s[tb][j] * p.scale;
          if (use_softcap) x = soft_capped(x, p.softcap, inv_softcap);
          if (use_alibi) x += slope * float(pos - query_pos);
          x = pos < range.end ? x : -INFINITY;
          s[tb][j] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      tile_max = fmaxf(tile_max, gpu::shfl_xor(tile_max, 1));
      tile_max = fmaxf(tile_max, gpu::shfl_xor(tile_max, 2));
      if (tile_max > row_max) {  // the same for the quad: rescale only when the max grows
        const float alpha = __expf(row_max - tile_max);
        row_sum *= alpha;
#pragma unroll
        for (int d = 0; d < kDimBlocks; ++d) {
          out[d][0] *= alpha;
          out[d][1] *= alpha;
        }
        row_max = tile_max;
      }
      const float reference = safe_reference(row_max);
      // P in two 16-bit parts (high + low) so that P V keeps ~fp32 weights, as the CUDA-core path.
      uint32_t p_high[kTokenBlocks], p_low[kTokenBlocks];
#pragma unroll
      for (int tb = 0; tb < kTokenBlocks; ++tb) {
        const float w0 = __expf(s[tb][0] - reference);
        const float w1 = __expf(s[tb][1] - reference);
        row_sum += w0 + w1;
        p_high[tb] = pack2<T>(w0, w1);
        const float2 high = gpu::to_float2<T>(p_high[tb]);
        p_low[tb] = pack2<T>(w0 - high.x, w1 - high.y);
      }
#pragma unroll
      for (int tb = 0; tb < kTokenBlocks; ++tb) {
#pragma unroll
        for (int c = 0; c < kHeadDim / 32; ++c) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, fragment_address(v_tile, tb, c));
          // P's high and low parts are the two k halves of one MMA, each against the same V.
          const uint32_t a[4] = {p_high[tb], 0u, p_low[tb], 0u};
#pragma unroll
          for (int i = 0; i < 4; ++i) mma_16816<T>(out[4 * c + i], a, b[i], b[i]);
        }
      }
    }
    copy_async_wait<0>();
    __syncthreads();  // every thread is done with the tiles: the shared memory is reused below
    row_sum += gpu::shfl_xor(row_sum, 1);
    row_sum += gpu::shfl_xor(row_sum, 2);
    if (row < kGroupTile) {
#pragma unroll
      for (int d = 0; d < kDimBlocks; ++d) {
        *reinterpret_cast<float2*>(merge_acc + (warp * kGroupTile + row) * kHeadDim + 8 * d +
                                   2 * quad) = make_float2(out[d][0], out[d][1]);
      }
      if (quad == 0) {
        merge_max[warp * kGroupTile + row] = row_max;
        merge_sum[warp * kGroupTile + row] = row_sum;
      }
    }
  } else {  // CUDA cores
    // q for every head of the tile, scaled; heads past the group and idle lanes hold zeros.
    float q[kGroupTile][8];
    float slope[kGroupTile];
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      const int head = head_begin + g;
      slope[g] = 0.0f;
      if (g < heads_here && lane_has_dims) {
        const auto* src = static_cast<const T*>(p.q) + int64_t{request} * p.q_stride +
                          int64_t{head} * kHeadDim + dim_lane * 8;
        gpu::to_float8<T>(*reinterpret_cast<const gpu::Vec16*>(src), q[g]);
#pragma unroll
        for (int j = 0; j < 8; ++j) q[g][j] *= p.scale;
        if (p.alibi_slopes != nullptr) slope[g] = p.alibi_slopes[head];
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) q[g][j] = 0.0f;
      }
    }
    float max_score[kGroupTile];
    float sum_exp[kGroupTile];
    float acc[kGroupTile][8];
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      max_score[g] = -INFINITY;
      sum_exp[g] = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
    }

    // This lane's 8 dims of tile row `row` in fp32 (zeros on the idle lanes of head dims 80, 96).
    auto load_dims = [&](const T* tile, int row, float (&x)[8]) {
      if (lane_has_dims) {
        const T* const chunk = tile + row * kHeadDim + dim_lane * 8;
        gpu::to_float8<T>(*reinterpret_cast<const gpu::Vec16*>(chunk), x);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) x[j] = 0.0f;
      }
    };
    for (int tile = 0; tile < num_tiles; ++tile) {
      const T* const k_tile = await_tile(tile);
      const T* const v_tile = k_tile + Geo::kTileElems;
      const int tile_begin = range.begin + tile * kTileTokens;

      float score[kRowsPerGroup][kGroupTile];
#pragma unroll
      for (int u = 0; u < kRowsPerGroup; ++u) {
        const int row = row_group + u * kRowGroups;
        float k[8];
        load_dims(k_tile, row, k);
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
          float dot = 0.0f;
#pragma unroll
          for (int j = 0; j < 8; ++j) dot = fmaf(q[g][j], k[j], dot);
          score[u][g] = dot;
        }
      }
#pragma unroll
      for (int offset = kLanes / 2; offset > 0; offset /= 2) {
#pragma unroll
        for (int u = 0; u < kRowsPerGroup; ++u) {
#pragma unroll
          for (int g = 0; g < kGroupTile; ++g) score[u][g] += gpu::shfl_xor(score[u][g], offset);
        }
      }
#pragma unroll
      for (int u = 0; u < kRowsPerGroup; ++u) {
        const int pos = tile_begin + row_group + u * kRowGroups;
        const bool valid = pos < range.end;
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
          float s = score[u][g];
          if (use_softcap) s = soft_capped(s, p.softcap, inv_softcap);
          if (use_alibi) s += slope[g] * float(pos - query_pos);
          score[u][g] = valid ? s : -INFINITY;
        }
      }
      // Online softmax: rescale the accumulators only when the running max grows.
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        float tile_max = score[0][g];
#pragma unroll
        for (int u = 1; u < kRowsPerGroup; ++u) tile_max = fmaxf(tile_max, score[u][g]);
        if (tile_max > max_score[g]) {
          const float alpha = __expf(max_score[g] - tile_max);  // 0 when max_score was -inf
          sum_exp[g] *= alpha;
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[g][j] *= alpha;
          max_score[g] = tile_max;
        }
        const float reference = safe_reference(max_score[g]);
#pragma unroll
        for (int u = 0; u < kRowsPerGroup; ++u) {
          const float weight = __expf(score[u][g] - reference);  // 0 for masked rows
          sum_exp[g] += weight;
          score[u][g] = weight;
        }
      }
#pragma unroll
      for (int u = 0; u < kRowsPerGroup; ++u) {
        // Rows past the split were zero-filled, so a zero weight never meets a NaN.
        const int row = row_group + u * kRowGroups;
        float v[8];
        load_dims(v_tile, row, v);
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(score[u][g], v[j], acc[g][j]);
        }
      }
    }
    copy_async_wait<0>();
    __syncthreads();  // every thread is done with the tiles: the shared memory is reused below

    // Merge the row groups of a warp (lanes kLanes apart hold the same dims).
#pragma unroll
    for (int offset = kLanes; offset < gpu::kWarpSize; offset *= 2) {
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        const float other_max = gpu::shfl_xor(max_score[g], offset);
        const float other_sum = gpu::shfl_xor(sum_exp[g], offset);
        const float new_max = fmaxf(max_score[g], other_max);
        const float reference = safe_reference(new_max);
        const float self_weight = __expf(max_score[g] - reference);
        const float other_weight = __expf(other_max - reference);
        sum_exp[g] = sum_exp[g] * self_weight + other_sum * other_weight;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          acc[g][j] = acc[g][j] * self_weight + gpu::shfl_xor(acc[g][j], offset) * other_weight;
        }
        max_score[g] = new_max;
      }
    }
    // Then the warps, through shared memory (below).
    if (lane < kLanes && lane_has_dims) {
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        float* dst = merge_acc + (warp * kGroupTile + g) * kHeadDim + dim_lane * 8;
        reinterpret_cast<float4*>(dst)[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
      }
      if (lane == 0) {
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
          merge_max[warp * kGroupTile + g] = max_score[g];
          merge_sum[warp * kGroupTile + g] = sum_exp[g];
        }
      }
    }
  }
  __syncthreads();

  const int num_heads = p.num_heads;
  for (int i = threadIdx.x; i < heads_here * kHeadDim; i += kThreads) {
    const int g = i / kHeadDim;
    const int d = i % kHeadDim;
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, merge_max[w * kGroupTile + g]);
    const float reference = safe_reference(block_max);
    float total_sum = 0.0f;
    float total_acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = __expf(merge_max[w * kGroupTile + g] - reference);
      total_sum += weight * merge_sum[w * kGroupTile + g];
      total_acc += weight * merge_acc[(w * kGroupTile + g) * kHeadDim + d];
    }
    const int head = head_begin + g;
    if (direct) {
      const float value = total_sum > 0.0f ? total_acc / total_sum : 0.0f;
      static_cast<T*>(p.out)[(int64_t{request} * num_heads + head) * kHeadDim + d] =
          from_float<T>(value);
    } else {
      const int64_t slot = (int64_t{request} * num_heads + head) * a.num_splits + split;
      a.partial_out[slot * kHeadDim + d] = total_acc;
      if (d == 0) a.partial_stat[slot] = make_float2(block_max, total_sum);
    }
  }
  if (direct || a.split_counters == nullptr) return;
  // Count this split done once its partial results are visible to every SM; the column's last
  // split merges them all and leaves the counter at zero for the next launch.
  __threadfence();
  __syncthreads();
  int last_split = 0;  // thread 0's finding, shared by the barrier below (no shared memory left)
  if (threadIdx.x == 0) {
    int32_t* const counter = a.split_counters + int64_t{blockIdx.z} * gridDim.x + blockIdx.x;
    last_split = atomicAdd(counter, 1) == range.num_valid_splits - 1;
    if (last_split) *counter = 0;
  }
  if (!__syncthreads_or(last_split)) return;
  __threadfence();
  merge_splits<T, kHeadDim>(a, request, head_begin, heads_here, range.num_valid_splits,
                            reinterpret_cast<float*>(shared));
}

// ---- the reduction over splits -------------------------------------------------------------

constexpr int kReduceThreads = 256;
constexpr int kReduceSplitsPerThread = 8;  // partial outputs each thread has in flight at once
static_assert(kMaxSplits % kReduceThreads == 0, "each thread reads the same number of statistics");

/// One CTA per (query head, request): out = sum_s w_s acc_s / sum_s w_s sum_s, with
/// w_s = exp(max_s - max over splits). Requests that fit one split were written directly.
/// A few hundred KiB at most, so latency-bound: every thread issues its loads of the statistics
/// and of up to kReduceSplitsPerThread partial outputs (four dims of splits part, part + parts,
/// ...) at once, before the maximum over splits is known; one round trip covers 8 x parts splits
/// (64 at head dim 128). The earlier version walked the splits in dependent rounds after the
/// maximum: 11.4 us for 64 splits of batch 1 x 8k under ncu, beside 18.8 us for the split kernel.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) decode_reduce_kernel(const DecodeArgs a) {
  const int head = blockIdx.x;
  const int request = blockIdx.y;
  // context_lens is a step input: every CTA of the split kernel has passed its own wait before
  // this kernel is scheduled, so no earlier kernel can still be writing it.
  const int num_valid = split_range(a, request, 0).num_valid_splits;
  gpu::wait_for_previous_kernels();
  gpu::allow_next_launch();
  if (num_valid <= 1) return;
  const int head_dim = a.p.head_dim;
  const int64_t first_slot = (int64_t{request} * a.p.num_heads + head) * a.num_splits;
  const float2* const stats = a.partial_stat + first_slot;
  const float* const partial = a.partial_out + first_slot * head_dim;

  const int dim_threads = head_dim / 4;  // every compiled head dim is a multiple of 4
  const int parts = kReduceThreads / dim_threads;
  const int part = threadIdx.x / dim_threads;
  const int quad = threadIdx.x % dim_threads;
  const bool has_part = part < parts;
  float4 values[kReduceSplitsPerThread];
  float split_max[kReduceSplitsPerThread];
#pragma unroll
  for (int k = 0; k < kReduceSplitsPerThread; ++k) {
    const int s = part + k * parts;
    const bool here = has_part && s < num_valid;
    values[k] = here ? reinterpret_cast<const float4*>(partial + int64_t{s} * head_dim)[quad]
                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    split_max[k] = here ? stats[s].x : -INFINITY;
  }
  float local_max = -INFINITY;
  float2 own_stat[kMaxSplits / kReduceThreads];
#pragma unroll
  for (int i = 0; i < kMaxSplits / kReduceThreads; ++i) {
    const int s = threadIdx.x + i * kReduceThreads;
    own_stat[i] = s < num_valid ? stats[s] : make_float2(-INFINITY, 0.0f);
    local_max = fmaxf(local_max, own_stat[i].x);
  }

  __shared__ float warp_max[kReduceThreads / gpu::kWarpSize];
  __shared__ float warp_sum[kReduceThreads / gpu::kWarpSize];
  constexpr int kReduceWarps = kReduceThreads / gpu::kWarpSize;
  const int warp = threadIdx.x / gpu::kWarpSize;
  const int lane = threadIdx.x % gpu::kWarpSize;
#pragma unroll
  for (int offset = gpu::kWarpSize / 2; offset > 0; offset /= 2) {
    local_max = fmaxf(local_max, gpu::shfl_xor(local_max, offset));
  }
  if (lane == 0) warp_max[warp] = local_max;
  __syncthreads();
  float global_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kReduceWarps; ++w) global_max = fmaxf(global_max, warp_max[w]);
  const float reference = safe_reference(global_max);

  float local_sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxSplits / kReduceThreads; ++i) {
    local_sum += __expf(own_stat[i].x - reference) * own_stat[i].y;
  }
#pragma unroll
  for (int offset = gpu::kWarpSize / 2; offset > 0; offset /= 2) {
    local_sum += gpu::shfl_xor(local_sum, offset);
  }
  if (lane == 0) warp_sum[warp] = local_sum;

  float4 total = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  auto accumulate = [&](float weight, const float4& v) {
    total.x = fmaf(weight, v.x, total.x);
    total.y = fmaf(weight, v.y, total.y);
    total.z = fmaf(weight, v.z, total.z);
    total.w = fmaf(weight, v.w, total.w);
  };
#pragma unroll
  for (int k = 0; k < kReduceSplitsPerThread; ++k) {
    accumulate(__expf(split_max[k] - reference), values[k]);  // exp(-inf) = 0 past num_valid
  }
  // More splits than one round covers (up to kMaxSplits at small head dims' few parts).
  if (has_part) {
    for (int s = part + kReduceSplitsPerThread * parts; s < num_valid; s += parts) {
      accumulate(__expf(stats[s].x - reference),
                 reinterpret_cast<const float4*>(partial + int64_t{s} * head_dim)[quad]);
    }
  }
  __shared__ float4 part_totals[kReduceThreads];
  part_totals[threadIdx.x] = total;
  __syncthreads();
  if (part == 0) {
    float total_sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) total_sum += warp_sum[w];
    const float inv_sum = total_sum > 0.0f ? 1.0f / total_sum : 0.0f;
    for (int q = 1; q < parts; ++q) {
      const float4 other = part_totals[q * dim_threads + quad];
      total.x += other.x;
      total.y += other.y;
      total.z += other.z;
      total.w += other.w;
    }
    T* const dst = static_cast<T*>(a.p.out) + (int64_t{request} * a.p.num_heads + head) * head_dim +
                   4 * quad;
    dst[0] = from_float<T>(total.x * inv_sum);
    dst[1] = from_float<T>(total.y * inv_sum);
    dst[2] = from_float<T>(total.z * inv_sum);
    dst[3] = from_float<T>(total.w * inv_sum);
  }
}

// ---- host side -----------------------------------------------------------------------------

std::string str(long long value) { return std::to_string(value); }

struct Plan {
  int group = 1;
  int group_tile = 1;
  int group_tiles = 1;
  int num_splits = 1;
  int split_tokens = 1;
};

/// Keys the longest request attends to (at least 1).
int64_t max_keys_of(const AttentionParams& p) {
  return std::max<int64_t>(
      1, p.sliding_window > 0 ? std::min(p.max_context_len, p.sliding_window) : p.max_context_len);
}

/// Splits a request of max_keys keys needs so that none is longer than kBalanceSplitTokens.
int64_t balance_splits(int64_t max_keys) {
  return std::min<int64_t>((max_keys + kBalanceSplitTokens - 1) / kBalanceSplitTokens,
                           kMaxBalanceSplits);
}

/// Splits of the keys before rounding them to whole tiles (the final count is never larger):
/// until num_requests x KV heads x group tiles x splits is about `target` CTAs (sm_count x the
/// instance's CTAs per SM; sm_count x kFewCtasPerSm where that takes more than kManySplits), no
/// split shorter than kMinSplitTokens; and at least balance_splits. Non-decreasing in max_keys.
int64_t initial_splits(int64_t num_requests, int64_t ctas_per_request, int64_t target,
                       int64_t sm_count, int64_t max_keys) {
  const int64_t base = num_requests * ctas_per_request;
  auto splits_for = [base](int64_t ctas) { return base >= ctas ? 1 : (ctas + base / 2) / base; };
  int64_t splits = splits_for(target);
  if (splits > kManySplits) {
    splits = std::max<int64_t>(kManySplits, splits_for(std::min(target, sm_count * kFewCtasPerSm)));
  }
  splits = std::min(splits, (max_keys + kMinSplitTokens - 1) / kMinSplitTokens);
  splits = std::max(splits, balance_splits(max_keys));
  return std::clamp<int64_t>(splits, 1, kMaxSplits);
}

/// The launch geometry: how many CTAs per KV head and how many splits of the keys.
Plan make_plan(const AttentionParams& p, int64_t* target_ctas = nullptr) {
  Plan plan;
  plan.group = p.num_heads / p.num_kv_heads;
  plan.group_tile = group_tile_for(plan.group, p.head_dim);
  plan.group_tiles = (plan.group + plan.group_tile - 1) / plan.group_tile;
  const int64_t sm_count = current_sm_count();
  const int64_t target = sm_count * ctas_per_sm(plan.group_tile, p.head_dim);
  if (target_ctas != nullptr) *target_ctas = target;
  const int64_t max_keys = max_keys_of(p);
  const int64_t splits = initial_splits(p.num_requests, int64_t{p.num_kv_heads} * plan.group_tiles,
                                        target, sm_count, max_keys);
  const int tile = tile_tokens(p.head_dim);
  int64_t split_tokens = (max_keys + splits - 1) / splits;
  split_tokens = (split_tokens + tile - 1) / tile * tile;
  plan.split_tokens = int(split_tokens);
  plan.num_splits = int((max_keys + split_tokens - 1) / split_tokens);
  return plan;
}

/// What the plan depends on (decode_workspace_bytes checks only this much).
void check_geometry(const AttentionParams& p) {
  auto fail = [](const std::string& message) {
    throw InvalidArgument("paged_attention_decode: " + message);
  };
  if (p.num_requests < 0 || p.num_requests > 65535) {
    fail(str(p.num_requests) + " requests; the grid allows 0 to 65,535");
  }
  if (p.num_heads <= 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    fail("num_heads (" + str(p.num_heads) + ") must be a positive multiple of num_kv_heads (" +
         str(p.num_kv_heads) + ")");
  }
  if (tile_tokens(p.head_dim) == 0) {
    fail("head_dim " + str(p.head_dim) +
         " is not compiled; supported: 64, 80, 96, 128, 256 (the instance list is kept short "
         "for compile time)");
  }
  if (p.sliding_window < 0) fail("sliding_window is " + str(p.sliding_window) + "; it must be >= 0");
  if (p.num_requests > 0 && p.max_context_len < 1) {
    fail("max_context_len is " + str(p.max_context_len) +
         "; it must be the largest context_len (>= 1: the query's own key is cached)");
  }
}

void check_params(const AttentionParams& p) {
  check_geometry(p);
  auto fail = [](const std::string& message) {
    throw InvalidArgument("paged_attention_decode: " + message);
  };
  if (p.act_dtype != DType::kBFloat16 && p.act_dtype != DType::kFloat16) {
    fail("activations must be bf16 or fp16 on the GPU");
  }
  if (p.cache_dtype != p.act_dtype) fail("the KV cache dtype must equal the activation dtype");
  if (p.max_query_len != 1) {
    fail("max_query_len is " + str(p.max_query_len) +
         "; decode takes exactly one query token per request (use paged_attention_prefill)");
  }
  if (p.num_tokens != p.num_requests) {
    fail("num_tokens (" + str(p.num_tokens) + ") must equal num_requests (" +
         str(p.num_requests) + ") in decode");
  }
  if (p.block_size <= 0) fail("block_size is " + str(p.block_size) + "; it must be positive");
  if (p.q_stride < int64_t{p.num_heads} * p.head_dim || p.q_stride % 8 != 0) {
    fail("q_stride " + str(p.q_stride) + " must be >= num_heads * head_dim (" +
         str(int64_t{p.num_heads} * p.head_dim) + ") and a multiple of 8 (16-byte rows)");
  }
  if (reinterpret_cast<uintptr_t>(p.q) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.layer_cache) % 16 != 0) {
    fail("q and the layer cache must be 16-byte aligned");
  }
  if (!(p.softcap >= 0.0f)) fail("softcap must be >= 0 (0: none)");
  const int64_t blocks_needed = (int64_t{p.max_context_len} + p.block_size - 1) / p.block_size;
  if (p.num_requests > 0 && blocks_needed > p.max_blocks_per_request) {
    fail("max_context_len " + str(p.max_context_len) + " needs " + str(blocks_needed) +
         " blocks; the block table holds " + str(p.max_blocks_per_request));
  }
}

template <typename T, int kHeadDim, int kGroupTile>
void launch(const DecodeArgs& args, const Plan& plan, gpu::Stream stream) {
  const dim3 grid(args.p.num_kv_heads * plan.group_tiles, plan.num_splits, args.p.num_requests);
  launch_overlapped(args.p.num_requests, decode_kernel<T, kHeadDim, kGroupTile>, grid,
                    dim3(kThreads), 0, stream, args);
}

template <typename T, int kHeadDim>
void launch_group(const DecodeArgs& args, const Plan& plan, gpu::Stream stream) {
  switch (plan.group_tile) {
    case 1: return launch<T, kHeadDim, 1>(args, plan, stream);
    case 2:
      if constexpr (kHeadDim == 128) return launch<T, kHeadDim, 2>(args, plan, stream);
      break;
    case 4: return launch<T, kHeadDim, 4>(args, plan, stream);
    case 8: return launch<T, kHeadDim, 8>(args, plan, stream);
    default: break;
  }
  throw InvalidArgument("paged_attention_decode: no instance for group tile " +
                        str(plan.group_tile) + " at head_dim " + str(kHeadDim));
}

/// The one dispatch table: dtype x head dim x group tile (1; 2 for GQA 2 at head dim 128; 4 for
/// GQA 2-4; 8 for 5 and up). Other groups reuse the next larger instance with the extra heads
/// masked, since each instance costs CI compile time.
template <typename T>
void launch_head_dim(const DecodeArgs& args, const Plan& plan, gpu::Stream stream) {
  switch (args.p.head_dim) {
    case 64: return launch_group<T, 64>(args, plan, stream);
    case 80: return launch_group<T, 80>(args, plan, stream);
    case 96: return launch_group<T, 96>(args, plan, stream);
    case 128: return launch_group<T, 128>(args, plan, stream);
    case 256: return launch_group<T, 256>(args, plan, stream);
    default: throw InvalidArgument("paged_attention_decode: head_dim " + str(args.p.head_dim) +
                                   " is not compiled");
  }
}

void check_launch(const char* op) {
  const gpu::Error error = gpu::get_last_error();
  if (error != gpu::kSuccess) {
    throw BackendError(std::string(op) + " launch failed: " + gpu::error_string(error));
  }
}

}  // namespace

namespace {

/// `attribute` of the current device, queried once per device into `cache` (which holds the
/// value plus one: 0 means not yet known).
int cached_device_attribute(cudaDeviceAttr attribute, std::atomic<int>* cache, int cache_size,
                            const char* what) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) {
    gpu::get_last_error();
    throw BackendError("cuda: no current CUDA device");
  }
  if (device < cache_size) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known - 1;
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, attribute, device) != cudaSuccess || value < 0) {
    gpu::get_last_error();
    throw BackendError(std::string("cuda: cannot query ") + what + " of device " +
                       std::to_string(device));
  }
  if (device < cache_size) cache[device].store(value + 1, std::memory_order_relaxed);
  return value;
}

}  // namespace

int current_sm_count() {
  static std::atomic<int> cached[kMaxCudaDevices] = {};
  return cached_device_attribute(cudaDevAttrMultiProcessorCount, cached, kMaxCudaDevices,
                                 "the SM count");
}

bool current_device_overlaps_launches() {
  static std::atomic<int> cached[kMaxCudaDevices] = {};
  return cached_device_attribute(cudaDevAttrComputeCapabilityMajor, cached, kMaxCudaDevices,
                                 "the compute capability") >= 9;
}

bool current_device_is_sm90() {
  static std::atomic<int> major[kMaxCudaDevices] = {};
  static std::atomic<int> minor[kMaxCudaDevices] = {};
  return cached_device_attribute(cudaDevAttrComputeCapabilityMajor, major, kMaxCudaDevices,
                                 "the compute capability") == 9 &&
         cached_device_attribute(cudaDevAttrComputeCapabilityMinor, minor, kMaxCudaDevices,
                                 "the compute capability") == 0;
}

/// An upper bound over every decode batch with at most params.num_requests requests and
/// params.max_context_len keys (same heads and head dim), so an engine can reserve the workspace
/// once from its limits: fewer requests get more splits each, so the bound is the largest
/// requests x splits over 1..num_requests.
size_t decode_workspace_bytes(const AttentionParams& params) {
  check_geometry(params);
  if (params.num_requests == 0) return 0;
  int64_t target = 0;
  const Plan plan = make_plan(params, &target);
  const int64_t ctas_per_request = int64_t{params.num_kv_heads} * plan.group_tiles;
  const int64_t max_keys = max_keys_of(params);
  // Past target / ctas_per_request + 1 requests only the balance splits remain, so the largest
  // of r x splits there is at num_requests; below, the occupancy rule may ask for more.
  const int64_t last = std::min<int64_t>(params.num_requests, target / ctas_per_request + 1);
  int64_t max_slots = balance_splits(max_keys) > 1 ? params.num_requests * balance_splits(max_keys) : 0;
  const int64_t sm_count = current_sm_count();
  for (int64_t r = 1; r <= last; ++r) {
    const int64_t splits = initial_splits(r, ctas_per_request, target, sm_count, max_keys);
    if (splits > 1) max_slots = std::max(max_slots, r * splits);
  }
  return size_t(max_slots) * params.num_heads *
         (size_t(params.head_dim) * sizeof(float) + sizeof(float2));
}

void paged_attention_decode(const AttentionParams& params, void* workspace, StreamHandle stream) {
  check_params(params);
  if (params.num_requests == 0) return;
  const Plan plan = make_plan(params);
  DecodeArgs args{};
  args.p = params;
  args.group = plan.group;
  args.group_tiles = plan.group_tiles;
  args.num_splits = plan.num_splits;
  args.split_tokens = plan.split_tokens;
  const int block_size = params.block_size;
  args.block_shift = (block_size & (block_size - 1)) == 0 ? __builtin_ctz(unsigned(block_size)) : -1;
  if (plan.num_splits > 1) {
    if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
      throw InvalidArgument("paged_attention_decode: this batch splits the keys " +
                            str(plan.num_splits) +
                            " ways and needs a 16-byte aligned workspace of "
                            "decode_workspace_bytes() bytes; got " +
                            (workspace == nullptr ? std::string("none") : "a misaligned one"));
    }
    const size_t slots = size_t(params.num_requests) * params.num_heads * plan.num_splits;
    args.partial_out = static_cast<float*>(workspace);
    args.partial_stat = reinterpret_cast<float2*>(args.partial_out + slots * params.head_dim);
    static DeviceCounters split_counters("paged_attention_decode", kSplitCounters, 8);
    const size_t columns = size_t(params.num_requests) * params.num_kv_heads * plan.group_tiles;
    // nullptr (decode_reduce_kernel merges) past kMaxMergedSplits or kSplitCounters columns, and
    // for a first such launch on the device inside a graph capture, where the counters cannot be
    // allocated.
    args.split_counters = plan.num_splits <= kMaxMergedSplits && columns <= kSplitCounters
                              ? split_counters.next(stream)
                              : nullptr;
  }
  const auto cuda_stream = static_cast<gpu::Stream>(stream);
  if (params.act_dtype == DType::kBFloat16) {
    launch_head_dim<gpu::bf16>(args, plan, cuda_stream);
  } else {
    launch_head_dim<gpu::fp16>(args, plan, cuda_stream);
  }
  check_launch("paged_attention_decode");
  if (plan.num_splits > 1 && args.split_counters == nullptr) {
    // Overlapped with the split kernel only at the batches every kernel overlaps: at batch
    // 8 x 1k and 4 x 4k an overlapped reduction made the pair 2 us slower (H100, 2026-11-28).
    const dim3 grid(params.num_heads, params.num_requests);
    if (params.act_dtype == DType::kBFloat16) {
      launch_overlapped(params.num_requests, decode_reduce_kernel<gpu::bf16>, grid,
                        dim3(kReduceThreads), 0, cuda_stream, args);
    } else {
      launch_overlapped(params.num_requests, decode_reduce_kernel<gpu::fp16>, grid,
                        dim3(kReduceThreads), 0, cuda_stream, args);
    }
    check_launch("paged_attention_decode (split reduction)");
  }
}

}  // namespace octavo::cuda
