// Paged attention for many query tokens per request on tensor cores (AttentionParams in
// backend/ops.h; the CPU twin is backend/cpu/attention.cc).
//
// Work decomposition (FlashAttention-2): one CTA of kWarps warps per (tile of kBlockM query rows,
// query head, request); each warp owns 16 query rows. The CTA walks its request's key tiles of
// kBlockN positions from the diagonal backwards (masked tiles first), gathering each K and V tile
// out of the paged cache through the block table into shared memory with 16-byte cp.async (a
// tile spans several cache blocks; rows past the context are zero-filled). S = Q K^T and O += P V
// run on mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) fed by ldmatrix; the softmax is online
// in fp32, in the log2 domain. Tiles past a tile's last query position (causal) or before its
// first query's window are never visited; the mask is applied only on tiles that straddle the
// diagonal, the context end or the window edge. Loads overlap compute FA2-style with one K and
// one V buffer: V(t) streams in during Q K(t)^T, K(t+1) during the softmax and P V(t). The block
// table is read one tile ahead into a small shared table of row offsets, so the gathers do no
// division in their inner loop.
//
// Speed: compute-bound for long prompts. Each warp holds 16 rows, so every K/V fragment read by
// ldmatrix feeds two MMAs; shared-memory bandwidth (128 B/clk/SM) caps mma.sync near ~2 kFLOP/clk
// per SM (~470 TFLOP/s on an H100), and at 243-254 registers (head_dim >= 96) only 2 CTAs (8
// warps) fit an SM, which limits latency hiding: 200 TFLOP/s at batch 4 x 4096 causal, head_dim
// 128 on an H100 (torch SDPA with wgmma: ~610). Short chunks and decode rows mixed into a batch
// waste the unused rows of their 64-row tile; packing a KV head's query heads into M (GQA) would
// recover that.
//
// On compute capability 9.0 (H100, H200) head dim 128 with a chunk longer than 64 tokens runs the
// second kernel below instead: wgmma (sm_90a) with operands in 128B-swizzled shared memory
// (wgmma.h), a producer warpgroup feeding two consumer warpgroups, GQA-packed 128-row tiles.
//
// Portability: the MMA, ldmatrix and cp.async are NVIDIA PTX (sm_80+); a HIP build needs an MFMA
// twin of the device body. The launcher and its checks are shared.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include <octavo/error.h>

#include "compat.h"
#include "cuda_ops.h"
#include "device_counters.h"
#include "mma_sync.h"
#include "wgmma.h"

namespace octavo::cuda {
namespace {

std::string str(long long value) { return std::to_string(value); }

// ---- tile geometry ----------------------------------------------------------------------------

/// Geometry per head dim. kBlockN = 32 and Q re-read from shared memory for head_dim 256 keep the
/// accumulators (O: head_dim / 2 floats per thread) inside the register file without spills.
template <int HeadDim>
struct PrefillTile {
  static_assert(HeadDim % 16 == 0, "head_dim must be a multiple of the MMA k-step (16)");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * gpu::kWarpSize;
  static constexpr int kBlockM = 16 * kWarps;               // query rows per CTA
  static constexpr int kBlockN = HeadDim > 128 ? 32 : 64;   // keys per iteration
  static constexpr bool kQInRegisters = HeadDim <= 128;
  static constexpr int kChunks = HeadDim / 8;               // 16-byte chunks per row
  // Shared rows are padded by 16 bytes: eight consecutive rows then start in eight different
  // 16-byte bank groups, so ldmatrix and the output staging are conflict-free without a swizzle.
  static constexpr int kRowPitch = HeadDim + 8;             // elements
  static constexpr int kQElements = kBlockM * kRowPitch;
  static constexpr int kKVElements = kBlockN * kRowPitch;
  static constexpr size_t kSharedBytes =
      size_t(kQElements + 2 * kKVElements) * 2 + 2 * kBlockN * sizeof(int64_t);
  static_assert(kBlockN <= kThreads, "one thread per key row fills the offset table");
  static_assert(kBlockM * kChunks % kThreads == 0 && kBlockN * kChunks % kThreads == 0,
                "tile loads split evenly over the CTA");
  static_assert(16 * kChunks % gpu::kWarpSize == 0, "output rows split evenly over a warp");
};

// ---- PTX wrappers (sm_80+; the tensor-core ones are in mma_sync.h) -----------------------------

/// 16-byte global -> shared copy; with `valid` false the destination is zero-filled instead.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

/// 2^x in one instruction (2 ulp); 2^-inf = 0, which the masked scores rely on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- the device body --------------------------------------------------------------------------

constexpr float kLog2e = 1.4426950408889634f;

#if OCTAVO_WGMMA  // only the Hopper kernel uses it (an unused function is a warning elsewhere)
/// tanh(x) = 1 - 2 / (e^2x + 1) from the exponential and reciprocal units, without tanhf's
/// branches; the absolute error stays near 1e-7.
__device__ __forceinline__ float fast_tanh(float x) {
  const float denominator = fast_exp2(x * (2.0f * kLog2e)) + 1.0f;
  float reciprocal;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(reciprocal) : "f"(denominator));
  return 1.0f - 2.0f * reciprocal;
}
#endif

template <typename T, int HeadDim>
__device__ __forceinline__ void prefill_body(const AttentionParams& p, unsigned char* shared) {
  using Tile = PrefillTile<HeadDim>;
  constexpr int kBlockM = Tile::kBlockM;
  constexpr int kBlockN = Tile::kBlockN;
  constexpr int kChunks = Tile::kChunks;
  constexpr int kPitch = Tile::kRowPitch;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kKSteps = HeadDim / 16;   // MMA k-steps over the head dim (Q K^T)
  constexpr int kNTiles = kBlockN / 8;    // 8-key column tiles of S
  constexpr int kDTiles = HeadDim / 8;    // 8-wide column tiles of O

  const int request = blockIdx.z;
  const int head = blockIdx.y;
  // The heaviest query tiles (last rows: most keys under causality) are scheduled first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int q_begin = p.query_start[request];
  const int q_len = p.query_start[request + 1] - q_begin;
  const int m0 = m_block * kBlockM;
  if (m0 >= q_len) return;
  const int context = p.context_lens[request];
  if (context < q_len) return;  // contract violation (the CPU backend throws); leave rows unwritten

  const int rows_valid = min(kBlockM, q_len - m0);
  const int first_query_pos = context - q_len + m0;
  const int last_query_pos = first_query_pos + rows_valid - 1;
  const int window = p.sliding_window;
  const int key_begin = window > 0 ? max(0, first_query_pos - window + 1) : 0;
  const int key_end = last_query_pos + 1;  // <= context
  const int n_block_first = key_begin / kBlockN;
  const int n_block_end = (key_end + kBlockN - 1) / kBlockN;
  const int num_tiles = n_block_end - n_block_first;

  const int tid = threadIdx.x;
  const int warp = tid / gpu::kWarpSize;
  const int lane = tid % gpu::kWarpSize;

  T* q_smem = reinterpret_cast<T*>(shared);
  T* k_smem = q_smem + Tile::kQElements;
  T* v_smem = k_smem + Tile::kKVElements;
  int64_t* key_offsets = reinterpret_cast<int64_t*>(v_smem + Tile::kKVElements);  // [2][kBlockN]

  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int64_t head_run = int64_t{p.block_size} * HeadDim;
  const int64_t block_elements = 2 * p.num_kv_heads * head_run;
  const int64_t v_delta = p.num_kv_heads * head_run;  // V follows K within a block
  const int32_t* block_table = p.block_tables + int64_t{request} * p.max_blocks_per_request;
  const T* cache = static_cast<const T*>(p.layer_cache);

  // Element offset of each key row of tile `n_block` (its K row; -1 past the context).
  auto fill_key_offsets = [&](int n_block, int buffer) {
    if (tid < kBlockN) {
      const int pos = n_block * kBlockN + tid;
      int64_t offset = -1;
      if (pos < context) {
        const int64_t block = block_table[pos / p.block_size];
        offset = block * block_elements + kv_head * head_run +
                 int64_t{pos % p.block_size} * HeadDim;
      }
      key_offsets[buffer * kBlockN + tid] = offset;
    }
  };
  auto load_kv_tile = [&](T* dst, int buffer, int64_t delta) {
#pragma unroll
    for (int i = 0; i < kBlockN * kChunks / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / kChunks;
      const int chunk = c % kChunks;
      const int64_t offset = key_offsets[buffer * kBlockN + row];
      const T* src = offset >= 0 ? cache + offset + delta + chunk * 8 : cache;
      cp_async_16(shared_address(dst + row * kPitch + chunk * 8), src, offset >= 0);
    }
  };

  // Prologue: Q tile (rows past q_len zero-filled) and the first (diagonal) K tile.
  {
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int i = 0; i < kBlockM * kChunks / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / kChunks;
      const int chunk = c % kChunks;
      const bool valid = row < rows_valid;
      const T* src =
          valid ? q + int64_t{q_begin + m0 + row} * p.q_stride + head * HeadDim + chunk * 8 : q;
      cp_async_16(shared_address(q_smem + row * kPitch + chunk * 8), src, valid);
    }
  }
  fill_key_offsets(n_block_end - 1, 0);
  __syncthreads();
  load_kv_tile(k_smem, 0, 0);
  cp_async_commit();
  if (num_tiles > 1) fill_key_offsets(n_block_end - 2, 1);

  // Per thread: rows lane/4 and lane/4 + 8 of the warp's 16; columns (lane % 4) * 2 + {0, 1} of
  // every 8-wide tile (the m16n8 accumulator layout).
  const int row_in_warp = lane / 4;
  const int query_pos[2] = {first_query_pos + warp * 16 + row_in_warp,
                            first_query_pos + warp * 16 + row_in_warp + 8};
  const float scale_log2 = p.scale * kLog2e;
  const bool has_softcap = p.softcap > 0.0f;
  const float softcap_log2 = p.softcap * kLog2e;
  const float scale_over_softcap = has_softcap ? p.scale / p.softcap : 0.0f;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const float slope_log2 = has_alibi ? p.alibi_slopes[head] * kLog2e : 0.0f;

  // ldmatrix lane addresses (byte offsets inside a tile), see the PTX fragment layouts:
  // A (Q, row-major 16x16): lane -> row lane % 16, column (lane / 16) * 8.
  const uint32_t q_lane = ((warp * 16 + (lane & 15)) * kPitch + (lane >> 4) * 8) * 2;
  // B = K^T: matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15).
  const uint32_t k_lane = (((lane & 7) + (lane >> 4) * 8) * kPitch + ((lane >> 3) & 1) * 8) * 2;
  // B = V (transposed load): (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (8-15, 8-15).
  const uint32_t v_lane = (((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + (lane >> 4) * 8) * 2;
  const uint32_t q_base = shared_address(q_smem) + q_lane;
  const uint32_t k_base = shared_address(k_smem) + k_lane;
  const uint32_t v_base = shared_address(v_smem) + v_lane;

  float o[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  uint32_t q_frag[Tile::kQInRegisters ? kKSteps : 1][4];

  for (int t = 0; t < num_tiles; ++t) {
    const int n_block = n_block_end - 1 - t;
    const int buffer = t & 1;
    cp_async_wait_all();
    __syncthreads();  // K(t) (and Q) landed; every warp is done with V(t-1)
    load_kv_tile(v_smem, buffer, v_delta);
    cp_async_commit();

    if constexpr (Tile::kQInRegisters) {
      if (t == 0) {
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) ldmatrix_x4(q_frag[ks], q_base + ks * 32);
      }
    }

    // S = Q K^T for the warp's 16 rows x kBlockN keys.
    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[4];
      if constexpr (Tile::kQInRegisters) {
        a[0] = q_frag[ks][0], a[1] = q_frag[ks][1], a[2] = q_frag[ks][2], a[3] = q_frag[ks][3];
      } else {
        ldmatrix_x4(a, q_base + ks * 32);
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_base + (np * 16 * kPitch + ks * 16) * 2);
        mma_16816<T>(s[2 * np], a, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V(t) landed; every warp is done with K(t)
    if (t + 1 < num_tiles) {
      load_kv_tile(k_smem, buffer ^ 1, 0);
      cp_async_commit();
    }
    if (t + 2 < num_tiles) fill_key_offsets(n_block - 2, buffer);

    // Scores in the log2 domain, masked where the tile straddles the diagonal or the window.
    const int n0 = n_block * kBlockN;
    const bool needs_mask = n0 + kBlockN - 1 > first_query_pos ||
                            (window > 0 && n0 <= last_query_pos - window);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = n0 + n * 8 + (lane % 4) * 2 + (i & 1);
        const int qpos = query_pos[i >> 1];
        float x = s[n][i];
        x = has_softcap ? softcap_log2 * tanhf(x * scale_over_softcap) : x * scale_log2;
        if (has_alibi) x += slope_log2 * float(key - qpos);
        if (needs_mask &&
            (key > qpos || key >= context || (window > 0 && key <= qpos - window))) {
          x = -INFINITY;
        }
        s[n][i] = x;
      }
    }

    // Online softmax per row; the four lanes of a quad share a row.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = row_max[r];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      }
      tile_max = fmaxf(tile_max, gpu::shfl_xor(tile_max, 1));
      tile_max = fmaxf(tile_max, gpu::shfl_xor(tile_max, 2));
      // A row with nothing visible yet keeps max -inf; subtracting 0 keeps exp2 at 0, not NaN.
      const float max_used = tile_max == -INFINITY ? 0.0f : tile_max;
      const float correction = fast_exp2(row_max[r] - max_used);
      row_max[r] = tile_max;
      row_sum[r] *= correction;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        o[d][2 * r] *= correction;
        o[d][2 * r + 1] *= correction;
      }
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        s[n][2 * r] = fast_exp2(s[n][2 * r] - max_used);
        s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - max_used);
        row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];
      }
    }

    // O += P V: the S accumulators of two adjacent 8-key tiles form one A fragment.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]),
                             pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                             pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_base + (ks * 16 * kPitch + dp * 16) * 2);
        mma_16816<T>(o[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }

  // Epilogue: normalise, stage the warp's 16 rows in its own rows of the Q tile (only this warp
  // ever reads them), then write whole 16-byte chunks of the valid rows.
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += gpu::shfl_xor(total, 1);
    total += gpu::shfl_xor(total, 2);
    inv_sum[r] = total > 0.0f ? 1.0f / total : 0.0f;
  }
  __syncwarp();
  T* stage = q_smem + warp * 16 * kPitch;
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_in_warp + 8 * r;
      const int col = d * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(stage + row * kPitch + col) =
          pack2<T>(o[d][2 * r] * inv_sum[r], o[d][2 * r + 1] * inv_sum[r]);
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out);
  const int64_t out_stride = int64_t{p.num_heads} * HeadDim;
#pragma unroll
  for (int i = 0; i < 16 * kChunks / gpu::kWarpSize; ++i) {
    const int c = lane + i * gpu::kWarpSize;
    const int row = c / kChunks;
    const int chunk = c % kChunks;
    const int tile_row = warp * 16 + row;
    if (tile_row < rows_valid) {
      *reinterpret_cast<gpu::Vec16*>(out + int64_t{q_begin + m0 + tile_row} * out_stride +
                                     head * HeadDim + chunk * 8) =
          *reinterpret_cast<const gpu::Vec16*>(stage + row * kPitch + chunk * 8);
    }
  }
}

template <typename T, int HeadDim>
// No minimum-CTAs bound: sm_90a ptxas then uses 159 (hd 64), 167 (80), 243 (96), 249 (128) and 254
// (256) registers without spills; capping at 168 (3 CTAs/SM) spills 24-280 bytes for hd >= 80.
__global__ void __launch_bounds__(PrefillTile<HeadDim>::kThreads)
    paged_attention_prefill_kernel(const AttentionParams params) {
  extern __shared__ __align__(16) unsigned char prefill_shared[];
  prefill_body<T, HeadDim>(params, prefill_shared);
}

// ---- the Hopper kernel (wgmma, sm_90a; head dim 128) -------------------------------------------

/// The Hopper kernel's softmax variants, one kernel each (ptxas allocates registers per kernel,
/// and the variants' layouts interfered in one): kPrefillFold (no softcap or ALiBi: the scale
/// folds into the exponent, one FMA per score), kPrefillScaled (ALiBi, or a scale that cannot be
/// folded) and kPrefillSoftcap (softcap, with or without ALiBi).
enum PrefillSoftmax : int { kPrefillFold = 0, kPrefillScaled = 1, kPrefillSoftcap = 2 };

/// Where the Hopper kernel's time goes, item by item: built with OCTAVO_PREFILL_TIMELINE (only
/// bench/prefill_variants.cu --timeline does), each work item records SM clock stamps, its SM,
/// CTA and tile count into prefill_timeline (kTimelineSlots per item index), which the harness
/// dumps for bench/prefill_timeline.py. Otherwise the stamps compile to nothing.
enum TimelineSlot : int {
  kDrawn = 0,        // the producer drew the item
  kKeysIssued = 1,   // the producer issued K(0)
  kInputsReady = 2,  // consumer 0 has Q and K(0)
  kFirstTile = 3,    // consumer 0 finished the first tile's softmax
  kLastStep = 4,     // consumer 0 finished the steps (before the last P V)
  kDone = 5,         // consumer 0 finished the epilogue
  kWhere = 6,        // SM | tiles << 32 | CTA << 48
  kDrawnTime = 7,    // globaltimer (ns) at kDrawn and kDone, to convert clocks
  kDoneTime = 8,
  kTimelineSlots = 9
};
#if defined(OCTAVO_PREFILL_TIMELINE)
constexpr int kTimelineItems = 1 << 17;
__device__ unsigned long long prefill_timeline[kTimelineItems * kTimelineSlots];
__device__ __forceinline__ void timeline_set(int item, TimelineSlot slot, unsigned long long v) {
  if (item < kTimelineItems) prefill_timeline[int64_t{item} * kTimelineSlots + slot] = v;
}
__device__ __forceinline__ void timeline_stamp(int item, TimelineSlot slot) {
  unsigned long long clock;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(clock)::"memory");
  timeline_set(item, slot, clock);
}
__device__ __forceinline__ void timeline_time(int item, TimelineSlot slot) {
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns)::"memory");
  timeline_set(item, slot, ns);
}
__device__ __forceinline__ void timeline_where(int item, int tiles) {
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  timeline_set(item, kWhere,
               sm | (uint64_t(tiles) << 32) | (uint64_t(blockIdx.x) << 48));
}
#else
__device__ __forceinline__ void timeline_stamp(int, TimelineSlot) {}
__device__ __forceinline__ void timeline_time(int, TimelineSlot) {}
__device__ __forceinline__ void timeline_where(int, int) {}
#endif

/// Three warpgroups: a producer that gathers K and V tiles out of the paged cache, and two
/// consumers of 64 query rows each that share every 128-key tile. Two Q buffers (this item's and
/// the next one's), two K and two V buffers sit in shared memory in wgmma.h's swizzled layout
/// (each 128-column row as two 64-column tiles), then the cache block of every key row of three
/// tiles, the buffers' barriers and the items' indices.
struct HopperTile {
  static constexpr int kHeadDim = 128;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = (kConsumers + 1) * 128;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = 128;
  static constexpr int kKSteps = kHeadDim / 16;   // wgmma k-steps of Q K^T
  static constexpr int kPSteps = kBlockN / 16;    // wgmma k-steps of P V
  static constexpr uint32_t kQHalfBytes = kBlockM * wgmma::kRowBytes;  // one 64-column tile
  static constexpr uint32_t kKVHalfBytes = kBlockN * wgmma::kRowBytes;
  static constexpr uint32_t kQBytes = 2 * kQHalfBytes;
  static constexpr uint32_t kKVBytes = 2 * kKVHalfBytes;
  static constexpr int kQBuffers = 2;  // the next item's Q lands while this one's runs
  static constexpr int kStages = 2;    // K and V buffers each
  static constexpr int kIdSlots = 3;   // tiles whose cache block ids are in shared memory
  static constexpr uint32_t kBlocksBytes = kIdSlots * kBlockN * sizeof(int32_t);
  static constexpr size_t kItemBytes = 64;  // an item's fields, which the producer passes on
  // K full, K empty, V full, V empty per stage; Q full, Q empty per Q buffer.
  static constexpr int kBarriers = 4 * kStages + 2 * kQBuffers;
  static constexpr size_t kSharedBytes = 1024 /* alignment slack */ + kQBuffers * kQBytes +
                                         2 * kStages * kKVBytes + kBlocksBytes +
                                         kBarriers * sizeof(uint64_t) +
                                         kQBuffers * sizeof(int32_t) /* item indices */ +
                                         kQBuffers * kItemBytes;
  static_assert(kSharedBytes <= 227 * 1024, "an H100 block has 227 KiB of shared memory");
  // Registers per thread after the split (setmaxnreg): the producer needs few, the consumers
  // hold S, O and P (160) plus the softmax state. The split redistributes what the CTA was
  // launched with (65536 / 384 threads, rounded down to a multiple of 8: 168 each); a grow
  // beyond that total waits forever for registers nobody frees.
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  static constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
  static_assert(kHeadDim == 128 && kKSteps == 8 && kPSteps == 8,
                "the 64-column tiles and the m64n128 P V shape assume head dim 128, 128 keys");
  static_assert(128 * (kProducerRegisters + kConsumers * kConsumerRegisters) <=
                    kThreads * kLaunchRegisters,
                "the warpgroups' registers after the split fit what the CTA is launched with");
};

// Persistent CTAs, one per SM, each taking work items of (128 rows, KV head, request) in turn;
// an item's key tiles run from the diagonal backwards as in prefill_body, and its rows are the
// KV head's query heads at 128 / group positions (GQA packing). Warp-specialised as
// FlashAttention-3: the producer warpgroup loads Q, K(i) and V(i-1) ahead of the consumers, into
// the next item, and hands each buffer over through an mbarrier (tensor copies for Q and for
// key tiles inside the context, a cp.async gather for the one holding its end). Each consumer
// issues S(t) = Q K(t)^T together with O += P(t-1) V(t-1) and runs the softmax of S(t) as soon
// as S(t) is done, under P V; the two consumers also take turns at issuing, so one's softmax runs
// under the other's products. O leaves through the item's Q buffer as tensor copies, each
// consumer's rows on their own (OutCopy). Scores, masks and the online softmax follow
// prefill_body's rules.
//
// Why so (H100, bench/results/RESULTS.md, 2026-11-28): a per-CTA timeline (clock stamps) of the
// one-CTA-per-item kernel put ~7.9 us of fixed cost on each CTA beside 1.55 us per key tile: Q
// and K(0) landing took 3.5 us, 2.2 of them the producer's 2,048 16-byte Q copies stalling on
// their own issue, and the thread stores of O stalled likewise; as tensor copies (one
// instruction per 64 columns) 4 x 4096 went 1.03 -> 0.97 ms, 16 x 1024 -18%, 64 x 512 -24%.
// Persistence then hides the next item's Q and K(0) under the current one (two Q buffers, so two
// K and two V stages fit): 4 x 4096 0.944 -> 0.920 ms (600 TFLOP/s, 1.0x torch SDPA), 16 x 1024
// -11%, 64 x 512 -17%, mixed lengths -9 to -15%; launches of a few items pay ~2 us for it
// (1 x 100 tokens 16.6 -> 18.9 us), and not for the counter: with each CTA's first item taken
// from blockIdx.x instead, 1 x 100 and 2 x 300 tokens timed the same. With the whole tile's
// copies issued once both consumers had staged their rows, the consumer ahead in the ping-pong
// waited half a step for the other at every item's end; copying each consumer's rows alone
// took the item's last P V and epilogue from 2.0 to 1.5 us: 4 x 4096 0.918 -> 0.909 ms, 64 x
// 512 -3.6%, outputs bit-identical (alternated, one H100, 2026-11-28).

/// How the wgmma kernel's O tiles leave shared memory: tensor copies of each consumer's 64 rows
/// (the group divides 64), tensor copies of the whole tile once both consumers are done (other
/// groups), or the threads' 16-byte stores (no tensor map: alignment, driver). Partial tiles
/// always take the threads' stores.
enum class OutCopy : int { kThreads = 0, kWholeTile = 1, kPerConsumer = 2 };

template <typename T, int Variant>
__device__ __forceinline__ void prefill_sm90_body(const AttentionParams& p, const void* cache_map,
                                                  bool tensor_copies, const void* q_map,
                                                  bool q_tensor_copy, const void* out_map,
                                                  OutCopy out_copy, int* scheduler,
                                                  unsigned char* raw_shared) {
#if OCTAVO_WGMMA
  using Tile = HopperTile;
  constexpr int kBlockM = Tile::kBlockM;
  constexpr int kBlockN = Tile::kBlockN;
  constexpr int kHeadDim = Tile::kHeadDim;

  // GQA packing: an item's 128 rows are `positions` query positions x the `group` query heads
  // that share its KV head (row r: position r / group, head r % group), so every K and V tile
  // read serves the whole group.
  const int group = p.num_heads / p.num_kv_heads;
  const int positions = kBlockM / group;  // per item (rows past positions * group stay idle)
  const int position_blocks = (p.max_query_len + positions - 1) / positions;
  const int num_items = position_blocks * p.num_kv_heads * p.num_requests;
  const int window = p.sliding_window;
  // Persistent CTAs take items in order from a counter in global memory (`scheduler`: next item,
  // CTAs done; the last CTA to finish zeroes both for the next launch), as the hardware hands
  // out CTAs: requests, KV heads, then position blocks from the last (most keys) down, so the
  // CTAs running at once read the same K and V tiles out of L2, and whoever is free takes the
  // next item. A fixed assignment (round-robin, snake order) left 1 x 8192 55% and mixed-length
  // batches up to 25% slower: item costs vary 1-64 tiles in runs no fixed order evens out.
  struct Item {
    int request, kv_head, q_begin, m0, context, positions_valid, rows_valid;
    int first_query_pos, last_query_pos, n_block_end, num_tiles;
    bool valid;  // false past the request's chunk (and for a context shorter than the chunk,
                 // a contract violation the CPU backend throws on: those rows stay unwritten)
  };
  auto item_at = [&](int index) {
    Item it;
    const int position_block = position_blocks - 1 - index % position_blocks;
    const int rest = index / position_blocks;
    it.kv_head = rest % p.num_kv_heads;
    it.request = rest / p.num_kv_heads;
    it.q_begin = p.query_start[it.request];
    const int q_len = p.query_start[it.request + 1] - it.q_begin;
    it.m0 = position_block * positions;  // first query position of the item in the chunk
    it.context = p.context_lens[it.request];
    it.valid = it.m0 < q_len && it.context >= q_len;
    it.positions_valid = min(positions, q_len - it.m0);
    it.rows_valid = it.positions_valid * group;
    it.first_query_pos = it.context - q_len + it.m0;
    it.last_query_pos = it.first_query_pos + it.positions_valid - 1;
    const int key_begin = window > 0 ? max(0, it.first_query_pos - window + 1) : 0;
    it.n_block_end = (it.last_query_pos + kBlockN) / kBlockN;
    it.num_tiles = it.n_block_end - key_begin / kBlockN;
    return it;
  };
  // The next item from the counter (-1: none left). An invalid item starts its (request, KV
  // head)'s run of position blocks past the chunk (all of the run for a request with no valid
  // block), so the counter skips to the run's first valid item. Drawn when the producer moves on
  // to the item: drawing two tiles earlier left an item's ~1 us wait for Q and K(0) as it was
  // and made every tile slower (the producer spilled more in its loop; 4 x 4096 +8%, H100).
  auto draw_item = [&](Item& it) {
    for (int index = atomicAdd(&scheduler[0], 1); index < num_items;
         index = atomicAdd(&scheduler[0], 1)) {
      it = item_at(index);
      if (it.valid) return index;
      const int q_len = p.query_start[it.request + 1] - it.q_begin;
      const bool usable = q_len > 0 && it.context >= q_len;
      const int valid_blocks = usable ? (q_len + positions - 1) / positions : 0;
      atomicMax(&scheduler[0], index - index % position_blocks + position_blocks - valid_blocks);
    }
    return -1;
  };

  const int tid = threadIdx.x;
  // Taken from lane 0 so that ptxas knows it is warp-uniform: the consumers' shared-memory
  // descriptors, which depend on it, then live in uniform registers.
  const int warpgroup = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int lane = tid % gpu::kWarpSize;

  // wgmma's swizzle pattern repeats every 1024 bytes; the tiles start on that boundary.
  const uint32_t raw_address = shared_address(raw_shared);
  unsigned char* shared = raw_shared + ((1024 - (raw_address & 1023)) & 1023);
  constexpr int kStages = Tile::kStages;
  constexpr int kQBuffers = Tile::kQBuffers;
  const uint32_t q_tiles = shared_address(shared);                           // [kQBuffers]
  const uint32_t k_tiles = q_tiles + kQBuffers * Tile::kQBytes;              // [kStages]
  const uint32_t v_tiles = k_tiles + kStages * Tile::kKVBytes;               // [kStages]
  // Tiles are counted over the CTA's items: tile g's K and V go to buffer g % kStages, the cache
  // block of each of its key rows (-1 past the context) to slot g % kIdSlots of key_blocks. The
  // n-th item's Q goes to buffer n % kQBuffers, and its O leaves through the same buffer.
  int32_t* key_blocks = reinterpret_cast<int32_t*>(shared + kQBuffers * Tile::kQBytes +
                                                   2 * kStages * Tile::kKVBytes);
  const uint32_t barriers = shared_address(key_blocks) + Tile::kBlocksBytes;
  // Buffer b's barriers: "full" completes when its tile landed (the producer's 128 threads
  // arrive), "empty" when both consumers' products that read it are done (8 warps arrive). Q
  // buffer b: "full" as K's (one arrival with the tensor copy), "empty" once its item's O has
  // left it (one arrival per consumer, for its rows).
  auto k_full = [&](int g) { return barriers + uint32_t(g % kStages) * 8; };
  auto k_empty = [&](int g) { return barriers + uint32_t(kStages + g % kStages) * 8; };
  auto v_full = [&](int g) { return barriers + uint32_t(2 * kStages + g % kStages) * 8; };
  auto v_empty = [&](int g) { return barriers + uint32_t(3 * kStages + g % kStages) * 8; };
  auto q_full = [&](int n) { return barriers + uint32_t(4 * kStages + n % kQBuffers) * 8; };
  auto q_empty = [&](int n) {
    return barriers + uint32_t(4 * kStages + kQBuffers + n % kQBuffers) * 8;
  };
  // The u-th use of a buffer (tile g: u = g / kStages) completes phase u of its barriers.
  auto phase = [](int g) { return uint32_t((g / kStages) & 1); };
  auto q_phase = [](int n) { return uint32_t((n / kQBuffers) & 1); };
  // The n-th item's index (-1: no more items) sits in item_slots[n % kQBuffers] from when the
  // producer draws it (its Q buffer free) until the buffer's next item: the producer's threads
  // read it after a barrier, the consumers after its Q-full phase. Its fields (item_at) sit in
  // items[n % kQBuffers] likewise, written by the producer's thread 0 as it draws the item: every
  // other thread takes them from there rather than from global memory at the item's start
  // (H100, alternated, outputs bit-identical: 4 x 4096 -1.0%, 16 x 1024 -2.3%, 1 x 8192 -1.3%).
  volatile int32_t* const item_slots =
      reinterpret_cast<int32_t*>(shared + kQBuffers * Tile::kQBytes + 2 * kStages * Tile::kKVBytes +
                                 Tile::kBlocksBytes + Tile::kBarriers * sizeof(uint64_t));
  static_assert(sizeof(Item) <= Tile::kItemBytes && alignof(Item) <= alignof(int32_t));
  Item* const items = reinterpret_cast<Item*>(const_cast<int32_t*>(item_slots) + kQBuffers);
  if (tid == 0) {
    for (int b = 0; b < kStages; ++b) {
      wgmma::barrier_init(k_full(b), 128);
      wgmma::barrier_init(v_full(b), 128);
      wgmma::barrier_init(k_empty(b), 4 * Tile::kConsumers);
      wgmma::barrier_init(v_empty(b), 4 * Tile::kConsumers);
    }
    for (int b = 0; b < kQBuffers; ++b) {
      // Thread 0's arrival (after it wrote the item index) plus, without the tensor copy, each
      // producer thread's arrival on its Q copies.
      wgmma::barrier_init(q_full(b), q_tensor_copy ? 1 : 129);
      wgmma::barrier_init(q_empty(b), Tile::kConsumers);
    }
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer: an item's tile i (0 = the diagonal) covers keys from
    // (n_block_end - 1 - i) * kBlockN; it runs ahead of the consumers, into the next items,
    // waiting only for buffers.
    wgmma::shrink_registers<Tile::kProducerRegisters>();
    const int64_t head_run = int64_t{p.block_size} * kHeadDim;
    const int64_t block_elements = 2 * p.num_kv_heads * head_run;
    const int64_t v_delta = p.num_kv_heads * head_run;
    const int block_mask = p.block_size - 1;  // a power of two that divides kBlockN (host check)
    const int block_shift = __ffs(p.block_size) - 1;
    // Each thread copies one 16-byte chunk of every 8th row.
    const int chunk = tid % 16;
    const uint32_t half = uint32_t(chunk / 8);
    const int first_row = tid / 16;
    // A tile whose rows are all inside the context comes in whole cache blocks through the
    // tensor copy engine (two 64-column boxes per block); the tile holding the context's end is
    // gathered row by row with cp.async, which zero-fills the rows past it (the slots of a partly
    // written block hold anything, and P = 0 times a NaN there is NaN). One lane of each warp
    // issues a share of the boxes: from one thread, 2 KiB boxes (block size 16) came at half the
    // rate the engine reaches with 16 KiB ones (block size 128); from four, at 80% of it.
    constexpr int kIssuingWarps = 4;
    const int blocks_per_tile = kBlockN / p.block_size;
    const int producer_warp = tid / gpu::kWarpSize;
    int tile_base = 0;  // the CTA's tiles before this item
    for (int n = 0;; ++n) {  // the CTA's n-th item
      const uint32_t q_tile = q_tiles + uint32_t(n % kQBuffers) * Tile::kQBytes;
      if (n >= kQBuffers) wgmma::barrier_wait(q_empty(n), q_phase(n) ^ 1);
      if (tid == 0) {
        Item drawn;
        const int drawn_index = draw_item(drawn);
        if (drawn_index >= 0) items[n % kQBuffers] = drawn;
        item_slots[n % kQBuffers] = drawn_index;
      }
      wgmma::named_barrier(1, 128);
      const int index = item_slots[n % kQBuffers];
      if (index < 0) {
        if (tid == 0) wgmma::barrier_arrive(q_full(n));
        if (!q_tensor_copy) wgmma::barrier_arrive(q_full(n));
        break;
      }
      if (tid == 0) {
        timeline_stamp(index, kDrawn);
        timeline_time(index, kDrawnTime);
      }
      // Thread 0 looked the item up as it drew it; the others read it here, not from global memory.
      const Item it = items[n % kQBuffers];
      // Q first, as two tensor copies (64 columns each) of the rows' positions x group heads:
      // the same 128-row packing, since a position's group heads are adjacent in q. Issued from
      // 128 threads as 2,048 16-byte copies it took ~2.2 us of the producer's time (the copies'
      // issue stalls on their own latency).
      if (q_tensor_copy && tid == 0) {
        wgmma::barrier_arrive_expect_bytes(q_full(n),
                                           uint32_t(positions * group) * 2 * wgmma::kRowBytes);
        for (int half_index = 0; half_index < 2; ++half_index) {
          wgmma::tensor_load_3d(q_tile + uint32_t(half_index) * Tile::kQHalfBytes, q_map,
                                half_index * 64, it.kv_head * group, it.q_begin + it.m0,
                                q_full(n));
        }
      }
      const int32_t* block_table =
          p.block_tables + int64_t{it.request} * p.max_blocks_per_request;
      const T* cache = static_cast<const T*>(p.layer_cache) + it.kv_head * head_run;
      // Thread tid looks up key row tid of a tile; each tile's lookup is issued one iteration
      // before its ids are stored (next_block), so its latency hides behind a round of copies.
      auto block_of = [&](int tile) {
        const int pos = (it.n_block_end - 1 - tile) * kBlockN + tid;
        return tile < it.num_tiles && pos < it.context ? block_table[pos >> block_shift] : -1;
      };
      auto ids = [&](int tile) { return key_blocks + ((tile_base + tile) % Tile::kIdSlots) * kBlockN; };
      auto load_kv_tensor = [&](uint32_t tile_address, int tile, int kind, uint32_t barrier) {
        // Thread 0 arrives expecting the whole tile before it issues its own boxes, so the phase
        // cannot complete until they land too.
        if (tid == 0) wgmma::barrier_arrive_expect_bytes(barrier, Tile::kKVBytes);
        if (lane == 0 && producer_warp < kIssuingWarps) {
          const int32_t* blocks = ids(tile);
          for (int box = producer_warp; box < 2 * blocks_per_tile; box += kIssuingWarps) {
            const int j = box / 2;
            const uint32_t box_half = uint32_t(box % 2);
            const uint32_t dst = tile_address + box_half * Tile::kKVHalfBytes +
                                 uint32_t(j * p.block_size) * wgmma::kRowBytes;
            wgmma::tensor_load_5d(dst, cache_map, int(box_half) * 64, 0, it.kv_head, kind,
                                  blocks[j * p.block_size], barrier);
          }
        }
        if (tid != 0) wgmma::barrier_arrive(barrier);
      };
      auto load_kv = [&](uint32_t tile_address, int tile, int64_t delta) {
        const int32_t* blocks = ids(tile);
#pragma unroll 4
        for (int row = first_row; row < kBlockN; row += 8) {
          const int32_t block = blocks[row];
          // Rows of a tile start at a multiple of the block size: row % block_size is the slot.
          const T* src = block >= 0 ? cache + block * block_elements + delta +
                                          (row & block_mask) * kHeadDim + chunk * 8
                                    : cache;
          cp_async_16(tile_address + half * Tile::kKVHalfBytes + wgmma::swizzled(row, chunk % 8),
                      src, block >= 0);
        }
      };
      // The slots of tiles 0 and 1 held the previous item's tiles, whose copies every thread has
      // issued once it is past this barrier.
      const int32_t first_blocks[2] = {block_of(0), block_of(1)};
      int32_t next_block = block_of(2);
      wgmma::named_barrier(1, 128);
      ids(0)[tid] = first_blocks[0];
      ids(1)[tid] = first_blocks[1];
      wgmma::named_barrier(1, 128);
      if (!q_tensor_copy) {
        const T* q = static_cast<const T*>(p.q);
        for (int row = first_row; row < kBlockM; row += 8) {
          const bool valid = row < it.rows_valid;
          const int head = it.kv_head * group + row % group;
          const T* src = valid ? q + int64_t{it.q_begin + it.m0 + row / group} * p.q_stride +
                                     head * kHeadDim + chunk * 8
                               : q;
          cp_async_16(q_tile + half * Tile::kQHalfBytes + wgmma::swizzled(row, chunk % 8), src,
                      valid);
        }
        wgmma::barrier_arrive_on_copies(q_full(n));
        if (tid == 0) wgmma::barrier_arrive(q_full(n));
      }
      auto tile_is_whole = [&](int tile) {
        return tensor_copies && (it.n_block_end - tile) * kBlockN <= it.context;
      };
      auto load = [&](uint32_t tile_address, int tile, int kind, uint32_t barrier) {
        if (tile_is_whole(tile)) {
          load_kv_tensor(tile_address, tile, kind, barrier);
        } else {
          load_kv(tile_address, tile, kind == 0 ? 0 : v_delta);
          wgmma::barrier_arrive_on_copies(barrier);
        }
      };
      // K(i) into its buffer once the consumers are done with the tile kStages before it, V(i - 1)
      // likewise.
      for (int i = 0; i <= it.num_tiles; ++i) {
        const int g = tile_base + i;
        if (i < it.num_tiles) {
          if (g >= kStages) wgmma::barrier_wait(k_empty(g), phase(g) ^ 1);
          load(k_tiles + uint32_t(g % kStages) * Tile::kKVBytes, i, 0, k_full(g));
          if (i == 0 && tid == 0) timeline_stamp(index, kKeysIssued);
        }
        if (i > 0) {
          const int v = g - 1;
          if (v >= kStages) wgmma::barrier_wait(v_empty(v), phase(v) ^ 1);
          load(v_tiles + uint32_t(v % kStages) * Tile::kKVBytes, i - 1, 1, v_full(v));
        }
        if (i > 0 && i + 1 < it.num_tiles) {
          // Tile i + 1's slot held the tile kIdSlots before it, whose V every thread issued
          // before the last barrier.
          ids(i + 1)[tid] = next_block;
          next_block = block_of(i + 2);
          wgmma::named_barrier(1, 128);
        }
      }
      tile_base += it.num_tiles;
    }
    cp_async_commit();
    cp_async_wait_all();  // no copy outlives its thread
    // Every CTA drew past the last item before counting itself done, so the last to finish can
    // zero the counter for the next launch on the stream.
    if (tid == 0 && atomicAdd(&scheduler[1], 1) == int(gridDim.x) - 1) {
      scheduler[0] = 0;
      scheduler[1] = 0;
    }
    return;
  }

  // ---- consumers: warpgroup 1 owns query rows 0-63, warpgroup 2 rows 64-127.
  wgmma::grow_registers<Tile::kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int warp = (tid % 128) / gpu::kWarpSize;
  // Per thread: rows lane / 4 and lane / 4 + 8 of its warp's 16 (wgmma.h's accumulator layout).
  const int row_in_tile = consumer * 64 + warp * 16 + lane / 4;
  const int rows[2] = {row_in_tile, row_in_tile + 8};
  const float scale_log2 = p.scale * kLog2e;
  const bool has_softcap = p.softcap > 0.0f;
  const float softcap_log2 = p.softcap * kLog2e;
  const float scale_over_softcap = has_softcap ? p.scale / p.softcap : 0.0f;
  const bool has_alibi = p.alibi_slopes != nullptr;
  // The current item's: its rows' query positions; row r sees keys visible_from[r] ..
  // visible_from[r] + visible_span[r] (causal, inside the context and the window; one unsigned
  // comparison per score masks the rest; a padded row, past rows_valid, may see more and is
  // never stored); ALiBi slopes; its first tile's keys; the Q rows of this consumer.
  int query_pos[2] = {0, 0};
  int visible_from[2] = {0, 0};
  uint32_t visible_span[2] = {0, 0};
  float slope_log2[2] = {0.0f, 0.0f};
  int n_block_end = 0;
  int first_query_pos = 0;
  int last_query_pos = 0;
  uint32_t q_rows = 0;
  auto issue_scores = [&](float (&s)[64], uint32_t k_tile) {
#pragma unroll
    for (int ks = 0; ks < Tile::kKSteps; ++ks) {
      const uint32_t column = uint32_t(ks % 4) * 32;  // bytes into the 128-byte row
      const uint32_t half = uint32_t(ks / 4);
      const uint64_t a = wgmma::descriptor(q_rows + half * Tile::kQHalfBytes + column, 16,
                                           wgmma::kGroupBytes);
      const uint64_t b = wgmma::descriptor(k_tile + half * Tile::kKVHalfBytes + column, 16,
                                           wgmma::kGroupBytes);
      wgmma::mma_m64n128k16_ss<T>(s, a, b, ks > 0);
    }
  };
  float o[64];
  // P in two register buffers: the softmax of tile t writes one while P(t-1) V(t-1), reading the
  // other, is on the tensor cores (a wgmma reads its register operand until it completes).
  uint32_t pv[2][Tile::kPSteps][4];
  auto issue_values = [&](const uint32_t (&probs)[Tile::kPSteps][4], uint32_t v_tile) {
#pragma unroll
    for (int ks = 0; ks < Tile::kPSteps; ++ks) {
      const uint64_t b = wgmma::descriptor(v_tile + uint32_t(ks) * 16 * wgmma::kRowBytes,
                                           Tile::kKVHalfBytes, wgmma::kGroupBytes);
      wgmma::mma_m64n128k16_rs<T>(o, probs[ks], b);
    }
  };
  auto pin_operands = [&]() {
    wgmma::pin(o);
#pragma unroll
    for (int b = 0; b < 2; ++b) {
#pragma unroll
      for (int ks = 0; ks < Tile::kPSteps; ++ks) wgmma::pin(pv[b][ks]);
    }
  };
  // One arrival per warp: its part of the warpgroup's products that read the buffer is done.
  auto release = [&](uint32_t barrier) {
    if (lane == 0) wgmma::barrier_arrive(barrier);
  };

  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  // Masks apply only on tiles that straddle the diagonal, the context end or the window edge.
  auto tile_needs_mask = [&](int tile) {
    const int n0 = (n_block_end - 1 - tile) * kBlockN;
    return n0 + kBlockN - 1 > first_query_pos || (window > 0 && n0 <= last_query_pos - window);
  };
  // Score i of column group j of tile `tile` (accumulator element 4j + i) as the softmax sees
  // it: raw for kFold (the scale is folded into the exponent), otherwise in the log2 domain
  // (Raw: masked but not transformed). Recomputed where it is needed rather than stored back
  // into s: a write to S's registers while P V is pending would make ptxas wait for P V (it does
  // not tell wgmma groups apart).
  using Raw = std::false_type;
  using Transformed = std::true_type;
  auto score = [&](auto masked, auto transformed, float x, int n0, int j, int i) {
    const int key = n0 + j * 8 + (lane % 4) * 2 + (i & 1);
    const int qpos = query_pos[i >> 1];
    if constexpr (decltype(transformed)::value && Variant == kPrefillSoftcap) {
      x = softcap_log2 * fast_tanh(x * scale_over_softcap) +
          slope_log2[i >> 1] * float(key - qpos);
    } else if constexpr (decltype(transformed)::value && Variant == kPrefillScaled) {
      x = fmaf(x, scale_log2, slope_log2[i >> 1] * float(key - qpos));
    }
    if constexpr (decltype(masked)::value) {
      if (uint32_t(key - visible_from[i >> 1]) > visible_span[i >> 1]) x = -INFINITY;
    }
    return x;
  };
  auto quad_max = [](float x) {
    x = fmaxf(x, gpu::shfl_xor(x, 1));
    return fmaxf(x, gpu::shfl_xor(x, 2));
  };
  // Without ALiBi the softcap is increasing in the raw score, so a row's maximum is capped once
  // rather than every score twice (its tanh dominates that kernel's softmax).
  const bool cap_after_max = Variant == kPrefillSoftcap && !has_alibi && scale_over_softcap > 0.0f;
  // Row r's maximum over tile n0's scores, as the softmax sees them.
  auto tile_max = [&](auto masked, const float (&s)[64], int n0, int r) {
    if constexpr (Variant == kPrefillSoftcap) {
      if (cap_after_max) {
        float raw = -INFINITY;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          raw = fmaxf(raw, fmaxf(score(masked, Raw{}, s[4 * j + 2 * r], n0, j, 2 * r),
                                 score(masked, Raw{}, s[4 * j + 2 * r + 1], n0, j, 2 * r + 1)));
        }
        raw = quad_max(raw);
        return raw == -INFINITY ? raw : softcap_log2 * fast_tanh(raw * scale_over_softcap);
      }
    }
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      m = fmaxf(m, fmaxf(score(masked, Transformed{}, s[4 * j + 2 * r], n0, j, 2 * r),
                         score(masked, Transformed{}, s[4 * j + 2 * r + 1], n0, j, 2 * r + 1)));
    }
    return quad_max(m);
  };
  // P(tile) = exp2(score - max) of S(tile) into probs as bf16/fp16 pairs; returns O's rescale
  // factors through `correction`.
  auto softmax = [&](auto masked, const float (&s)[64], int tile,
                     uint32_t (&probs)[Tile::kPSteps][4], float (&correction)[2]) {
    const int n0 = (n_block_end - 1 - tile) * kBlockN;
    const float exponent_scale = Variant == kPrefillFold ? scale_log2 : 1.0f;
    float max_used[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], tile_max(masked, s, n0, r) * exponent_scale);
      // A row with nothing visible yet keeps max -inf; subtracting 0 keeps exp2 at 0, not NaN.
      max_used[r] = new_max == -INFINITY ? 0.0f : new_max;
      correction[r] = fast_exp2(row_max[r] - max_used[r]);
      row_max[r] = new_max;
    }
    float sum[2] = {0.0f, 0.0f};
    // probs[ks][x] holds columns 16 ks + 8 (x / 2) + {0, 1} of row x % 2 (mma.sync's A fragment),
    // i.e. accumulator elements 8 ks + 2 x and 8 ks + 2 x + 1.
#pragma unroll
    for (int ks = 0; ks < Tile::kPSteps; ++ks) {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int j = 2 * ks + x / 2;
        const int r = x % 2;
        const float x0 = score(masked, Transformed{}, s[4 * j + 2 * r], n0, j, 2 * r);
        const float x1 = score(masked, Transformed{}, s[4 * j + 2 * r + 1], n0, j, 2 * r + 1);
        const float e0 = fast_exp2(fmaf(x0, exponent_scale, -max_used[r]));
        const float e1 = fast_exp2(fmaf(x1, exponent_scale, -max_used[r]));
        sum[r] += e0 + e1;
        probs[ks][x] = pack2<T>(e0, e1);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * correction[r] + sum[r];
  };
  auto rescale_output = [&](const float (&correction)[2]) {
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      o[4 * j] *= correction[0];
      o[4 * j + 1] *= correction[0];
      o[4 * j + 2] *= correction[1];
      o[4 * j + 3] *= correction[1];
    }
  };
  // cp.async writes through the generic proxy; the tensor cores read through the async one.
  auto acquire = [&](uint32_t barrier, int use) {
    wgmma::barrier_wait(barrier, phase(use));
    wgmma::fence_shared_for_async_reads();
  };

  // The consumers take turns at issuing products (FlashAttention-3's ping-pong): while one
  // issues, the other runs its softmax. Consumer c waits at named barrier 2 + c; the other
  // arrives. Barrier 4 + c spans consumer c's own warpgroup.
  auto take_turn = [&]() { wgmma::named_barrier(2 + consumer, 256); };
  auto pass_turn = [&]() { wgmma::named_barrier_arrive(3 - consumer, 256); };
  auto warpgroup_barrier = [&]() { wgmma::named_barrier(4 + consumer, 128); };

  using Unmasked = std::false_type;
  using Masked = std::true_type;
  float s[64];
  float correction[2];
  auto tile_softmax = [&](int t, uint32_t (&probs)[Tile::kPSteps][4]) {
    if (tile_needs_mask(t)) {
      softmax(Masked{}, s, t, probs, correction);
    } else {
      softmax(Unmasked{}, s, t, probs, correction);
    }
  };
  int tile_base = 0;  // the CTA's tiles before this item (buffers and barrier phases count them)
  // Step t (FlashAttention-3's order within a warpgroup): S(t) = Q K(t)^T and O += P(t-1) V(t-1)
  // issued together; the softmax of S(t) runs once S(t) is done, under P V; then O is rescaled
  // to tile t's maximum. P(t) goes to buffer t % 2.
  auto step = [&](auto parity, int t) {
    constexpr int kThis = decltype(parity)::value;
    const int g = tile_base + t;
    acquire(k_full(g), g);
    acquire(v_full(g - 1), g - 1);
    pin_operands();
    take_turn();
    wgmma::fence();
    issue_scores(s, k_tiles + uint32_t(g % kStages) * Tile::kKVBytes);
    wgmma::commit();
    issue_values(pv[1 - kThis], v_tiles + uint32_t((g - 1) % kStages) * Tile::kKVBytes);
    wgmma::commit();
    pass_turn();
    wgmma::wait<1>();
    wgmma::pin(s);
    release(k_empty(g));
    tile_softmax(t, pv[kThis]);
    // Without a barrier here ptxas schedules the wait for P V as early as its operands allow,
    // i.e. before most of the softmax.
    warpgroup_barrier();
    wgmma::wait<0>();
    pin_operands();
    release(v_empty(g - 1));
    rescale_output(correction);
  };
  T* const out = static_cast<T*>(p.out);
  const int64_t out_stride = int64_t{p.num_heads} * kHeadDim;

  if (consumer == 1) pass_turn();  // consumer 0 issues first
  for (int n = 0;; ++n) {  // the CTA's n-th item
    wgmma::barrier_wait(q_full(n), q_phase(n));
    wgmma::fence_shared_for_async_reads();
    const int index = item_slots[n % kQBuffers];
    if (index < 0) break;
    const Item it = items[n % kQBuffers];
    n_block_end = it.n_block_end;
    first_query_pos = it.first_query_pos;
    last_query_pos = it.last_query_pos;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      query_pos[r] = it.first_query_pos + rows[r] / group;
      visible_from[r] = window > 0 ? max(query_pos[r] - window + 1, 0) : 0;
      visible_span[r] = uint32_t(min(query_pos[r], it.context - 1) - visible_from[r]);
      slope_log2[r] =
          has_alibi ? p.alibi_slopes[it.kv_head * group + rows[r] % group] * kLog2e : 0.0f;
      row_max[r] = -INFINITY;
      row_sum[r] = 0.0f;
    }
    const uint32_t q_offset = uint32_t(n % kQBuffers) * Tile::kQBytes;
    q_rows = q_tiles + q_offset + uint32_t(consumer) * 64 * wgmma::kRowBytes;
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;

    acquire(k_full(tile_base), tile_base);
    if (tid == 128) timeline_stamp(index, kInputsReady);
    take_turn();
    wgmma::fence();
    issue_scores(s, k_tiles + uint32_t(tile_base % kStages) * Tile::kKVBytes);
    wgmma::commit();
    pass_turn();
    wgmma::wait<0>();
    wgmma::pin(s);
    release(k_empty(tile_base));
    tile_softmax(0, pv[0]);
    if (tid == 128) timeline_stamp(index, kFirstTile);
    for (int t = 1; t < it.num_tiles; t += 2) {
      step(std::integral_constant<int, 1>{}, t);
      if (t + 1 < it.num_tiles) step(std::integral_constant<int, 0>{}, t + 1);
    }
    if (tid == 128) timeline_stamp(index, kLastStep);
    const int last = it.num_tiles - 1;
    const int g_last = tile_base + last;
    acquire(v_full(g_last), g_last);
    pin_operands();
    take_turn();
    // A constant index into pv in each branch: a computed one would put pv in local memory.
    auto issue_last_values = [&](const uint32_t (&probs)[Tile::kPSteps][4]) {
      wgmma::fence();
      issue_values(probs, v_tiles + uint32_t(g_last % kStages) * Tile::kKVBytes);
      wgmma::commit();
    };
    if (last % 2 == 0) {
      issue_last_values(pv[0]);
    } else {
      issue_last_values(pv[1]);
    }
    pass_turn();
    wgmma::wait<0>();
    pin_operands();
    release(v_empty(g_last));

    // Epilogue: normalise O into the consumer's own rows of the item's Q buffer (its last
    // Q K^T is done; the other consumer reads only its rows), in Q's swizzled layout, then out.
    // Once both consumers' rows have left, the buffer is free for the item after next's Q.
    unsigned char* const staging = shared + q_offset;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float total = row_sum[r];
      total += gpu::shfl_xor(total, 1);
      total += gpu::shfl_xor(total, 2);
      const float inv_sum = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        const uint32_t offset = uint32_t(j / 8) * Tile::kQHalfBytes +
                                wgmma::swizzled(rows[r], j % 8) + uint32_t(lane % 4) * 4;
        *reinterpret_cast<uint32_t*>(staging + offset) =
            pack2<T>(o[4 * j + 2 * r] * inv_sum, o[4 * j + 2 * r + 1] * inv_sum);
      }
    }
    const bool whole_tile = it.positions_valid == positions;
    if (out_copy == OutCopy::kPerConsumer && whole_tile) {
      // Each consumer's 64 rows leave as two tensor copies of their own: it goes on to its next
      // item without waiting for the other consumer, which runs half a step behind.
      wgmma::fence_shared_for_async_reads();
      warpgroup_barrier();
      if (tid % 128 == 0) {
        for (int half_index = 0; half_index < 2; ++half_index) {
          wgmma::tensor_store_3d(out_map, half_index * 64, it.kv_head * group,
                                 it.q_begin + it.m0 + consumer * (positions / 2),
                                 q_rows + uint32_t(half_index) * Tile::kQHalfBytes);
        }
        wgmma::bulk_stores_read_shared();
        wgmma::barrier_arrive(q_empty(n));
      }
    } else if (out_copy == OutCopy::kWholeTile && whole_tile) {
      // A group that does not divide 64 splits a position's rows between the consumers: the
      // tile leaves as two tensor copies issued once both consumers have staged their rows.
      wgmma::fence_shared_for_async_reads();
      wgmma::named_barrier(6, 256);
      if (tid == 128) {
        for (int half_index = 0; half_index < 2; ++half_index) {
          wgmma::tensor_store_3d(out_map, half_index * 64, it.kv_head * group, it.q_begin + it.m0,
                                 q_tiles + q_offset + uint32_t(half_index) * Tile::kQHalfBytes);
        }
        wgmma::bulk_stores_read_shared();
      }
      if (tid % 128 == 0) wgmma::barrier_arrive(q_empty(n));
    } else {
      // A partial tile's box would overwrite the next request's rows: each consumer stores its
      // own valid rows, 16-byte chunks, a warp writing two whole 256-byte rows at once.
      warpgroup_barrier();
      constexpr int kRowChunks = kHeadDim / 8;  // 16-byte chunks of a row
      const int consumer_thread = tid % 128;
#pragma unroll
      for (int c = consumer_thread; c < 64 * kRowChunks; c += 128) {
        const int row = consumer * 64 + c / kRowChunks;
        const int chunk = c % kRowChunks;
        if (row < it.rows_valid) {
          const uint32_t offset =
              uint32_t(chunk / 8) * Tile::kQHalfBytes + wgmma::swizzled(row, chunk % 8);
          T* out_row = out + int64_t{it.q_begin + it.m0 + row / group} * out_stride +
                       (it.kv_head * group + row % group) * kHeadDim;
          *reinterpret_cast<uint4*>(out_row + chunk * 8) =
              *reinterpret_cast<const uint4*>(staging + offset);
        }
      }
      warpgroup_barrier();
      if (consumer_thread == 0) wgmma::barrier_arrive(q_empty(n));
    }
    if (tid == 128) {
      timeline_stamp(index, kDone);
      timeline_time(index, kDoneTime);
      timeline_where(index, it.num_tiles);
    }
    tile_base += it.num_tiles;
  }
  // Consumer 1 passed the turn after its last issue too; that arrival is taken here, so no
  // barrier is left part-way at exit.
  if (consumer == 0) take_turn();
#else
  (void)p;
  (void)raw_shared;
#endif
}

template <typename T, int Variant>
__global__ void __launch_bounds__(HopperTile::kThreads, 1)
    paged_attention_prefill_sm90_kernel(const AttentionParams params,
                                        const __grid_constant__ CUtensorMap cache_map,
                                        const __grid_constant__ CUtensorMap q_map,
                                        const __grid_constant__ CUtensorMap out_map,
                                        const int tensor_copies, const int q_tensor_copy,
                                        const OutCopy out_copy, int* const scheduler) {
  extern __shared__ __align__(16) unsigned char prefill_sm90_shared[];
  prefill_sm90_body<T, Variant>(params, &cache_map, tensor_copies != 0, &q_map, q_tensor_copy != 0,
                                &out_map, out_copy, scheduler, prefill_sm90_shared);
}

// ---- the host launcher ------------------------------------------------------------------------

void check_launch(const char* op) {
  gpu::Error error = gpu::get_last_error();
  if (error != gpu::kSuccess) {
    throw BackendError(std::string(op) + " launch failed: " + gpu::error_string(error));
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

template <typename T, int HeadDim>
void launch(const AttentionParams& p, gpu::Stream stream) {
  using Tile = PrefillTile<HeadDim>;
  const auto kernel = paged_attention_prefill_kernel<T, HeadDim>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in; a cheap attribute set, kept per
  // launch so it holds on whichever device is current.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           int(Tile::kSharedBytes)) != cudaSuccess) {
    throw BackendError("paged_attention_prefill: cannot reserve " + str(Tile::kSharedBytes) +
                       " bytes of shared memory for head_dim " + str(HeadDim) + ": " +
                       gpu::error_string(gpu::get_last_error()));
  }
  const dim3 grid((p.max_query_len + Tile::kBlockM - 1) / Tile::kBlockM, p.num_heads,
                  p.num_requests);
  kernel<<<grid, Tile::kThreads, Tile::kSharedBytes, stream>>>(p);
  check_launch("paged_attention_prefill");
}

/// The driver's tensor-map encoder, looked up once through the runtime (no libcuda link);
/// nullptr when the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      gpu::get_last_error();
      function = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encoder;
}

/// The layer cache as a 5-D tensor [blocks][K|V][kv heads][block slots][head dim] (innermost last
/// here, first in the map) whose box is one block's slots x 64 columns, 128B-swizzled as wgmma.h
/// lays tiles out. False when the driver cannot make one (the kernel then gathers every tile).
bool make_cache_map(const AttentionParams& p, CUtensorMap* map) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t element = 2;
  const cuuint64_t dims[5] = {cuuint64_t(p.head_dim), cuuint64_t(p.block_size),
                              cuuint64_t(p.num_kv_heads), 2,
                              cuuint64_t(std::numeric_limits<int32_t>::max())};
  const cuuint64_t row = p.head_dim * element;
  const cuuint64_t strides[4] = {row, row * p.block_size, row * p.block_size * p.num_kv_heads,
                                 2 * row * p.block_size * p.num_kv_heads};
  const cuuint32_t box[5] = {64, cuuint32_t(p.block_size), 1, 1, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUtensorMapDataType type = p.cache_dtype == DType::kBFloat16
                                       ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 5, const_cast<void*>(p.layer_cache), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/// q or out (`rows`, row_stride elements apart) as a 3-D tensor [tokens][heads][head dim] whose
/// box is `positions` positions x a KV head's group of query heads x 64 columns, 128B-swizzled:
/// the wgmma kernel's packed 128-row tile (or one consumer's 64 rows), one half per copy. False
/// when the driver cannot make one or the layout does not allow it (the kernel then moves those
/// rows with its threads).
bool make_rows_map(const AttentionParams& p, const void* rows, int64_t row_stride, int group,
                   int positions, CUtensorMap* map) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  const cuuint64_t element = 2;
  if (encode == nullptr || !aligned16(rows) || (row_stride * element) % 16 != 0 ||
      p.num_tokens < positions) {
    return false;
  }
  const cuuint64_t dims[3] = {cuuint64_t(p.head_dim), cuuint64_t(p.num_heads),
                              cuuint64_t(p.num_tokens)};
  const cuuint64_t strides[2] = {p.head_dim * element, cuuint64_t(row_stride) * element};
  const cuuint32_t box[3] = {64, cuuint32_t(group), cuuint32_t(positions)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type = p.act_dtype == DType::kBFloat16
                                       ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 3, const_cast<void*>(rows), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/// Two zeroed ints in device memory for one launch of the wgmma kernel: its item counter and its
/// count of finished CTAs (the kernel leaves them zero).
int* scheduler_counters(gpu::Stream stream) {
  static DeviceCounters counters("paged_attention_prefill", 2, 64);
  int* pair = counters.next(stream);
  if (pair == nullptr) {
    throw BackendError(
        "paged_attention_prefill: the wgmma kernel's first launch on a device cannot be "
        "captured into a CUDA graph (it allocates its scheduling counters); run it once "
        "before capturing");
  }
  return pair;
}

template <typename T, int Variant>
void launch_sm90(const AttentionParams& p, gpu::Stream stream) {
  const auto kernel = paged_attention_prefill_sm90_kernel<T, Variant>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           int(HopperTile::kSharedBytes)) != cudaSuccess) {
    throw BackendError("paged_attention_prefill: cannot reserve " + str(HopperTile::kSharedBytes) +
                       " bytes of shared memory for the wgmma kernel: " +
                       gpu::error_string(gpu::get_last_error()));
  }
  const int group = p.num_heads / p.num_kv_heads;
  const int positions = HopperTile::kBlockM / group;
  // One persistent CTA per SM (one fits) or per item, whichever is fewer.
  const int64_t items = (int64_t{p.max_query_len} + positions - 1) / positions * p.num_kv_heads *
                        p.num_requests;
  if (items > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument("paged_attention_prefill: " + str(items) +
                          " work items (query blocks x KV heads x requests); the wgmma kernel "
                          "counts them in 32 bits");
  }
  const dim3 grid(unsigned(std::min<int64_t>(items, current_sm_count())));
  CUtensorMap cache_map{};
  const bool tensor_copies = make_cache_map(p, &cache_map);
  CUtensorMap q_map{};
  const bool q_tensor_copy = make_rows_map(p, p.q, p.q_stride, group, positions, &q_map);
  // O leaves per consumer (64 rows: positions / 2 positions) where the group divides 64.
  const bool per_consumer = HopperTile::kBlockM / 2 % group == 0;
  CUtensorMap out_map{};
  const OutCopy out_copy =
      !make_rows_map(p, p.out, int64_t{p.num_heads} * p.head_dim, group,
                     per_consumer ? positions / 2 : positions, &out_map)
          ? OutCopy::kThreads
          : per_consumer ? OutCopy::kPerConsumer : OutCopy::kWholeTile;
  kernel<<<grid, HopperTile::kThreads, HopperTile::kSharedBytes, stream>>>(
      p, cache_map, q_map, out_map, tensor_copies ? 1 : 0, q_tensor_copy ? 1 : 0,
      out_copy, scheduler_counters(stream));
  check_launch("paged_attention_prefill (wgmma)");
}

/// The wgmma kernel takes head dim 128 on a compute-capability 9.0 device of a build with sm_90a
/// code, for batches with a chunk longer than one mma.sync tile (64 rows): at or below that its
/// 128-row tiles would be mostly padding. Its gather needs a power-of-two block size of at most
/// 128 (every cache block size in use).
bool takes_wgmma_kernel(const AttentionParams& p) {
#if defined(OCTAVO_CUDA_SM90A)
  return p.head_dim == HopperTile::kHeadDim && p.max_query_len > PrefillTile<128>::kBlockM &&
         p.num_kv_heads > 0 && p.num_heads / p.num_kv_heads <= HopperTile::kBlockM &&
         p.block_size > 0 && (p.block_size & (p.block_size - 1)) == 0 &&
         p.block_size <= HopperTile::kBlockN && current_device_is_sm90();
#else
  (void)p;
  return false;
#endif
}

/// The one dispatch table: dtype x head dim. Head dims outside the list are rejected; each extra
/// one costs two instances (bf16, fp16) of compile time per architecture.
template <typename T>
void dispatch_head_dim(const AttentionParams& p, gpu::Stream stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, stream);
    case 80: return launch<T, 80>(p, stream);
    case 96: return launch<T, 96>(p, stream);
    case 128:
      if (!takes_wgmma_kernel(p)) return launch<T, 128>(p, stream);
      if (p.softcap > 0.0f) return launch_sm90<T, kPrefillSoftcap>(p, stream);
      if (p.alibi_slopes != nullptr || !(p.scale > 0.0f)) {
        return launch_sm90<T, kPrefillScaled>(p, stream);
      }
      return launch_sm90<T, kPrefillFold>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default:
      throw InvalidArgument("paged_attention_prefill: head_dim " + str(p.head_dim) +
                            " is not compiled; supported: 64, 80, 96, 128, 256");
  }
}

void validate(const AttentionParams& p) {
  const char* op = "paged_attention_prefill";
  if (p.act_dtype != DType::kBFloat16 && p.act_dtype != DType::kFloat16) {
    throw InvalidArgument(std::string(op) + ": activations must be bf16 or fp16 on the GPU");
  }
  if (p.cache_dtype != p.act_dtype) {
    throw InvalidArgument(std::string(op) +
                          ": the KV cache dtype must equal the activation dtype (bf16 or fp16)");
  }
  if (p.num_requests < 0 || p.num_tokens < 0 || p.max_query_len < 0) {
    throw InvalidArgument(std::string(op) + ": num_requests (" + str(p.num_requests) +
                          "), num_tokens (" + str(p.num_tokens) + ") and max_query_len (" +
                          str(p.max_query_len) + ") must be >= 0");
  }
  if (p.num_heads <= 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    throw InvalidArgument(std::string(op) + ": num_heads (" + str(p.num_heads) +
                          ") must be a positive multiple of num_kv_heads (" +
                          str(p.num_kv_heads) + ")");
  }
  if (p.block_size <= 0 || p.max_blocks_per_request <= 0) {
    throw InvalidArgument(std::string(op) + ": block_size (" + str(p.block_size) +
                          ") and max_blocks_per_request (" + str(p.max_blocks_per_request) +
                          ") must be positive");
  }
  if (p.q_stride < int64_t{p.num_heads} * p.head_dim || p.q_stride % 8 != 0) {
    throw InvalidArgument(std::string(op) + ": q_stride " + str(p.q_stride) +
                          " must be >= num_heads * head_dim (" +
                          str(int64_t{p.num_heads} * p.head_dim) +
                          ") and a multiple of 8 elements (16-byte rows)");
  }
  if (p.sliding_window < 0 || p.softcap < 0.0f) {
    throw InvalidArgument(std::string(op) + ": sliding_window (" + str(p.sliding_window) +
                          ") and softcap must be >= 0 (0 = off)");
  }
  if (!aligned16(p.q) || !aligned16(p.layer_cache) || !aligned16(p.out)) {
    throw InvalidArgument(std::string(op) + ": q, layer_cache and out must be 16-byte aligned");
  }
  if (p.query_start == nullptr || p.context_lens == nullptr || p.block_tables == nullptr) {
    throw InvalidArgument(std::string(op) + ": query_start, context_lens and block_tables are required");
  }
  if (p.num_heads > 65535 || p.num_requests > 65535) {
    throw InvalidArgument(std::string(op) + ": " + str(p.num_heads) + " heads and " +
                          str(p.num_requests) + " requests; the grid allows at most 65,535 of each");
  }
}

}  // namespace

void paged_attention_prefill(const AttentionParams& params, StreamHandle stream) {
  validate(params);
  if (params.num_requests == 0 || params.max_query_len == 0) return;
  const auto gpu_stream = static_cast<gpu::Stream>(stream);
  if (params.act_dtype == DType::kBFloat16) {
    dispatch_head_dim<gpu::bf16>(params, gpu_stream);
  } else {
    dispatch_head_dim<gpu::fp16>(params, gpu_stream);
  }
}

const char* prefill_kernel_name(const AttentionParams& params) {
  return takes_wgmma_kernel(params) ? "wgmma" : "mma.sync";
}

bool splits_decode_prefix(const AttentionParams& p) {
  return p.max_query_len > 1 && p.num_decode_prefix >= kMinDecodePrefix &&
         p.num_decode_prefix < p.num_requests;
}

DecodePrefixSplit split_decode_prefix(const AttentionParams& p) {
  const int32_t n = p.num_decode_prefix;
  DecodePrefixSplit split{p, p};
  split.decode.num_requests = split.decode.num_tokens = n;
  split.decode.max_query_len = 1;
  split.decode.num_decode_prefix = 0;
  // The rest keep their absolute query rows (query_start's values), so num_tokens stays q's row
  // count (the wgmma kernel's Q tensor map spans it); only the per-request arrays move past the
  // prefix.
  AttentionParams& rest = split.prefill;
  rest.query_start += n;
  rest.context_lens += n;
  rest.block_tables += int64_t{n} * p.max_blocks_per_request;
  rest.num_requests -= n;
  rest.request_order = nullptr;
  rest.num_decode_prefix = 0;
  return split;
}

}  // namespace octavo::cuda
