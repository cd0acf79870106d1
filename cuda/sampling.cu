// Sampling on the GPU (SampleParams in backend/ops.h; the oracle is cpu/sample.cc).
//
// Work decomposition: one thread block of kThreads threads per row; the row's fp32 logits stay in
// global memory (a 152k vocabulary is 600 KB) and the block streams over them with 16-byte loads.
// The final soft-cap is applied on the fly in every pass (the logits are never written), and the
// temperature-scaled value s = x / T is recomputed the same way each pass, so every pass sees
// bit-identical values.
//
// A draw is the kept token with the largest s + gumbel_noise(draw_key(seed, draw), id)
// (backend/sampling_rng.h), ties to the lower id, exactly as cpu/sample.cc draws: the Gumbel-max
// trick needs no order over the kept tokens, only the set. The filters (top-k, top-p, min-p) keep
// a prefix of one order, scaled value descending, ties to the lower id; a token's 64-bit key
// (ordered float bits of s, then the inverted id) sorts exactly that way. Probabilities are
// fixed-point integers, weight(s) = floor(exp(s - s_max) * 2^40) (the top token weighs 2^40;
// tokens below 2^-40 of the top weigh 0), so the sums top-p needs are exact and order-independent.
//
// Passes per row:
//   1. stats: max, argmax (ties to the lower id) and sum exp(x - max) -> the raw log-softmax
//      normaliser (reported logprobs are raw: after soft-capping, before temperature/filters);
//      for a row without filters, the draw too. A greedy or unfiltered row without a top-N report
//      is done after this one read.
//   2. level-0 histogram of d = s_max - s in kBins bins of 1/16 nat (the last bin holds d >= 64
//      nats and -inf): per bin a token count and the summed weights, then prefix sums.
//   3. gather: from the histogram the plan knows which bins hold every boundary it needs (the
//      num_top-th token, the top-k boundary, the top-p boundary, the min-p threshold); if bins
//      [0, B] hold at most kCapacity tokens, they are gathered into shared memory, sorted by key
//      (bitonic) and prefix-summed, and every query below is answered there, the draw among them.
//      That is the usual case (peaked LLM logits, top-k of a few hundred at most).
//   Otherwise (flat rows, huge top-k, very high temperatures) each query that the window does not
//   cover descends on its own: the boundary's level-0 bin, then (if that bin is still too big)
//   a min/max pass and radix passes of kSubBins sub-ranges over the 64-bit keys (unique, so this
//   ends), then a gather of the small range; the draw then reads the row once more. Slow (a few
//   more passes per query) but exact.
// Queries, in the CPU's order: top-k = the first k; top-p = the first position whose cumulative
// weight reaches ceil(top_p * W_k); min-p = the tokens with s >= the smallest float s whose
// exp(s - s_max) in double reaches min_p. The kept set is the order's prefix through the last
// query's boundary. Only the weight rounding (fp32 exp, 2^-40 fixed point against the CPU's
// double) can move a top-p boundary that lands within ~1e-7 of a token, and logf's last bit a
// draw whose two best noisy values tie to an ulp. Greedy (temperature < 1e-5) and top_k = 1 pick
// exactly the CPU's token.
//
// Speed: one read of the row for greedy and unfiltered draws, three for filtered ones in the
// usual case; pass 1 is compute-bound on flat rows (see init_race). A row's passes run on one
// SM, so a small batch would be latency-bound: batches of up to kMaxSplitRows rows run passes 1
// and 2 over vocabulary slices on many blocks.
// A row whose logits hold a NaN, +inf or no finite value, or whose settings are out of range
// (the CPU throws on both), gets sampled = -1 and NaN logprobs: a kernel cannot throw.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include <octavo/error.h>

#include "backend/sampling_rng.h"
#include "compat.h"
#include "cuda_ops.h"

namespace octavo::cuda {
namespace {

using u64 = unsigned long long;  // the type shared-memory atomicAdd takes

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / gpu::kWarpSize;
constexpr int kBins = 1024;               // level-0 bins of d = s_max - s ...
constexpr float kBinsPerNat = 16.0f;      // ... each 1/16 nat wide ...
constexpr float kBinSpan = 64.0f;         // ... covering d < 64; bin kBins holds the rest
constexpr int kTailBin = kBins;
constexpr int kSubBits = 10;              // radix refinement: 2^10 sub-ranges per pass
constexpr int kSubBins = 1 << kSubBits;
constexpr int kCapacity = 2048;           // keys gathered into shared memory (a power of two)
constexpr int kMaxTop = 64;
constexpr int kMaxVocab = 1 << 23;        // keeps the fixed-point weight sum below 2^63
constexpr float kGreedyTemperature = 1e-5f;  // vLLM's _SAMPLING_EPS, as cpu/sample.cc
constexpr float kWeightScale = 0x1p40f;
constexpr float kWeightSpan = 28.0f;      // exp(-28) * 2^40 < 1: the weight is 0 beyond
constexpr int kNoiseBucketBits = 10;       // pass 1's noise bounds: buckets of the token hash
constexpr int kNoiseBuckets = 1 << kNoiseBucketBits;
constexpr float kNoiseBoundSlack = 1e-3f;  // covers logf's last-bit wobble (~1e-6) many times
// Normaliser terms summed in fp32 before they join the double sum (positive terms: 16 keep its
// relative error under 1e-6), without a conversion and a double add per token; a term is at most
// exp(kRescaleSlack), so the fp32 sum cannot overflow.
constexpr int kPendingTerms = 16;
constexpr float kRescaleSlack = 8.0f;

static_assert(kThreads % gpu::kWarpSize == 0, "whole warps");
static_assert((kCapacity & (kCapacity - 1)) == 0, "bitonic sort needs a power of two");
static_assert(kBinSpan * kBinsPerNat == float(kBins), "bins cover the span");

// ---- keys ------------------------------------------------------------------------------------

// Float bits mapped so unsigned order is float order; -0 counts as +0 (they compare equal).
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ordered(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
// Descending key order = value descending, ties to the lower id. Every real key is > 0.
__device__ __forceinline__ u64 make_key(float value, int32_t id) {
  return (u64(ordered_bits(value)) << 32) | u64(0xffffffffu - uint32_t(id));
}
__device__ __forceinline__ int32_t key_id(u64 key) { return int32_t(0xffffffffu - uint32_t(key)); }
__device__ __forceinline__ float key_value(u64 key) { return from_ordered(uint32_t(key >> 32)); }

// ---- one row ---------------------------------------------------------------------------------

// Everything a pass computes per token, in one place so that every pass gets identical values.
struct RowCtx {
  const float* logits;  // this row (or, in a split pass, its slice)
  int32_t vocab;        // tokens in logits
  int32_t first_id;     // id of logits[0]: 0, or the slice's start
  float cap;            // final soft-cap, 0: none
  float temperature;    // 1 for greedy rows
  bool unit;            // temperature == 1: scaled == raw
  float s_max;          // the largest scaled value

  __device__ __forceinline__ float raw(float v) const {
    return cap > 0.0f ? cap * tanhf(v / cap) : v;
  }
  __device__ __forceinline__ float scaled(float x) const { return unit ? x : x / temperature; }
  // Level-0 bin: non-increasing in s, so each bin is a contiguous run of the order.
  __device__ __forceinline__ int bin(float s) const {
    const float d = s_max - s;
    return d < kBinSpan ? int(d * kBinsPerNat) : kTailBin;
  }
  __device__ __forceinline__ u64 weight(float s) const {
    const float d = s_max - s;
    return d < kWeightSpan ? u64(expf(-d) * kWeightScale) : 0ull;
  }
};

// Calls f(id, raw value) for every token of the row; each thread reads 16-byte vectors, four in
// flight. The row start may be misaligned by whole floats (odd vocabularies): a scalar head and
// tail cover the rest.
template <typename F>
__device__ __forceinline__ void for_each_logit(const RowCtx& c, F&& f) {
  const float* row = c.logits;
  const int tid = threadIdx.x;
  const int misalign = int((reinterpret_cast<uintptr_t>(row) >> 2) & 3);
  const int head = min((4 - misalign) & 3, c.vocab);
  const int32_t id0 = c.first_id;
  if (tid < head) f(id0 + tid, c.raw(row[tid]));
  const int num_vec = (c.vocab - head) >> 2;
  const float4* vec = reinterpret_cast<const float4*>(row + head);
  auto visit = [&](const float4& q, int base) {
    f(id0 + base, c.raw(q.x));
    f(id0 + base + 1, c.raw(q.y));
    f(id0 + base + 2, c.raw(q.z));
    f(id0 + base + 3, c.raw(q.w));
  };
  int j = tid;
  for (; j + 3 * kThreads < num_vec; j += 4 * kThreads) {
    float4 q[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) q[u] = __ldg(vec + j + u * kThreads);
#pragma unroll
    for (int u = 0; u < 4; ++u) visit(q[u], head + 4 * (j + u * kThreads));
  }
  for (; j < num_vec; j += kThreads) visit(__ldg(vec + j), head + 4 * j);
  for (int i = head + 4 * num_vec + tid; i < c.vocab; i += kThreads) f(id0 + i, c.raw(row[i]));
}

// ---- shared memory ---------------------------------------------------------------------------

struct Shared {
  // Level-0 histogram; after the scan, inclusive prefix sums over bins in order.
  uint32_t count[kBins + 1];
  u64 weight[kBins + 1];
  union {
    struct {                   // the gathered window: keys sorted descending, prefix weights
      u64 keys[kCapacity];
      u64 cumw[kCapacity];
    } win;
    struct {                   // a refinement histogram (overwrites the window)
      uint32_t count[kSubBins];
      u64 weight[kSubBins];
    } sub;
    float noise_bound[kNoiseBuckets];  // pass 1's draw (init_race), before any window
  };
  u64 scratch[kWarps];
  uint32_t gathered;
  uint32_t race_floor;  // pass 1's draw: the best noisy value the block has found (ordered bits)
};
// Static shared memory stays under the 48 KB that needs no opt-in.
static_assert(sizeof(Shared) <= 48 * 1024, "sampling shared memory");

// ---- block-wide helpers ----------------------------------------------------------------------

// Reduces over the block; every thread gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, u64* scratch_raw) {
  T* scratch = reinterpret_cast<T*>(scratch_raw);
#pragma unroll
  for (int off = gpu::kWarpSize / 2; off > 0; off >>= 1) v = op(v, gpu::shfl_xor(v, off));
  __syncthreads();  // the previous user of scratch is done
  if (threadIdx.x % gpu::kWarpSize == 0) scratch[threadIdx.x / gpu::kWarpSize] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  return r;
}
template <typename T>
__device__ __forceinline__ T block_sum(T v, u64* scratch) {
  return block_reduce(v, [](T a, T b) { return a + b; }, scratch);
}
__device__ __forceinline__ u64 block_max(u64 v, u64* scratch) {
  return block_reduce(v, [](u64 a, u64 b) { return a > b ? a : b; }, scratch);
}
__device__ __forceinline__ u64 block_min(u64 v, u64* scratch) {
  return block_reduce(v, [](u64 a, u64 b) { return a < b ? a : b; }, scratch);
}

// Exclusive prefix sum over the threads, in thread order.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, u64* scratch_raw) {
  T* scratch = reinterpret_cast<T*>(scratch_raw);
  const int lane = threadIdx.x % gpu::kWarpSize;
  const int warp = threadIdx.x / gpu::kWarpSize;
  T inclusive = v;
#pragma unroll
  for (int off = 1; off < gpu::kWarpSize; off <<= 1) {
    const T other = gpu::shfl(inclusive, lane >= off ? lane - off : lane);
    if (lane >= off) inclusive += other;
  }
  __syncthreads();
  if (lane == gpu::kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  T offset = 0;
  for (int w = 0; w < warp; ++w) offset += scratch[w];
  return offset + inclusive - v;
}

// In-place inclusive prefix sum of a[0, n) in shared memory (written and synced by the caller).
template <typename T>
__device__ void scan_inclusive(T* a, int n, u64* scratch) {
  const int per = (n + kThreads - 1) / kThreads;
  const int begin = min(int(threadIdx.x) * per, n);
  const int end = min(begin + per, n);
  T sum = 0;
  for (int i = begin; i < end; ++i) sum += a[i];
  T run = block_exclusive_scan(sum, scratch);
  for (int i = begin; i < end; ++i) {
    run += a[i];
    a[i] = run;
  }
  __syncthreads();
}

// The smallest i in [0, n) with a[i] >= target; a is non-decreasing and a[n - 1] >= target.
// Every thread runs it on the same shared data, so the result is uniform.
template <typename T>
__device__ __forceinline__ int first_at_least(const T* a, int n, T target) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] >= target) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Sorts keys[0, n) descending (bitonic over the next power of two, padded with 0 < every key).
__device__ void sort_descending(u64* keys, int n) {
  int size = 1;
  while (size < n) size <<= 1;
  for (int i = n + int(threadIdx.x); i < size; i += kThreads) keys[i] = 0;
  __syncthreads();
  for (int k = 2; k <= size; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < size / 2; t += kThreads) {
        const int lo = 2 * t - (t & (j - 1));
        const int hi = lo + j;
        const bool descending = (lo & k) == 0;
        const u64 a = keys[lo], b = keys[hi];
        if ((a < b) == descending) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// ---- the window: a sorted run of the order in shared memory ------------------------------------

// Tokens whose level-0 bin is in [bin_lo, bin_hi]; in bin_hi only keys >= key_lo, in bin_lo only
// keys <= key_hi. Whole bins [0, B] are {0, B, 0, max}.
struct WindowSpec {
  int bin_lo, bin_hi;
  u64 key_lo, key_hi;
  __device__ __forceinline__ bool contains(int b, u64 key) const {
    return b >= bin_lo && b <= bin_hi && (b != bin_hi || key >= key_lo) &&
           (b != bin_lo || key <= key_hi);
  }
};

// Uniform across the block (every thread computes the same values).
struct Window {
  bool valid = false;
  bool raw = false;          // keys of raw values (top-N order) rather than scaled ones
  int n = 0;
  int prefix_bins = -1;      // >= 0: the window is exactly bins [0, prefix_bins]
  uint32_t above_count = 0;  // tokens before the window in the order
  u64 above_weight = 0;      // and their weight
};

// Gathers the window's tokens, sorts them and (for scaled windows) prefix-sums their weights.
__device__ __noinline__ Window build_window(Shared& sh, const RowCtx& c, const WindowSpec& spec, bool raw,
                               bool with_weights, uint32_t above_count, u64 above_weight) {
  if (threadIdx.x == 0) sh.gathered = 0;
  __syncthreads();
  for_each_logit(c, [&](int i, float x) {
    const float s = c.scaled(x);
    const int b = c.bin(s);
    if (b < spec.bin_lo || b > spec.bin_hi) return;
    const u64 key = raw ? make_key(x, i) : make_key(s, i);
    if (!spec.contains(b, key)) return;
    const uint32_t slot = atomicAdd(&sh.gathered, 1u);
    if (slot < kCapacity) sh.win.keys[slot] = key;  // never false: the plan counted them
  });
  __syncthreads();
  Window w;
  w.valid = true;
  w.raw = raw;
  w.n = int(min(sh.gathered, uint32_t(kCapacity)));
  w.above_count = above_count;
  w.above_weight = above_weight;
  sort_descending(sh.win.keys, w.n);
  if (with_weights && !raw) {
    for (int i = threadIdx.x; i < w.n; i += kThreads) {
      sh.win.cumw[i] = c.weight(key_value(sh.win.keys[i]));
    }
    __syncthreads();
    scan_inclusive(sh.win.cumw, w.n, sh.scratch);
  }
  return w;
}

// Where a query's boundary lies in the order: a count target (the L-th token) or a weight target
// (the first token whose cumulative weight reaches T).
struct Target {
  bool by_weight;
  u64 value;
};

// Builds a window holding `target`'s boundary, starting from the level-0 histogram and refining
// with radix passes over the keys until the range fits. With `from_top`, the window is the whole
// prefix of the order up to and including the range (for the top-N report); otherwise only the
// range, with the totals above it.
__device__ __noinline__ Window descend(Shared& sh, const RowCtx& c, Target target, bool raw, bool from_top) {
  const int b = target.by_weight
                    ? first_at_least(sh.weight, kBins + 1, target.value)
                    : first_at_least(sh.count, kBins + 1, uint32_t(target.value));
  uint32_t above_count = b > 0 ? sh.count[b - 1] : 0u;
  u64 above_weight = b > 0 ? sh.weight[b - 1] : 0ull;
  uint32_t n = sh.count[b] - above_count;
  u64 key_lo = 0, key_hi = ~0ull;
  auto fits = [&] { return (from_top ? above_count + n : n) <= uint32_t(kCapacity); };
  auto key_of = [&](int i, float x, float s) { return raw ? make_key(x, i) : make_key(s, i); };

  if (!fits()) {
    // The bin's key range, so that each radix pass splits a tight range.
    u64 lo = ~0ull, hi = 0;
    for_each_logit(c, [&](int i, float x) {
      const float s = c.scaled(x);
      if (c.bin(s) != b) return;
      const u64 key = key_of(i, x, s);
      lo = key < lo ? key : lo;
      hi = key > hi ? key : hi;
    });
    key_lo = block_min(lo, sh.scratch);
    key_hi = block_max(hi, sh.scratch);
  }
  while (!fits()) {
    const u64 width = key_hi - key_lo;
    const int bits = 64 - __clzll(static_cast<long long>(width));
    const int shift = bits > kSubBits ? bits - kSubBits : 0;
    const int num_sub = int(width >> shift) + 1;
    __syncthreads();  // everyone is done reading the previous histogram or window
    for (int i = threadIdx.x; i < num_sub; i += kThreads) {
      sh.sub.count[i] = 0;
      sh.sub.weight[i] = 0;
    }
    __syncthreads();
    for_each_logit(c, [&](int i, float x) {
      const float s = c.scaled(x);
      if (c.bin(s) != b) return;
      const u64 key = key_of(i, x, s);
      if (key < key_lo || key > key_hi) return;
      const int j = int((key_hi - key) >> shift);
      atomicAdd(&sh.sub.count[j], 1u);
      if (!raw) {  // a scaled window reports weights even for a count target (top-k)
        const u64 w = c.weight(s);
        if (w) atomicAdd(&sh.sub.weight[j], w);
      }
    });
    __syncthreads();
    scan_inclusive(sh.sub.count, num_sub, sh.scratch);
    if (!raw) scan_inclusive(sh.sub.weight, num_sub, sh.scratch);
    const int j = target.by_weight
                      ? first_at_least(sh.sub.weight, num_sub, target.value - above_weight)
                      : first_at_least(sh.sub.count, num_sub,
                                       uint32_t(target.value) - above_count);
    const uint32_t before = j > 0 ? sh.sub.count[j - 1] : 0u;
    n = sh.sub.count[j] - before;
    above_count += before;
    if (!raw && j > 0) above_weight += sh.sub.weight[j - 1];
    const u64 hi_off = u64(j) << shift;
    const u64 lo_off = hi_off + ((1ull << shift) - 1);
    const u64 new_hi = key_hi - hi_off;
    key_lo = lo_off >= width ? key_lo : key_hi - lo_off;
    key_hi = new_hi;
  }
  __syncthreads();  // the sub histogram shares memory with the window
  // From the top: every bin before b, and in b every key >= key_lo (those above key_hi too).
  const WindowSpec spec{from_top ? 0 : b, b, key_lo, from_top ? ~0ull : key_hi};
  return build_window(sh, c, spec, raw, !raw, from_top ? 0u : above_count,
                      from_top ? 0ull : above_weight);
}

// The result of a query: the boundary token's key, the prefix length through it and its weight.
struct Boundary {
  u64 key;
  uint32_t length;
  u64 weight;
};

__device__ __forceinline__ bool covers(const Window& w, const RowCtx& c, Target t,
                                       const Shared& sh) {
  if (!w.valid || w.n == 0 || (w.raw && !c.unit)) return false;
  if (t.by_weight) {
    return w.above_weight < t.value && t.value <= w.above_weight + sh.win.cumw[w.n - 1];
  }
  return w.above_count < t.value && t.value <= w.above_count + uint32_t(w.n);
}

// Answers a scaled-order query, descending first if the current window does not hold it.
__device__ Boundary query(Shared& sh, const RowCtx& c, Window& w, Target t) {
  if (!covers(w, c, t, sh)) w = descend(sh, c, t, false, false);
  const int index = t.by_weight
                        ? first_at_least(sh.win.cumw, w.n, t.value - w.above_weight)
                        : int(t.value - w.above_count) - 1;
  return {sh.win.keys[index], w.above_count + uint32_t(index) + 1,
          w.above_weight + sh.win.cumw[index]};
}

// Length and weight of the prefix of tokens with scaled value >= value.
__device__ __noinline__ Boundary prefix_at_value(Shared& sh, const RowCtx& c, const Window& w, float value) {
  const u64 key = u64(ordered_bits(value)) << 32;  // the lowest key of that value
  // The window holds every such token if it is whole bins reaching value's bin (a token in a
  // later bin has a smaller value), or if its last key is <= key and nothing above it counts.
  const bool covered =
      w.valid && w.n > 0 && !(w.raw && !c.unit) &&
      ((w.prefix_bins >= 0 && c.bin(value) <= w.prefix_bins) ||
       (sh.win.keys[w.n - 1] <= key && (w.above_count == 0 || key <= sh.win.keys[0])));
  if (covered) {
    // Keys are descending: count those >= key.
    int lo = 0, hi = w.n;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (sh.win.keys[mid] >= key) lo = mid + 1; else hi = mid;
    }
    return {key, w.above_count + uint32_t(lo),
            w.above_weight + (lo > 0 ? sh.win.cumw[lo - 1] : 0ull)};
  }
  uint32_t count = 0;
  u64 weight = 0;
  for_each_logit(c, [&](int i, float x) {
    const float s = c.scaled(x);
    if (make_key(s, i) >= key) {
      ++count;
      weight += c.weight(s);
    }
  });
  count = block_sum(count, sh.scratch);
  weight = block_sum(weight, sh.scratch);
  return {key, count, weight};
}

// The smallest float s with exp(double(s) - s_max) >= min_p in double, as cpu/sample.cc tests it.
__device__ float min_p_threshold(float s_max, float min_p) {
  auto kept = [&](float s) { return exp(double(s) - double(s_max)) >= double(min_p); };
  float s = float(double(s_max) + log(double(min_p)));
  for (int step = 0; step < 64 && !kept(s); ++step) s = nextafterf(s, INFINITY);
  for (int step = 0; step < 64 && kept(nextafterf(s, -INFINITY)); ++step) {
    s = nextafterf(s, -INFINITY);
  }
  return s;
}

// The draw among the kept tokens (keys >= kept.key): from the window when it holds the whole
// kept prefix, else from one more read of the row.
__device__ __noinline__ int32_t race_over_kept(Shared& sh, const RowCtx& c, const Window& w,
                                               const Boundary& kept, uint64_t draw) {
  u64 best = 0;
  if (w.valid && !(w.raw && !c.unit) && w.above_count == 0 && kept.length <= uint32_t(w.n)) {
    for (int i = threadIdx.x; i < int(kept.length); i += kThreads) {
      const u64 key = sh.win.keys[i];
      const int32_t id = key_id(key);
      const u64 noisy = make_key(key_value(key) + gumbel_noise(draw, id), id);
      best = noisy > best ? noisy : best;
    }
  } else {
    for_each_logit(c, [&](int i, float x) {
      const float s = c.scaled(x);
      if (make_key(s, i) < kept.key) return;
      const u64 noisy = make_key(s + gumbel_noise(draw, i), i);
      best = noisy > best ? noisy : best;
    });
  }
  return key_id(block_max(best, sh.scratch));
}

__device__ void write_bad_row(const SampleParams& p, int r) {
  for (int i = threadIdx.x; i < p.num_top; i += kThreads) {
    p.top_ids[int64_t(r) * p.num_top + i] = -1;
    p.top_logprobs[int64_t(r) * p.num_top + i] = NAN;
  }
  if (threadIdx.x == 0) {
    p.sampled[r] = -1;
    p.sampled_logprob[r] = NAN;
  }
}

// ---- passes 1 and 2, shared by the one-block and the split paths ----------------------------

// Pass 1 over c's tokens: the largest key, and sum exp(x - max) with its max, per block.
struct Stats {
  u64 best;       // largest key (0: none)
  u64 race;       // largest key of (s + noise, id): the draw of a row without filters (0: none)
  float max;      // the sum's reference (-inf: no finite token)
  int32_t nan;    // a NaN was seen
  double sum;     // sum of exp(x - max)
};

__device__ __forceinline__ bool valid_settings(const SamplingRow& row) {
  return row.temperature >= 0.0f && row.temperature < INFINITY && row.top_p > 0.0f &&
         row.top_p <= 1.0f && row.min_p >= 0.0f && row.min_p <= 1.0f;
}

// A row drawn in pass 1: no filter, not greedy. `on` is uniform across the block.
struct Race {
  bool on;
  float temperature;
  uint64_t key;  // draw_key(seed, draw)
};

__device__ __forceinline__ bool greedy_row(const SamplingRow& row) {
  return row.temperature < kGreedyTemperature;
}
__device__ __forceinline__ bool filtered_row(const SamplingRow& row, int vocab) {
  return (row.top_k > 0 && row.top_k < vocab) || row.top_p < 1.0f || row.min_p > 0.0f;
}
__device__ __forceinline__ Race race_of(const SamplingRow& row, int vocab) {
  return Race{!greedy_row(row) && !filtered_row(row, vocab), row.temperature,
              draw_key(row.seed, row.draw)};
}

// Pass 1's draw computes a token's Gumbel noise (two logf) only if the token could still win: if
// its scaled value plus an upper bound on the noise of its hash's bucket (the top
// kNoiseBucketBits bits; the noise is non-decreasing in the hash) reaches the best noisy value
// any thread of the block has found (sh.race_floor). The floor soon sits near the top of the
// row's noisy values, so only tokens in the last buckets pass it. A warp runs the logs if any of
// its lanes passes, hence the block's floor rather than the thread's. H100, 256 rows x 151,936
// flat logits, temperature 1: 236 us with two logf for every token (~100 instructions a
// token), 182 us with each thread's own floor, 140 us with the block's, ~2.7x the row's read.
// Skipping the hash where even the largest bound falls short of the floor (most of a trained
// model's row) made it slower on every row timed, peaked ones included (138 -> 145 us).
__device__ void init_race(float* bound, uint32_t& floor) {
  constexpr uint32_t kBucketLow = (1u << (32 - kNoiseBucketBits)) - 1;
  for (int b = threadIdx.x; b < kNoiseBuckets; b += kThreads) {
    bound[b] = hash_gumbel((uint32_t(b) << (32 - kNoiseBucketBits)) | kBucketLow) +
               kNoiseBoundSlack;
  }
  if (threadIdx.x == 0) floor = ordered_bits(-INFINITY);
  __syncthreads();
}

__device__ Stats block_stats(const RowCtx& c, const Race& race, Shared& sh) {
  if (race.on) init_race(sh.noise_bound, sh.race_floor);  // race.on is uniform across the block
  const bool unit_temperature = race.temperature == 1.0f;
  // A thread visits its tokens in increasing id order, so a strict > keeps the lower id of a tie
  // (as the keys' order does; -0 and +0 compare equal in both).
  float best_value = -INFINITY, race_value = -INFINITY;
  int32_t best_id = -1, race_id = -1;
  float floor = -INFINITY;  // a copy of sh.race_floor, refreshed when a token passes it
  const float* const noise_bound = sh.noise_bound;
  // The normaliser: sum exp(x - m_local), rescaled only when a token exceeds m_local by more than
  // kRescaleSlack (each token above the max used to branch there: in a warp, most steps).
  float m_local = -INFINITY;
  double sum_local = 0.0;
  float pending = 0.0f;  // terms not yet in sum_local
  int pending_terms = 0;
  bool nan = false;
  for_each_logit(c, [&](int i, float x) {
    nan |= isnan(x);  // the row is reported bad, whatever a NaN does below
    if (x > best_value || best_id < 0) {
      best_value = x;
      best_id = i;
    }
    if (x > m_local + kRescaleSlack) {
      sum_local = (sum_local + double(pending)) * double(expf(m_local - x)) + 1.0;
      pending = 0.0f;
      pending_terms = 0;
      m_local = x;
    } else if (x > -INFINITY) {
      // Over x - m_local in [-8, 8], where the terms that carry the sum lie, __expf is within
      // ~11 ulp (CUDA's bound); the larger relative error of smaller terms hardly moves it.
      pending += __expf(x - m_local);
      if (++pending_terms == kPendingTerms) {
        sum_local += double(pending);
        pending = 0.0f;
        pending_terms = 0;
      }
    }
    if (race.on) {
      const float s = unit_temperature ? x : x / race.temperature;  // as the CPU divides
      // Rounding is monotone: s + noise <= reach, so a token whose reach is below a noisy value
      // found cannot win.
      const uint32_t hash = token_hash(race.key, i);
      const float reach = s + noise_bound[hash >> (32 - kNoiseBucketBits)];
      if (reach >= floor) {
        floor = fmaxf(floor, from_ordered(*reinterpret_cast<volatile uint32_t*>(&sh.race_floor)));
        if (reach >= floor) {
          const float noisy = s + hash_gumbel(hash);
          if (noisy > race_value || race_id < 0) {
            race_value = noisy;
            race_id = i;
            if (noisy > floor) {
              floor = noisy;
              atomicMax(&sh.race_floor, ordered_bits(noisy));
            }
          }
        }
      }
    }
  });
  sum_local += double(pending);
  Stats s;
  s.best = block_max(best_id >= 0 ? make_key(best_value, best_id) : 0ull, sh.scratch);
  s.race = race.on ? block_max(race_id >= 0 ? make_key(race_value, race_id) : 0ull, sh.scratch)
                   : 0ull;
  s.nan = block_max(u64(nan), sh.scratch) != 0;
  s.max = s.best ? key_value(s.best) : -INFINITY;
  const bool finite = fabsf(s.max) < INFINITY;
  s.sum = block_sum(finite && m_local > -INFINITY
                        ? sum_local * exp(double(m_local) - double(s.max)) : 0.0,
                    sh.scratch);
  return s;
}

// Pass 2 over c's tokens: adds their level-0 histogram into sh.count / sh.weight (zeroed and
// synced by the caller); synced on return.
__device__ void block_histogram(const RowCtx& c, bool greedy, Shared& sh) {
  int pending_bin = -1;
  uint32_t pending_count = 0, tail = 0;
  u64 pending_weight = 0;
  auto flush = [&] {
    if (pending_bin < 0) return;
    atomicAdd(&sh.count[pending_bin], pending_count);
    if (pending_weight) atomicAdd(&sh.weight[pending_bin], pending_weight);
  };
  for_each_logit(c, [&](int, float x) {
    const float s = c.scaled(x);
    const int b = c.bin(s);
    if (b == kTailBin) {
      ++tail;
      return;
    }
    if (b != pending_bin) {  // runs of one bin (flat rows) take one atomic
      flush();
      pending_bin = b;
      pending_count = 0;
      pending_weight = 0;
    }
    ++pending_count;
    if (!greedy) pending_weight += c.weight(s);
  });
  flush();
  tail = block_sum(tail, sh.scratch);  // syncs: the atomics above are done
  if (threadIdx.x == 0) sh.count[kTailBin] += tail;
  __syncthreads();
}

// ---- the split path: passes 1 and 2 over vocabulary slices, many blocks per row ---------------
//
// A small batch would leave most SMs idle with one block per row, so passes 1 and 2 (two of the
// three reads of a row) run on `splits` blocks per row: stats_split_kernel writes each slice's
// Stats, histogram_split_kernel adds each slice's histogram into the row's global one (integer
// sums: exact in any order), and sample_kernel starts from both. Only the gather (and any
// refinement) still reads the row on one block.

struct SplitWorkspace {
  Stats* stats;      // [num_rows][splits]
  uint32_t* count;   // [num_rows][kBins + 1]
  u64* weight;       // [num_rows][kBins + 1]
  int32_t splits;    // 0: the one-block path
  int32_t slice;     // tokens per slice, a multiple of 4 (keeps 16-byte alignment)
};

__device__ __forceinline__ RowCtx slice_ctx(const SampleParams& p, const SplitWorkspace& ws,
                                            int r, int s) {
  const int first = s * ws.slice;
  const int n = max(0, min(ws.slice, p.vocab_size - first));
  return RowCtx{p.logits + int64_t(r) * p.vocab_size + first, n, first, p.final_softcap, 1.0f,
                true, 0.0f};
}

// The row's Stats from its slices' (every thread computes the same).
__device__ Stats merge_stats(const SplitWorkspace& ws, int r) {
  const Stats* parts = ws.stats + int64_t(r) * ws.splits;
  Stats m{0ull, 0ull, -INFINITY, 0, 0.0};
  for (int s = 0; s < ws.splits; ++s) {
    m.best = parts[s].best > m.best ? parts[s].best : m.best;
    m.race = parts[s].race > m.race ? parts[s].race : m.race;
    m.nan |= parts[s].nan;
  }
  m.max = m.best ? key_value(m.best) : -INFINITY;
  if (fabsf(m.max) < INFINITY) {
    for (int s = 0; s < ws.splits; ++s) {
      if (parts[s].max > -INFINITY) m.sum += parts[s].sum * exp(double(parts[s].max) - double(m.max));
    }
  }
  return m;
}

__global__ void __launch_bounds__(kThreads) stats_split_kernel(const SampleParams p,
                                                               const SplitWorkspace ws) {
  __shared__ Shared sh;
  const int r = blockIdx.y, s = blockIdx.x;
  const SamplingRow row = p.rows[r];
  const Race race = valid_settings(row) ? race_of(row, p.vocab_size) : Race{};
  const Stats stats = block_stats(slice_ctx(p, ws, r, s), race, sh);
  if (threadIdx.x == 0) ws.stats[int64_t(r) * ws.splits + s] = stats;
  // The row's global histogram starts at zero for histogram_split_kernel (launched after).
  const int per = (kBins + 1 + ws.splits - 1) / ws.splits;
  for (int i = s * per + threadIdx.x; i < min((s + 1) * per, kBins + 1); i += kThreads) {
    ws.count[int64_t(r) * (kBins + 1) + i] = 0;
    ws.weight[int64_t(r) * (kBins + 1) + i] = 0;
  }
}

__global__ void __launch_bounds__(kThreads) histogram_split_kernel(const SampleParams p,
                                                                   const SplitWorkspace ws) {
  __shared__ Shared sh;
  const int r = blockIdx.y, s = blockIdx.x;
  const SamplingRow row = p.rows[r];
  const Stats stats = merge_stats(ws, r);
  const bool greedy = greedy_row(row);
  // sample_kernel needs no histogram for these rows (it writes a bad row, the argmax or the
  // draw of pass 1).
  if (!valid_settings(row) || stats.nan || !(fabsf(stats.max) < INFINITY) ||
      ((greedy || race_of(row, p.vocab_size).on) && p.num_top == 0)) {
    return;
  }
  RowCtx c = slice_ctx(p, ws, r, s);
  c.temperature = greedy ? 1.0f : row.temperature;
  c.unit = c.temperature == 1.0f;
  c.s_max = c.scaled(stats.max);
  for (int i = threadIdx.x; i <= kBins; i += kThreads) {
    sh.count[i] = 0;
    sh.weight[i] = 0;
  }
  __syncthreads();
  block_histogram(c, greedy, sh);
  for (int i = threadIdx.x; i <= kBins; i += kThreads) {
    if (sh.count[i]) atomicAdd(&ws.count[int64_t(r) * (kBins + 1) + i], sh.count[i]);
    if (sh.weight[i]) atomicAdd(&ws.weight[int64_t(r) * (kBins + 1) + i], sh.weight[i]);
  }
}

__global__ void __launch_bounds__(kThreads, 2) sample_kernel(const SampleParams p,
                                                             const SplitWorkspace ws) {
  __shared__ Shared sh;
  const int r = blockIdx.x;
  const SamplingRow row = p.rows[r];
  RowCtx c{p.logits + int64_t(r) * p.vocab_size, p.vocab_size, 0, p.final_softcap, 1.0f, true,
           0.0f};

  if (!valid_settings(row)) {
    write_bad_row(p, r);
    return;
  }

  // ---- pass 1: max, argmax, the raw normaliser and an unfiltered row's draw (or the split
  // kernels' slices merged) ----
  const Race race = race_of(row, p.vocab_size);
  const Stats stats = ws.splits > 0 ? merge_stats(ws, r) : block_stats(c, race, sh);
  const float m = stats.max;
  if (stats.nan || !(fabsf(m) < INFINITY)) {
    write_bad_row(p, r);
    return;
  }
  const double log_normaliser = double(m) + log(stats.sum);
  const int32_t argmax = key_id(stats.best);

  const bool greedy = greedy_row(row);
  const int num_top = p.num_top;
  if ((greedy || race.on) && num_top == 0) {
    if (threadIdx.x == 0) {
      const int32_t token = greedy ? argmax : key_id(stats.race);
      p.sampled[r] = token;
      p.sampled_logprob[r] = float(double(c.raw(c.logits[token])) - log_normaliser);
    }
    return;
  }
  c.temperature = greedy ? 1.0f : row.temperature;
  c.unit = c.temperature == 1.0f;
  c.s_max = c.scaled(m);  // division is monotone: the max of x / T is max(x) / T

  // ---- pass 2: level-0 histogram (or the split kernels' sum of the slices') ----
  if (ws.splits > 0) {
    for (int i = threadIdx.x; i <= kBins; i += kThreads) {
      sh.count[i] = ws.count[int64_t(r) * (kBins + 1) + i];
      sh.weight[i] = ws.weight[int64_t(r) * (kBins + 1) + i];
    }
    __syncthreads();
  } else {
    for (int i = threadIdx.x; i <= kBins; i += kThreads) {
      sh.count[i] = 0;
      sh.weight[i] = 0;
    }
    __syncthreads();
    block_histogram(c, greedy, sh);
  }
  scan_inclusive(sh.count, kBins + 1, sh.scratch);
  scan_inclusive(sh.weight, kBins + 1, sh.scratch);
  const u64 total_weight = sh.weight[kBins];

  // ---- the plan: which bins hold every boundary ----
  const bool top_k_on = !greedy && row.top_k > 0 && row.top_k < p.vocab_size;
  const bool top_p_on = !greedy && row.top_p < 1.0f;
  const bool min_p_on = !greedy && row.min_p > 0.0f;
  auto top_p_target = [&](u64 w) {
    u64 t = u64(ceil(double(row.top_p) * double(w)));
    return t < 1 ? 1ull : (t > w ? w : t);
  };
  const float s_min_p = min_p_on ? min_p_threshold(c.s_max, row.min_p) : 0.0f;

  int b_top = num_top > 0 ? first_at_least(sh.count, kBins + 1, uint32_t(num_top)) : -1;
  int b_draw = -1;  // the first filter's boundary (an unfiltered row drew in pass 1)
  if (top_k_on) {
    b_draw = first_at_least(sh.count, kBins + 1, uint32_t(row.top_k));
  } else if (top_p_on) {
    b_draw = first_at_least(sh.weight, kBins + 1, top_p_target(total_weight));
  } else if (min_p_on) {
    b_draw = c.bin(s_min_p);
  }
  const int b_window = max(b_top, b_draw);
  Window win;
  if (sh.count[b_window] <= uint32_t(kCapacity)) {
    win = build_window(sh, c, WindowSpec{0, b_window, 0ull, ~0ull}, false, !greedy && !race.on,
                       0u, 0ull);
    win.prefix_bins = b_window;
  }

  // ---- the draw: top-k, top-p, min-p, then the race over the kept prefix ----
  int32_t token = greedy ? argmax : key_id(stats.race);
  if (!greedy && !race.on) {  // filtered
    Boundary kept{0ull, uint32_t(p.vocab_size), total_weight};
    if (top_k_on) kept = query(sh, c, win, Target{false, u64(row.top_k)});
    if (top_p_on) kept = query(sh, c, win, Target{true, top_p_target(kept.weight)});
    if (min_p_on) {
      if ((u64(ordered_bits(s_min_p)) << 32) > kept.key) {
        kept = prefix_at_value(sh, c, win, s_min_p);
      }
    }
    token = race_over_kept(sh, c, win, kept, race.key);
  }
  if (threadIdx.x == 0) {
    p.sampled[r] = token;
    p.sampled_logprob[r] = float(double(c.raw(c.logits[token])) - log_normaliser);
  }

  // ---- the top-N report, in raw order ----
  if (num_top > 0) {
    if (win.valid && win.prefix_bins >= b_top) {
      if (!c.unit) {  // the window holds whole bins, so the raw top-N: re-key and re-sort
        __syncthreads();
        for (int i = threadIdx.x; i < win.n; i += kThreads) {
          const int32_t id = key_id(sh.win.keys[i]);
          sh.win.keys[i] = make_key(c.raw(c.logits[id]), id);
        }
        __syncthreads();
        sort_descending(sh.win.keys, win.n);
      }
    } else {
      win = descend(sh, c, Target{false, u64(num_top)}, true, true);
    }
    for (int i = threadIdx.x; i < num_top; i += kThreads) {
      const u64 key = sh.win.keys[i];
      p.top_ids[int64_t(r) * num_top + i] = key_id(key);
      p.top_logprobs[int64_t(r) * num_top + i] = float(double(key_value(key)) - log_normaliser);
    }
  }
}

void check_launch(const char* op) {
  gpu::Error error = gpu::get_last_error();
  if (error != gpu::kSuccess) {
    throw BackendError(std::string(op) + " launch failed: " + gpu::error_string(error));
  }
}

// The split path: rows of a batch this small get several blocks each for passes 1 and 2.
constexpr int kMaxSplitRows = 32;
constexpr int kMaxSplitsPerRow = 32;
constexpr int kMinSliceTokens = 4096;  // a slice shorter than this costs more than it saves

int splits_for(const SampleParams& p) {
  if (p.num_rows > kMaxSplitRows) return 0;
  const int wanted = (2 * current_sm_count() + p.num_rows - 1) / std::max(p.num_rows, 1);
  const int most = (p.vocab_size + kMinSliceTokens - 1) / kMinSliceTokens;
  const int splits = std::min({wanted, most, kMaxSplitsPerRow});
  return splits >= 2 ? splits : 0;
}

size_t split_workspace_bytes(int rows) {
  return size_t(rows) * (kMaxSplitsPerRow * sizeof(Stats) +
                         (kBins + 1) * (sizeof(uint32_t) + sizeof(u64)));
}

}  // namespace

// Enough for the split path at any row count up to params.num_rows (reserved once for the
// largest batch).
size_t sample_workspace_bytes(const SampleParams& params) {
  return split_workspace_bytes(std::clamp(params.num_rows, 0, kMaxSplitRows));
}

void sample(const SampleParams& p, void* workspace, StreamHandle stream) {
  if (p.num_rows < 0 || p.vocab_size <= 0 || p.vocab_size > kMaxVocab) {
    throw InvalidArgument("sample: num_rows (" + std::to_string(p.num_rows) +
                          ") must be >= 0 and vocab_size (" + std::to_string(p.vocab_size) +
                          ") in [1, " + std::to_string(kMaxVocab) + "]");
  }
  if (p.num_top < 0 || p.num_top > p.vocab_size || p.num_top > kMaxTop) {
    throw InvalidArgument("sample: num_top is " + std::to_string(p.num_top) +
                          "; the GPU sampler reports at most " + std::to_string(kMaxTop) +
                          " (and at most the vocabulary size)");
  }
  if (!(p.final_softcap >= 0.0f) || !std::isfinite(p.final_softcap)) {
    throw InvalidArgument("sample: final_softcap is " + std::to_string(p.final_softcap) +
                          "; it must be finite and >= 0 (0 = none)");
  }
  if (p.num_rows == 0) return;
  if (p.logits == nullptr || p.rows == nullptr || p.sampled == nullptr ||
      p.sampled_logprob == nullptr ||
      (p.num_top > 0 && (p.top_ids == nullptr || p.top_logprobs == nullptr))) {
    throw InvalidArgument("sample: a null pointer among logits, rows and the outputs");
  }
  const gpu::Stream s = static_cast<gpu::Stream>(stream);
  SplitWorkspace ws{};
  ws.splits = workspace != nullptr ? splits_for(p) : 0;
  if (ws.splits > 0) {
    std::byte* cursor = static_cast<std::byte*>(workspace);
    ws.weight = reinterpret_cast<u64*>(cursor);  // 8-byte members first: every part aligned
    cursor += size_t(p.num_rows) * (kBins + 1) * sizeof(u64);
    ws.stats = reinterpret_cast<Stats*>(cursor);
    cursor += size_t(p.num_rows) * kMaxSplitsPerRow * sizeof(Stats);
    ws.count = reinterpret_cast<uint32_t*>(cursor);
    ws.slice = ((p.vocab_size + ws.splits - 1) / ws.splits + 3) / 4 * 4;
    ws.splits = (p.vocab_size + ws.slice - 1) / ws.slice;
    const dim3 grid(ws.splits, p.num_rows);
    stats_split_kernel<<<grid, kThreads, 0, s>>>(p, ws);
    check_launch("sample (stats)");
    histogram_split_kernel<<<grid, kThreads, 0, s>>>(p, ws);
    check_launch("sample (histogram)");
  }
  sample_kernel<<<p.num_rows, kThreads, 0, s>>>(p, ws);
  check_launch("sample");
}

}  // namespace octavo::cuda
