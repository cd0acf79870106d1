// Row-wise model ops on the GPU: embedding, norm, rotary, write_kv, the fused rotary + write_kv,
// activation, gather_rows and add_logit_bias. Contracts in backend/ops.h; the CPU backend
// (backend/cpu/elementwise.cc, write_kv.cc, logit_bias.cc) is the oracle.
//
// Every op here moves a few bytes per flop, so each is bounded by device memory bandwidth and the
// design goal is to touch every byte exactly once with full-width accesses:
//  * Elements move in "chunks" of 16 bytes (gpu::Vec16: 8 bf16/fp16) when every pointer is 16-byte
//    aligned and every row length and stride is a multiple of 8 elements (true for every real model
//    shape); otherwise a scalar instance (one element per chunk) runs the same code, so odd shapes
//    stay correct. The choice is made on the host per launch; both are template instances.
//  * Math is fp32; a value is rounded to bf16/fp16 once, when stored.
//  * Launch geometry depends only on the shapes, never on device data, so every launch can be
//    captured in a CUDA graph. Nothing synchronises or allocates.
//
// Values the CPU reference rejects by throwing (a token id outside the vocabulary, a position
// outside the rotary table, a negative gather row, ...) live in device memory here and cannot be
// checked without a sync, so the kernels make them harmless instead and never read or write out
// of bounds; each launcher's comment says what it does with them.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include <octavo/error.h>
#include <octavo/model_spec.h>

#include "backend/row_scale.h"
#include "compat.h"
#include "cuda_ops.h"
#include "launch.h"

namespace octavo::cuda {
namespace {

// ---- element and chunk helpers --------------------------------------------------------------

__device__ __forceinline__ float to_float(gpu::bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(gpu::fp16 x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ gpu::bf16 from_float<gpu::bf16>(float x) {
  return __float2bfloat16(x);  // round to nearest even, as the CPU reference and torch
}
template <>
__device__ __forceinline__ gpu::fp16 from_float<gpu::fp16>(float x) {
  return __float2half(x);  // round to nearest even
}

/// x rounded to T and back: the value a T array would hold.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

/// Loads C consecutive elements of T as fp32: one 16-byte load when they fill a Vec16.
template <typename T, int C>
__device__ __forceinline__ void load_chunk(const T* src, float (&out)[C]) {
  if constexpr (C * sizeof(T) == sizeof(gpu::Vec16)) {
    const gpu::Vec16 v = *reinterpret_cast<const gpu::Vec16*>(src);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < C; ++j) out[j] = to_float(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < C; ++j) out[j] = to_float(src[j]);
  }
}

/// Stores C fp32 values as T: one 16-byte store when they fill a Vec16.
template <typename T, int C>
__device__ __forceinline__ void store_chunk(T* dst, const float (&in)[C]) {
  if constexpr (C * sizeof(T) == sizeof(gpu::Vec16)) {
    gpu::Vec16 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int j = 0; j < C; ++j) e[j] = from_float<T>(in[j]);
    *reinterpret_cast<gpu::Vec16*>(dst) = v;
  } else {
#pragma unroll
    for (int j = 0; j < C; ++j) dst[j] = from_float<T>(in[j]);
  }
}

/// Copies C elements of T unchanged.
template <typename T, int C>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src) {
  if constexpr (C * sizeof(T) == sizeof(gpu::Vec16)) {
    *reinterpret_cast<gpu::Vec16*>(dst) = *reinterpret_cast<const gpu::Vec16*>(src);
  } else {
#pragma unroll
    for (int j = 0; j < C; ++j) dst[j] = src[j];
  }
}

/// Loads N consecutive floats (float4 loads when N is a multiple of 4; the caller guarantees the
/// 16-byte alignment that needs).
template <int N>
__device__ __forceinline__ void load_floats(const float* src, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + j);
      out[j] = v.x;
      out[j + 1] = v.y;
      out[j + 2] = v.z;
      out[j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = src[j];
  }
}

/// Sum over groups of `group` consecutive lanes (a power of two dividing the warp size); every
/// lane of the warp must call it, and each gets its group's sum.
__device__ __forceinline__ float group_sum(float value, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) value += gpu::shfl_xor(value, offset);
  return value;
}

/// Sum over the whole thread block (blockDim.x a multiple of the warp size, at most 1024);
/// `scratch` holds one float per warp. Every thread gets the sum. Safe to call repeatedly.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
  const int warp = threadIdx.x / gpu::kWarpSize;
  const int lane = threadIdx.x % gpu::kWarpSize;
  const int num_warps = blockDim.x / gpu::kWarpSize;
  value = group_sum(value, gpu::kWarpSize);
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = lane < num_warps ? scratch[lane] : 0.0f;
  return group_sum(value, gpu::kWarpSize);
}

// ---- host helpers ---------------------------------------------------------------------------

std::string str(long long value) { return std::to_string(value); }

void check_launch(const char* op) {
  gpu::Error error = gpu::get_last_error();
  if (error != gpu::kSuccess) {
    throw BackendError(std::string(op) + " launch failed: " + gpu::error_string(error));
  }
}

bool is_half(DType dtype) { return dtype == DType::kBFloat16 || dtype == DType::kFloat16; }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "an unknown dtype";
}

void require_half(DType dtype, const char* op, const char* what) {
  if (!is_half(dtype)) {
    throw InvalidArgument(std::string(op) + ": " + what + " are " + dtype_name(dtype) +
                          "; the CUDA backend takes bfloat16 or float16");
  }
}

void require_same(DType dtype, DType act_dtype, const char* op, const char* what) {
  if (dtype != act_dtype) {
    throw InvalidArgument(std::string(op) + ": " + what + " dtype " + dtype_name(dtype) +
                          " differs from the activation dtype " + dtype_name(act_dtype) +
                          "; the CUDA backend takes one dtype for activations, weights and cache");
  }
}

void require_non_negative(long long value, const char* op, const char* what) {
  if (value < 0) {
    throw InvalidArgument(std::string(op) + ": " + what + " is " + str(value) + "; it must be >= 0");
  }
}

bool aligned16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % sizeof(gpu::Vec16) == 0;
}

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }
int round_up(int a, int b) { return (a + b - 1) / b * b; }
int next_pow2(int a) {
  int p = 1;
  while (p < a) p *= 2;
  return p;
}

/// Elements per chunk of a 16-byte vector of bf16/fp16.
constexpr int kVecElems = int(sizeof(gpu::Vec16) / 2);

/// Calls f(T{}) with T the gpu type of a bf16/fp16 dtype (checked before).
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  if (dtype == DType::kBFloat16) {
    f(gpu::bf16{});
  } else {
    f(gpu::fp16{});
  }
}

/// Calls f(std::integral_constant<int, 8 or 1>) with the chunk width: 8 (Vec16) when `vec`.
template <typename F>
void dispatch_chunk(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, kVecElems>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

/// Rows spread over groups of threads: `group` threads (a power of two, at most kRowThreads) per
/// row, kRowThreads / group rows per thread block. Rows of few chunks share a block, long rows get
/// a whole block.
constexpr int kRowThreads = 256;
struct RowGeometry {
  int group;
  int rows_per_block;
};
RowGeometry row_geometry(int64_t chunks_per_row) {
  const int group = next_pow2(int(std::min<int64_t>(std::max<int64_t>(chunks_per_row, 1), kRowThreads)));
  return {group, kRowThreads / group};
}

// ---- embedding ------------------------------------------------------------------------------

// One group of threads per token (row_geometry); each thread moves whole chunks of the row.
template <typename T, int C>
__global__ void embedding_kernel(const EmbeddingParams p, RowGeometry geo) {
  const int64_t t = int64_t{blockIdx.x} * geo.rows_per_block + threadIdx.x / geo.group;
  if (t >= p.num_tokens) return;
  const int lane = threadIdx.x % geo.group;
  const int chunks = p.hidden / C;
  const int64_t hidden = p.hidden;
  T* out = static_cast<T*>(p.out) + t * hidden;
  int32_t id = p.token_ids[t];
  if (id < 0 && p.deferred_token_ids != nullptr) id = p.deferred_token_ids[-int64_t{id} - 1];
  bool valid = id >= 0 && id < p.vocab_size;
  const T* position_row = nullptr;
  if (p.positions != nullptr) {
    const int64_t position = int64_t{p.position_ids[t]} + p.position_offset;
    valid = valid && position >= 0 && position < p.num_positions;
    position_row = static_cast<const T*>(p.positions) + position * hidden;
  }
  if (!valid) {  // see embedding(): an invalid index gives a zero row, never a wild read
    float zeros[C] = {};
    for (int u = lane; u < chunks; u += geo.group) store_chunk<T, C>(out + u * C, zeros);
    return;
  }
  const T* row = static_cast<const T*>(p.table) + int64_t{id} * hidden;
  for (int u = lane; u < chunks; u += geo.group) {
    float x[C];
    load_chunk<T, C>(row + u * C, x);
#pragma unroll
    for (int j = 0; j < C; ++j) x[j] *= p.scale;
    if (position_row != nullptr) {
      float pos[C];
      load_chunk<T, C>(position_row + u * C, pos);
#pragma unroll
      for (int j = 0; j < C; ++j) x[j] += pos[j];
    }
    store_chunk<T, C>(out + u * C, x);
  }
}

// ---- norm -----------------------------------------------------------------------------------

// Each thread keeps its share of a row in registers (kNormRegFloats fp32 values), so the row is
// read once, reduced (one block/group sum for RMSNorm, two for LayerNorm: mean, then the centred
// variance, exactly as the reference), and written once. Rows of up to kWarpSize * kNormRegFloats
// elements (1,024 on NVIDIA) go to a group of at most one warp (several rows per warp for small
// hidden, e.g. QK norm over head_dim); longer rows get one thread block each, sized so the row fits
// (at most kNormMaxThreads threads: hidden up to 16,384).
constexpr int kNormRegFloats = 32;
constexpr int kNormWarpPathThreads = 128;
constexpr int kNormMaxThreads = 512;  // 16,384 elements per row; 128 registers a thread

// Row `row`'s first element in `in` and `out`: the layout NormParams documents.
__device__ __forceinline__ int64_t norm_row_start(const NormParams& p, int64_t row) {
  if (p.rows_per_group == 0) return row * p.row_stride;
  const int32_t r = int32_t(row);  // row < rows, an int32: 32-bit division is the cheap one
  const int32_t group_index = r / p.rows_per_group;
  return int64_t{group_index} * p.group_stride +
         int64_t{r - group_index * p.rows_per_group} * p.row_stride;
}

template <typename T, int C, bool kBlock>
__device__ __forceinline__ void norm_row(const NormParams& p, int64_t row, bool active, int lane,
                                         int group, float* scratch) {
  constexpr int kChunks = kNormRegFloats / C;
  const int chunks = p.hidden / C;
  const auto kind = NormKind(p.kind);
  const bool rms = kind == NormKind::kRMSNorm || kind == NormKind::kRMSNormPlusOne;
  const int64_t start = norm_row_start(p, row);
  const T* in = static_cast<const T*>(p.in) + start;
  T* residual = p.residual != nullptr ? static_cast<T*>(p.residual) + row * p.hidden : nullptr;
  auto reduce = [&](float v) { return kBlock ? block_sum(v, scratch) : group_sum(v, group); };

  // Every load is issued before the first store and before the reduction: a store may alias a
  // later load as far as the compiler knows, and the weights wait on nothing, so interleaving
  // them would turn the row into one memory round trip per chunk (5.5 us per norm at 256 x 1024
  // on an H100; 2.7 us this way). The scalar path (unaligned rows, C = 1) loads its weights late:
  // 32 more floats would spill.
  constexpr bool kWeightsEarly = C > 1;
  const T* weight = kind == NormKind::kLayerNormNoWeight ? nullptr : static_cast<const T*>(p.weight);
  const T* bias = kind == NormKind::kLayerNorm ? static_cast<const T*>(p.bias) : nullptr;
  float x[kChunks][C];
  float w[kChunks][C];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int u = lane + i * group;
    if (active && u < chunks) {
      load_chunk<T, C>(in + u * C, x[i]);
    } else {
#pragma unroll
      for (int j = 0; j < C; ++j) x[i][j] = 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int u = lane + i * group;
    if (kWeightsEarly && weight != nullptr && active && u < chunks) {
      load_chunk<T, C>(weight + u * C, w[i]);
    }
  }
  if (residual != nullptr) {
    float r[kChunks][C];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int u = lane + i * group;
      if (active && u < chunks) load_chunk<T, C>(residual + u * C, r[i]);
    }
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int u = lane + i * group;
      if (active && u < chunks) {
        // The residual stream is stored in T; normalise the stored (rounded) sum, as HF does.
#pragma unroll
        for (int j = 0; j < C; ++j) x[i][j] = round_to<T>(x[i][j] + r[i][j]);
        store_chunk<T, C>(residual + u * C, x[i]);
      }
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
#pragma unroll
    for (int j = 0; j < C; ++j) sum += rms ? x[i][j] * x[i][j] : x[i][j];
  }
  sum = reduce(sum);
  const float inv_hidden = 1.0f / float(p.hidden);
  float mean = 0.0f;
  float inv_std;
  if (rms) {
    inv_std = rsqrtf(sum * inv_hidden + p.eps);
  } else {
    mean = sum * inv_hidden;
    float centred = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      if (active && lane + i * group < chunks) {
#pragma unroll
        for (int j = 0; j < C; ++j) centred += (x[i][j] - mean) * (x[i][j] - mean);
      }
    }
    inv_std = rsqrtf(reduce(centred) * inv_hidden + p.eps);
  }
  if (!active) return;

  const float weight_offset = kind == NormKind::kRMSNormPlusOne ? 1.0f : 0.0f;
  T* out = static_cast<T*>(p.out) + start;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int u = lane + i * group;
    if (u >= chunks) break;
    float y[C];
#pragma unroll
    for (int j = 0; j < C; ++j) y[j] = (x[i][j] - mean) * inv_std;
    if (weight != nullptr) {
      if constexpr (!kWeightsEarly) load_chunk<T, C>(weight + u * C, w[i]);
#pragma unroll
      for (int j = 0; j < C; ++j) y[j] *= w[i][j] + weight_offset;  // Gemma's 1 + w in fp32
    }
    if (bias != nullptr) {
      float b[C];
      load_chunk<T, C>(bias + u * C, b);
#pragma unroll
      for (int j = 0; j < C; ++j) y[j] += b[j];
    }
    store_chunk<T, C>(out + u * C, y);
  }
}

// Rows of at most one warp's capacity: `group` lanes per row, kNormWarpPathThreads / group rows
// per block. No early exit: every lane takes part in the shuffles.
template <typename T, int C>
__global__ void __launch_bounds__(kNormWarpPathThreads) norm_group_kernel(const NormParams p, int group) {
  gpu::wait_for_previous_kernels();
  gpu::allow_next_launch();
  const int rows_per_block = kNormWarpPathThreads / group;
  const int64_t row = int64_t{blockIdx.x} * rows_per_block + threadIdx.x / group;
  norm_row<T, C, false>(p, row, row < p.rows, threadIdx.x % group, group, nullptr);
}

// Long rows: one thread block per row.
template <typename T, int C>
__global__ void __launch_bounds__(kNormMaxThreads) norm_block_kernel(const NormParams p) {
  gpu::wait_for_previous_kernels();
  gpu::allow_next_launch();
  __shared__ float scratch[kNormMaxThreads / gpu::kWarpSize];
  norm_row<T, C, true>(p, blockIdx.x, true, threadIdx.x, blockDim.x, scratch);
}

// ---- rotary and write_kv --------------------------------------------------------------------

// One kernel serves rotary, write_kv and the fused rotary + write_kv: one thread block per token,
// whose threads take the token's work items in turn: q heads' rotation items, then per KV head k's
// rotation items and the chunks past rotary_dim, then v's chunks. A rotation item holds kPairs
// rotating pairs (NeoX: a chunk at i and its partner chunk at i + rotary_dim/2; GPT-J: one chunk
// of adjacent pairs); it is rotated in registers, stored back in place and, for k, into the cache
// in the same pass, so the fused op reads q, k, v once and writes q, k and the cache once.
enum RopeKVMode : int { kRotaryOnly, kWriteOnly, kRotaryAndWrite };
constexpr int kMaxRopeThreads = 512;

struct RopeKVGeometry {
  int q_items;         // num_heads * rotation items per head (0 when q is not rotated)
  int k_items;         // num_kv_heads * k_items_per_head
  int k_items_per_head;
  int k_rot_items;     // rotation items per k head (0 when k is not rotated)
  int rot_items;       // rotation items per head
  int rot_dim;         // elements that rotate (0 in write-only mode)
  int v_items_per_head;
  int total;           // items per token
  int norm_lanes;      // QK norm from the items' own registers: the lanes holding one head's
                       // rotation items (a power of two <= 32); 0: squares summed beforehand
};

template <int P>
__device__ __forceinline__ float sum_of_squares(const float (&x)[P]) {
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < P; ++j) sum += x[j] * x[j];
  return sum;
}

// RowRmsScale's factor for row `row`, summed by the whole block (every thread gets it);
// `scratch` as block_sum's.
template <typename T>
__device__ __forceinline__ float block_row_rms_scale(const RowRmsScale s, int64_t row,
                                                     float* scratch) {
  const T* x = static_cast<const T*>(s.source) + row * s.stride;
  float squares = 0.0f;
  if (s.width % kVecElems == 0 && s.stride % kVecElems == 0 &&
      (reinterpret_cast<uintptr_t>(s.source) & 15) == 0) {
    for (int i = threadIdx.x * kVecElems; i < s.width; i += blockDim.x * kVecElems) {
      float v[kVecElems];
      load_chunk<T, kVecElems>(x + i, v);
      squares += sum_of_squares(v);
    }
  } else {
    for (int i = threadIdx.x; i < s.width; i += blockDim.x) {
      const float v = to_float(x[i]);
      squares += v * v;
    }
  }
  return rsqrtf(block_sum(squares, scratch) / float(s.width) + s.eps);
}

// A head's QK norm inside rope_kv_kernel: x * inv_rms * weight (or (1 + weight)).
template <typename T>
struct HeadNorm {
  const T* weight;  // [head_dim]; nullptr: no norm
  float inv_rms;    // summed beforehand (lanes == 0)
  bool plus_one;
  int lanes;        // > 0: the head's rotation items sit in this many aligned lanes, which sum
                    // their squares here (one memory round trip fewer than summing beforehand)
  float inv_head_dim;
  float eps;
  // The head's inv_rms, given this lane's share of its squares.
  __device__ __forceinline__ float head_inv_rms(float squares) const {
    if (lanes == 0) return inv_rms;
    for (int offset = lanes / 2; offset > 0; offset >>= 1) {
      squares += gpu::shfl_xor_group(squares, offset, lanes);
    }
    return rsqrtf(squares * inv_head_dim + eps);
  }
  template <int P>
  __device__ __forceinline__ void apply(float (&x)[P], int first, float inv) const {
    float w[P];
    load_chunk<T, P>(weight + first, w);
#pragma unroll
    for (int j = 0; j < P; ++j) x[j] = x[j] * inv * (plus_one ? 1.0f + w[j] : w[j]);
  }
};

template <int P>
__device__ __forceinline__ void scale_all(float (&x)[P], float scale) {
#pragma unroll
  for (int j = 0; j < P; ++j) x[j] *= scale;
}

// Scales (by the token's row scale), normalises (when norm.weight is set) and rotates (when
// `rotate`) the kPairs pairs of rotation item `item` of `head`, stores them back in place (when
// either happened) and into `cache_head` (when not null).
template <typename T, bool kVec>
__device__ __forceinline__ void rope_item(T* head, T* cache_head, int item, bool neox, int half,
                                          const float* cos, bool rotate, float scale,
                                          const HeadNorm<T>& norm) {
  const bool in_place = rotate || norm.weight != nullptr;
  if (neox) {
    constexpr int P = kVec ? kVecElems : 1;
    const int i = item * P;
    float a[P], b[P];
    load_chunk<T, P>(head + i, a);
    load_chunk<T, P>(head + i + half, b);
    scale_all(a, scale);
    scale_all(b, scale);
    if (norm.weight != nullptr) {
      const float inv =
          norm.head_inv_rms(norm.lanes ? sum_of_squares(a) + sum_of_squares(b) : 0.0f);
      norm.apply(a, i, inv);
      norm.apply(b, i + half, inv);
    }
    if (rotate) {
      float c[P], s[P];
      load_floats<P>(cos + i, c);
      load_floats<P>(cos + half + i, s);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const float x1 = a[j], x2 = b[j];
        a[j] = x1 * c[j] - x2 * s[j];
        b[j] = x2 * c[j] + x1 * s[j];
      }
    }
    if (in_place) {
      store_chunk<T, P>(head + i, a);
      store_chunk<T, P>(head + i + half, b);
    }
    if (cache_head != nullptr) {
      store_chunk<T, P>(cache_head + i, a);
      store_chunk<T, P>(cache_head + i + half, b);
    }
  } else {
    constexpr int P = kVec ? kVecElems / 2 : 1;  // pairs per item; 2P elements, one chunk
    const int i = item * P;
    float e[2 * P];
    load_chunk<T, 2 * P>(head + 2 * i, e);
    scale_all(e, scale);
    if (norm.weight != nullptr) {
      norm.apply(e, 2 * i, norm.head_inv_rms(norm.lanes ? sum_of_squares(e) : 0.0f));
    }
    if (rotate) {
      float c[P], s[P];
      load_floats<P>(cos + i, c);
      load_floats<P>(cos + half + i, s);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const float x1 = e[2 * j], x2 = e[2 * j + 1];
        e[2 * j] = x1 * c[j] - x2 * s[j];
        e[2 * j + 1] = x2 * c[j] + x1 * s[j];
      }
    }
    if (in_place) store_chunk<T, 2 * P>(head + 2 * i, e);
    if (cache_head != nullptr) store_chunk<T, 2 * P>(cache_head + 2 * i, e);
  }
}

template <typename T, bool kVec, int kMode>
__global__ void rope_kv_kernel(const RotaryParams r, const WriteKVParams w, const RopeKVGeometry g) {
  gpu::wait_for_previous_kernels();
  gpu::allow_next_launch();
  constexpr bool kRotate = kMode != kWriteOnly;
  constexpr bool kWrite = kMode != kRotaryOnly;
  constexpr int C = kVec ? kVecElems : 1;  // elements per copied chunk
  const int64_t t = blockIdx.x;

  bool rotate = false;
  const float* cos = nullptr;
  if constexpr (kRotate) {
    const int32_t position = r.positions[t];
    // A position outside the table leaves the token unrotated (see rotary()).
    rotate = position >= 0 && position < r.max_position;
    cos = r.cos_sin + int64_t{rotate ? position : 0} * r.rotary_dim;
  }
  T* k_cache = nullptr;
  T* v_cache = nullptr;
  int64_t head_run = 0;  // one KV head's run of a block: block_size * head_dim
  if constexpr (kWrite) {
    const int64_t slot = w.slot_mapping[t];
    if (slot >= 0) {  // -1 is padding; other negatives are skipped too (see write_kv())
      head_run = int64_t{w.block_size} * w.head_dim;
      const int64_t block = slot / w.block_size;
      const int64_t offset = slot % w.block_size;
      k_cache = static_cast<T*>(w.layer_cache) + block * 2 * w.num_kv_heads * head_run +
                offset * w.head_dim;
      v_cache = k_cache + w.num_kv_heads * head_run;
    }
  }
  if (!rotate && k_cache == nullptr) return;  // nothing to do for this token

  // The row scale (an RMSNorm folded into the qkv projection): one factor per token, for q and k
  // (r.row_scale) and v (w.v_row_scale); the launcher allows two only if they are the same.
  // (A value, not a reference: a reference to either parameter would copy both to local memory.)
  const RowRmsScale row_scale =
      kRotate && r.row_scale.source != nullptr ? r.row_scale : w.v_row_scale;
  float scale = 1.0f;
  if (row_scale.source != nullptr) {
    __shared__ float scratch[kMaxRopeThreads / gpu::kWarpSize];
    scale = block_row_rms_scale<T>(row_scale, t, scratch);
  }
  const float qk_scale = kRotate && r.row_scale.source != nullptr ? scale : 1.0f;
  const float v_scale = kWrite && w.v_row_scale.source != nullptr ? scale : 1.0f;

  const bool neox = RotaryPairing(r.pairing) == RotaryPairing::kNeox;
  const int half = g.rot_dim / 2;
  const int head_dim = kWrite ? w.head_dim : r.head_dim;
  // QK norm (the launcher passes the weights only when every element of a head rotates): the
  // lanes of a head's items sum its squares from their registers (g.norm_lanes), or, where the
  // items do not fit that, each warp first sums the squares of whole heads; the items then scale
  // what they load.
  extern __shared__ float inv_rms[];  // [num_heads + num_kv_heads] when summed beforehand
  const bool qk_norm = kRotate && r.q_norm_weight != nullptr;
  if (qk_norm && g.norm_lanes == 0) {
    const int warps = int(blockDim.x) / gpu::kWarpSize, lane = threadIdx.x % gpu::kWarpSize;
    for (int h = threadIdx.x / gpu::kWarpSize; h < r.num_heads + r.num_kv_heads; h += warps) {
      const T* head = h < r.num_heads
                          ? static_cast<const T*>(r.q) + t * r.q_stride + int64_t{h} * head_dim
                          : static_cast<const T*>(r.k) + t * r.k_stride +
                                int64_t{h - r.num_heads} * head_dim;
      float squares = 0.0f;
      for (int e = lane; e < head_dim; e += gpu::kWarpSize) {
        const float x = to_float(head[e]) * qk_scale;  // the norm sees the scaled head
        squares += x * x;
      }
#pragma unroll
      for (int offset = gpu::kWarpSize / 2; offset > 0; offset >>= 1) {
        squares += gpu::shfl_xor(squares, offset);
      }
      if (lane == 0) inv_rms[h] = rsqrtf(squares / float(head_dim) + r.qk_norm_eps);
    }
    __syncthreads();
  }
  const float inv_head_dim = 1.0f / float(head_dim);
  auto head_norm = [&](const void* weight, int h) {
    return qk_norm ? HeadNorm<T>{static_cast<const T*>(weight), g.norm_lanes ? 0.0f : inv_rms[h],
                                 r.qk_norm_plus_one, g.norm_lanes, inv_head_dim, r.qk_norm_eps}
                   : HeadNorm<T>{nullptr, 1.0f, false, 0, 0.0f, 0.0f};
  };
  for (int item = threadIdx.x; item < g.total; item += blockDim.x) {
    if (item < g.q_items) {
      if (!rotate && !qk_norm) continue;
      const int h = item / g.rot_items;
      T* head = static_cast<T*>(r.q) + t * r.q_stride + int64_t{h} * head_dim;
      rope_item<T, kVec>(head, nullptr, item - h * g.rot_items, neox, half, cos, rotate, qk_scale,
                         head_norm(r.q_norm_weight, h));
      continue;
    }
    int i = item - g.q_items;
    if (i < g.k_items) {
      const int h = i / g.k_items_per_head;
      i -= h * g.k_items_per_head;
      T* head = static_cast<T*>(kWrite ? const_cast<void*>(w.k) : r.k) +
                t * (kWrite ? w.k_stride : r.k_stride) + int64_t{h} * head_dim;
      T* cache_head = k_cache != nullptr ? k_cache + h * head_run : nullptr;
      if (i < g.k_rot_items) {
        rope_item<T, kVec>(head, cache_head, i, neox, half, cos, rotate, qk_scale,
                           head_norm(r.k_norm_weight, r.num_heads + h));
      } else if (cache_head != nullptr) {
        const int e = g.rot_dim + (i - g.k_rot_items) * C;
        copy_chunk<T, C>(cache_head + e, head + e);
      }
      continue;
    }
    if constexpr (kWrite) {
      if (k_cache == nullptr) continue;
      i -= g.k_items;
      const int h = i / g.v_items_per_head;
      const int e = (i - h * g.v_items_per_head) * C;
      const T* head = static_cast<const T*>(w.v) + t * w.v_stride + int64_t{h} * head_dim;
      if (v_scale != 1.0f) {
        float x[C];
        load_chunk<T, C>(head + e, x);
        scale_all(x, v_scale);
        store_chunk<T, C>(v_cache + h * head_run + e, x);
      } else {
        copy_chunk<T, C>(v_cache + h * head_run + e, head + e);
      }
    }
  }
}

// ---- activation -----------------------------------------------------------------------------

template <Activation A>
__device__ __forceinline__ float activate(float x) {
  if constexpr (A == Activation::kSiluGlu) {
    return x / (1.0f + expf(-x));
  } else if constexpr (A == Activation::kGeluGlu || A == Activation::kGelu) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
  } else if constexpr (A == Activation::kGeluTanhGlu || A == Activation::kGeluTanh) {
    constexpr float kSqrt2OverPi = 0.79788456080286535588f;
    return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
  } else {
    return x > 0.0f ? x : 0.0f;
  }
}

// A flat grid-stride loop over the output's chunks; each reads its gate (and up) chunk.
constexpr int kActivationThreads = 256;
constexpr int kActivationMaxBlocks = 1 << 16;
constexpr int kActivationMaxRowBlocks = 65535;  // gridDim.y's limit
// Row-scaled: blocks a row = SMs x this / rows, at least 1 (measured on an H200 at Llama-3.1-8B's
// width: 512 rows 20.6 us at seven blocks a row, 19.0 at two, 17.2 at one).
constexpr int kActivationBlocksPerSm = 4;

// With a row scale the grid is (blocks per row, rows): each block sums its row's squares itself
// (the row is in L2, just read by the GEMM before), then scales the chunks it takes. Each block
// of a row repeats that sum, so a row gets as few blocks as still fill the GPU (one at hundreds of
// rows: seven at Llama-3.1-8B's width re-read the row seven times and waited on seven sums).
// One chunk of a row: out[e, e + C) = act(scale * gate) (* scale * up). The unscaled path passes
// 1, which the compiler folds away.
template <typename T, int C, Activation A>
__device__ __forceinline__ void activate_chunk(const T* in_row, T* out_row, int64_t e, int inter,
                                               float scale) {
  float x[C];
  load_chunk<T, C>(in_row + e, x);
#pragma unroll
  for (int j = 0; j < C; ++j) x[j] = activate<A>(scale * x[j]);
  if constexpr (is_glu(A)) {
    float up[C];
    load_chunk<T, C>(in_row + inter + e, up);
#pragma unroll
    for (int j = 0; j < C; ++j) x[j] *= scale * up[j];
  }
  store_chunk<T, C>(out_row + e, x);
}

template <typename T, int C, Activation A>
__global__ void __launch_bounds__(kActivationThreads) activation_kernel(const ActivationParams p) {
  gpu::wait_for_previous_kernels();
  gpu::allow_next_launch();
  const int64_t chunks_per_row = p.inter / C;
  const int64_t total = chunks_per_row * p.num_tokens;
  const int64_t in_width = is_glu(A) ? 2 * int64_t{p.inter} : p.inter;
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  if (p.row_scale.source != nullptr) {
    __shared__ float scratch[kActivationThreads / gpu::kWarpSize];
    for (int64_t t = blockIdx.y; t < p.num_tokens; t += gridDim.y) {
      const float scale = block_row_rms_scale<T>(p.row_scale, t, scratch);
      for (int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; c < chunks_per_row;
           c += int64_t{gridDim.x} * blockDim.x) {
        activate_chunk<T, C, A>(in + t * in_width, out + t * p.inter, c * C, p.inter, scale);
      }
    }
    return;
  }
  for (int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = index / chunks_per_row;
    const int64_t e = (index - t * chunks_per_row) * C;
    activate_chunk<T, C, A>(in + t * in_width, out + t * p.inter, e, p.inter, 1.0f);
  }
}

// ---- gather_rows ----------------------------------------------------------------------------

// A pure copy: Unit is gpu::Vec16 or a 2-byte element; one group of threads per row.
template <typename Unit>
__global__ void gather_rows_kernel(const void* in_base, const int32_t* rows, void* out_base,
                                   int32_t num_rows, int64_t units_per_row, RowGeometry geo) {
  const int64_t i = int64_t{blockIdx.x} * geo.rows_per_block + threadIdx.x / geo.group;
  if (i >= num_rows) return;
  const int lane = threadIdx.x % geo.group;
  const int32_t src_row = rows[i];
  Unit* out = static_cast<Unit*>(out_base) + i * units_per_row;
  if (src_row < 0) {  // see gather_rows(): a negative index gives a zero row
    for (int64_t u = lane; u < units_per_row; u += geo.group) out[u] = Unit{};
    return;
  }
  const Unit* in = static_cast<const Unit*>(in_base) + int64_t{src_row} * units_per_row;
  for (int64_t u = lane; u < units_per_row; u += geo.group) out[u] = in[u];
}

// ---- add_logit_bias -------------------------------------------------------------------------

// One warp per row; its lanes take the row's entries in turn. atomicAdd because a row may name a
// token twice (a min_tokens EOS suppression and a user bias on EOS); the sum is order-independent
// up to fp32 rounding, and -inf stays -inf.
constexpr int kLogitBiasThreads = 128;

__global__ void __launch_bounds__(kLogitBiasThreads) add_logit_bias_kernel(const LogitBiasParams p) {
  constexpr int kRowsPerBlock = kLogitBiasThreads / gpu::kWarpSize;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / gpu::kWarpSize;
  if (row >= p.num_rows) return;
  const int lane = threadIdx.x % gpu::kWarpSize;
  float* logits = p.logits + row * p.vocab_size;
  const int32_t end = p.row_offsets[row + 1];
  for (int32_t i = p.row_offsets[row] + lane; i < end; i += gpu::kWarpSize) {
    const int32_t token = p.token_ids[i];
    if (token >= 0 && token < p.vocab_size) atomicAdd(logits + token, p.bias[i]);
  }
}

// ---- rotary / write_kv launch ---------------------------------------------------------------

void check_rotary(const RotaryParams& p, const char* op) {
  require_half(p.act_dtype, op, "activations");
  check_row_scale(p.row_scale, op);
  if (p.row_scale.source != nullptr && p.rotary_dim != p.head_dim) {
    throw InvalidArgument(std::string(op) +
                          ": a row scale needs every element to rotate (rotary_dim " +
                          str(p.rotary_dim) + ", head_dim " + str(p.head_dim) + ")");
  }
  require_non_negative(p.num_tokens, op, "num_tokens");
  require_non_negative(p.num_heads, op, "num_heads");
  require_non_negative(p.num_kv_heads, op, "num_kv_heads");
  const auto pairing = RotaryPairing(p.pairing);
  if (pairing != RotaryPairing::kNeox && pairing != RotaryPairing::kGptj) {
    throw InvalidArgument(std::string(op) + ": unknown RotaryPairing value " + str(p.pairing) +
                          " (expected 0 = NeoX or 1 = GPT-J)");
  }
  if (p.head_dim <= 0 || p.rotary_dim <= 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim) {
    throw InvalidArgument(std::string(op) + ": rotary_dim is " + str(p.rotary_dim) +
                          "; it must be even, positive and at most head_dim (" + str(p.head_dim) +
                          ")");
  }
  if (p.num_tokens > 0 && (p.max_position <= 0 || p.cos_sin == nullptr || p.positions == nullptr)) {
    throw InvalidArgument(std::string(op) + ": the rotary table is empty (max_position " +
                          str(p.max_position) + ") or a table/positions pointer is null");
  }
  if (p.q != nullptr && p.q_stride < int64_t{p.num_heads} * p.head_dim) {
    throw InvalidArgument(std::string(op) + ": q_stride " + str(p.q_stride) + " is below num_heads * head_dim (" +
                          str(int64_t{p.num_heads} * p.head_dim) + ")");
  }
  if (p.k != nullptr && p.k_stride < int64_t{p.num_kv_heads} * p.head_dim) {
    throw InvalidArgument(std::string(op) + ": k_stride " + str(p.k_stride) +
                          " is below num_kv_heads * head_dim (" +
                          str(int64_t{p.num_kv_heads} * p.head_dim) + ")");
  }
  if (p.q_norm_weight != nullptr) {
    if (p.k_norm_weight == nullptr || p.q == nullptr || p.k == nullptr) {
      throw InvalidArgument(std::string(op) + ": QK norm needs q_norm_weight and k_norm_weight, q and k");
    }
    require_same(p.norm_weight_dtype, p.act_dtype, op, "QK norm weights");
  }
}

// RotaryParams' QK norm as two grouped norm launches (q heads, k heads), for the geometries
// rope_kv_kernel does not normalise itself.
void qk_norm_apart(const RotaryParams& r, StreamHandle stream) {
  norm(qk_norm_params(r, /*k_heads=*/false), stream);
  norm(qk_norm_params(r, /*k_heads=*/true), stream);
}

void check_write_kv(const WriteKVParams& p, const char* op) {
  require_half(p.act_dtype, op, "activations");
  check_row_scale(p.v_row_scale, op);
  require_same(p.cache_dtype, p.act_dtype, op, "cache");
  require_non_negative(p.num_tokens, op, "num_tokens");
  if (p.num_kv_heads <= 0 || p.head_dim <= 0 || p.block_size <= 0) {
    throw InvalidArgument(std::string(op) + ": num_kv_heads (" + str(p.num_kv_heads) +
                          "), head_dim (" + str(p.head_dim) + ") and block_size (" +
                          str(p.block_size) + ") must be positive");
  }
  const int64_t row = int64_t{p.num_kv_heads} * p.head_dim;
  if (p.k_stride < row || p.v_stride < row) {
    throw InvalidArgument(std::string(op) + ": k_stride " + str(p.k_stride) + " and v_stride " +
                          str(p.v_stride) + " must be at least num_kv_heads * head_dim (" +
                          str(row) + ")");
  }
  if (p.num_tokens > 0 &&
      (p.k == nullptr || p.v == nullptr || p.layer_cache == nullptr || p.slot_mapping == nullptr)) {
    throw InvalidArgument(std::string(op) + ": k, v, layer_cache and slot_mapping must be set");
  }
}

/// Launches rope_kv_kernel in `mode`; `r` and `w` are checked and consistent for the mode.
void launch_rope_kv(const RotaryParams& checked, const WriteKVParams& w, RopeKVMode mode,
                    StreamHandle stream, const char* op) {
  RotaryParams r = checked;
  // The kernel normalises heads whose every element rotates (its items cover exactly those);
  // other geometries normalise first, in two launches.
  if (r.q_norm_weight != nullptr && r.rotary_dim != r.head_dim) {
    if (r.num_tokens > 0) qk_norm_apart(r, stream);
    r.q_norm_weight = r.k_norm_weight = nullptr;
  }
  const bool rotate_mode = mode != kWriteOnly;
  const bool write_mode = mode != kRotaryOnly;
  const int num_tokens = write_mode ? w.num_tokens : r.num_tokens;
  const int head_dim = write_mode ? w.head_dim : r.head_dim;
  const int num_kv_heads = write_mode ? w.num_kv_heads : r.num_kv_heads;
  const DType dtype = write_mode ? w.act_dtype : r.act_dtype;
  if (num_tokens == 0) return;
  const bool neox = RotaryPairing(r.pairing) == RotaryPairing::kNeox;
  const int rot_dim = rotate_mode ? r.rotary_dim : 0;

  // 16-byte chunks need aligned rows, strides, table rows and rotation items that fill a chunk.
  bool vec = head_dim % kVecElems == 0;
  if (rotate_mode) {
    const int half = rot_dim / 2;
    vec = vec && (neox ? half % kVecElems == 0 : half % (kVecElems / 2) == 0) &&
          aligned16(r.cos_sin) && (r.q == nullptr || (aligned16(r.q) && r.q_stride % kVecElems == 0)) &&
          (r.k == nullptr || (aligned16(r.k) && r.k_stride % kVecElems == 0));
  }
  if (write_mode) {
    vec = vec && aligned16(w.k) && aligned16(w.v) && aligned16(w.layer_cache) &&
          w.k_stride % kVecElems == 0 && w.v_stride % kVecElems == 0;
  }
  const int chunk = vec ? kVecElems : 1;

  RopeKVGeometry g{};
  g.rot_dim = rot_dim;
  const int pairs_per_item = !vec ? 1 : neox ? kVecElems : kVecElems / 2;
  g.rot_items = rot_dim / 2 / pairs_per_item;
  g.q_items = rotate_mode && r.q != nullptr ? r.num_heads * g.rot_items : 0;
  const bool has_k = write_mode || r.k != nullptr;
  g.k_rot_items = rotate_mode && has_k ? g.rot_items : 0;
  g.k_items_per_head = g.k_rot_items + (write_mode ? (head_dim - rot_dim) / chunk : 0);
  g.k_items = has_k ? num_kv_heads * g.k_items_per_head : 0;
  g.v_items_per_head = write_mode ? head_dim / chunk : 0;
  const int64_t total = int64_t{g.q_items} + g.k_items + int64_t{num_kv_heads} * g.v_items_per_head;
  if (total > (int64_t{1} << 30)) {
    throw InvalidArgument(std::string(op) + ": " + str(total) + " work items per token; at most 2^30");
  }
  g.total = int(total);
  if (g.total == 0) return;
  // A head's rotation items are consecutive items from a multiple of rot_items (q heads, then k
  // heads whose every item rotates under QK norm), and a block's threads a multiple of the warp:
  // with rot_items a power of two <= 32, each head's items sit in aligned lanes of one warp.
  const bool items_fit_lanes =
      g.rot_items > 0 && g.rot_items <= 32 && (g.rot_items & (g.rot_items - 1)) == 0;
  g.norm_lanes = rotate_mode && r.q_norm_weight != nullptr && items_fit_lanes ? g.rot_items : 0;
  // One item per thread where a token has up to 512 (Llama-3-8B: 448): a thread's second item
  // would load only after its first item's stores, one more memory round trip per token.
  const int threads =
      std::clamp(round_up(g.total, gpu::kWarpSize), gpu::kWarpSize, kMaxRopeThreads);
  const auto s = static_cast<gpu::Stream>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t inv_rms_bytes = r.q_norm_weight != nullptr && g.norm_lanes == 0
                                     ? size_t(r.num_heads + r.num_kv_heads) * sizeof(float)
                                     : 0;
    auto launch = [&](auto kernel) {
      launch_overlapped(num_tokens, kernel, dim3(num_tokens), dim3(threads), inv_rms_bytes, s, r, w, g);
    };
    if (vec) {
      if (mode == kRotaryOnly) launch(rope_kv_kernel<T, true, kRotaryOnly>);
      if (mode == kWriteOnly) launch(rope_kv_kernel<T, true, kWriteOnly>);
      if (mode == kRotaryAndWrite) launch(rope_kv_kernel<T, true, kRotaryAndWrite>);
    } else {
      if (mode == kRotaryOnly) launch(rope_kv_kernel<T, false, kRotaryOnly>);
      if (mode == kWriteOnly) launch(rope_kv_kernel<T, false, kWriteOnly>);
      if (mode == kRotaryAndWrite) launch(rope_kv_kernel<T, false, kRotaryAndWrite>);
    }
  });
  check_launch(op);
}

}  // namespace

// A token id outside [0, vocab_size), or a learned position (position_ids[t] + position_offset)
// outside [0, num_positions), cannot be reported without a sync (the CPU reference throws): that
// token's output row is written as zeros instead, and nothing outside the tables is read.
void embedding(const EmbeddingParams& p, StreamHandle stream) {
  require_half(p.act_dtype, "embedding", "activations");
  require_same(p.weight_dtype, p.act_dtype, "embedding", "weight");
  require_non_negative(p.num_tokens, "embedding", "num_tokens");
  require_non_negative(p.hidden, "embedding", "hidden");
  if (p.num_tokens == 0 || p.hidden == 0) return;
  const bool vec = p.hidden % kVecElems == 0 && aligned16(p.table) && aligned16(p.out) &&
                   (p.positions == nullptr || aligned16(p.positions));
  dispatch_dtype(p.act_dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_chunk(vec, [&](auto chunk) {
      constexpr int C = decltype(chunk)::value;
      const RowGeometry geo = row_geometry(p.hidden / C);
      embedding_kernel<T, C><<<ceil_div(p.num_tokens, geo.rows_per_block), kRowThreads, 0,
                               static_cast<gpu::Stream>(stream)>>>(p, geo);
    });
  });
  check_launch("embedding");
}

void norm(const NormParams& p, StreamHandle stream) {
  require_half(p.act_dtype, "norm", "activations");
  require_non_negative(p.rows, "norm", "rows");
  const auto kind = NormKind(p.kind);
  if (kind != NormKind::kRMSNorm && kind != NormKind::kRMSNormPlusOne &&
      kind != NormKind::kLayerNorm && kind != NormKind::kLayerNormNoWeight) {
    throw InvalidArgument("norm: unknown NormKind value " + str(p.kind) + " (expected 0.." +
                          str(int(NormKind::kLayerNormNoWeight)) + ")");
  }
  constexpr int kMaxHidden = kNormMaxThreads * kNormRegFloats;
  if (p.hidden <= 0 || p.hidden > kMaxHidden) {
    throw InvalidArgument("norm: hidden is " + str(p.hidden) + "; the CUDA norm takes 1.." +
                          str(kMaxHidden) + " (one row in one thread block's registers)");
  }
  if (p.row_stride < p.hidden) {
    throw InvalidArgument("norm: row_stride " + str(p.row_stride) + " is below hidden " +
                          str(p.hidden) + " (rows would overlap)");
  }
  if (p.rows_per_group < 0) {
    throw InvalidArgument("norm: rows_per_group is " + str(p.rows_per_group) +
                          "; it must be >= 0 (0: no grouping)");
  }
  if (p.rows_per_group == 0 && p.group_stride != 0) {
    throw InvalidArgument("norm: group_stride is " + str(p.group_stride) +
                          " but rows_per_group is 0 (no grouping); set rows_per_group or leave "
                          "group_stride 0");
  }
  if (p.rows_per_group > 0) {
    const int64_t group_extent = (p.rows_per_group - 1) * p.row_stride + p.hidden;
    if (p.group_stride < group_extent) {
      throw InvalidArgument("norm: group_stride " + str(p.group_stride) + " is below the " +
                            str(group_extent) + " elements a group of " + str(p.rows_per_group) +
                            " rows spans (groups would overlap)");
    }
  }
  const bool uses_weight = kind != NormKind::kLayerNormNoWeight;
  const bool has_bias = kind == NormKind::kLayerNorm && p.bias != nullptr;
  if (uses_weight && p.weight == nullptr) {
    throw InvalidArgument("norm: NormKind " + str(p.kind) + " needs a weight; weight is null");
  }
  if (uses_weight || has_bias) require_same(p.weight_dtype, p.act_dtype, "norm", "weight");
  if (p.rows == 0) return;

  const bool vec = p.hidden % kVecElems == 0 && p.row_stride % kVecElems == 0 &&
                   p.group_stride % kVecElems == 0 && aligned16(p.in) &&
                   aligned16(p.out) && aligned16(p.residual) &&
                   (!uses_weight || aligned16(p.weight)) && (!has_bias || aligned16(p.bias));
  const auto s = static_cast<gpu::Stream>(stream);
  dispatch_dtype(p.act_dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_chunk(vec, [&](auto chunk) {
      constexpr int C = decltype(chunk)::value;
      constexpr int kChunksPerThread = kNormRegFloats / C;
      const int chunks = p.hidden / C;
      if (chunks <= gpu::kWarpSize * kChunksPerThread) {
        const int group = std::min(gpu::kWarpSize, next_pow2(chunks));
        const int rows_per_block = kNormWarpPathThreads / group;
        launch_overlapped(p.rows, norm_group_kernel<T, C>, dim3(ceil_div(p.rows, rows_per_block)),
                          dim3(kNormWarpPathThreads), 0, s, p, group);
      } else {
        // Enough threads to hold the row, and at least 256 (or one per chunk) for more loads in
        // flight per row when there are few rows (decode).
        const int needed = ceil_div(chunks, kChunksPerThread);
        const int threads = std::min(
            kNormMaxThreads, round_up(std::max(needed, std::min(chunks, 256)), gpu::kWarpSize));
        launch_overlapped(p.rows, norm_block_kernel<T, C>, dim3(p.rows), dim3(threads), 0, s, p);
      }
    });
  });
  check_launch("norm");
}

// A position outside [0, max_position) cannot be reported without a sync (the CPU reference
// throws): that token's q and k are left unrotated and nothing outside the table is read.
void rotary(const RotaryParams& p, StreamHandle stream) {
  check_rotary(p, "rotary");
  launch_rope_kv(p, WriteKVParams{}, kRotaryOnly, stream, "rotary");
}

// The pool size is not passed, so slots are trusted as the CPU reference trusts them; a negative
// slot other than -1 (which the CPU reference rejects) is skipped like -1.
void write_kv(const WriteKVParams& p, StreamHandle stream) {
  check_write_kv(p, "write_kv");
  RotaryParams none{};
  none.pairing = uint8_t(RotaryPairing::kNeox);
  launch_rope_kv(none, p, kWriteOnly, stream, "write_kv");
}

// Both behaviours above: an out-of-table position writes k unrotated; a negative slot still
// rotates q and k in place but writes nothing to the cache.
void rotary_write_kv(const RotaryParams& rotary, const WriteKVParams& write, StreamHandle stream) {
  check_rotary(rotary, "rotary_write_kv");
  check_write_kv(write, "rotary_write_kv");
  if (rotary.k != write.k || rotary.k_stride != write.k_stride ||
      rotary.num_tokens != write.num_tokens || rotary.num_kv_heads != write.num_kv_heads ||
      rotary.head_dim != write.head_dim || rotary.act_dtype != write.act_dtype) {
    throw InvalidArgument(
        "rotary_write_kv: the rotary and write params disagree on k, k_stride, num_tokens, "
        "num_kv_heads, head_dim or the activation dtype (the fused op rotates the k it writes)");
  }
  const RowRmsScale& a = rotary.row_scale;
  const RowRmsScale& b = write.v_row_scale;
  if (a.source != nullptr && b.source != nullptr &&
      (a.source != b.source || a.stride != b.stride || a.width != b.width || a.eps != b.eps)) {
    throw InvalidArgument(
        "rotary_write_kv: the q/k row scale and the v row scale differ (the fused op computes "
        "one factor per token; pass the same RowRmsScale, or one of them)");
  }
  launch_rope_kv(rotary, write, kRotaryAndWrite, stream, "rotary_write_kv");
}

void activation(const ActivationParams& p, StreamHandle stream) {
  require_half(p.act_dtype, "activation", "activations");
  require_non_negative(p.num_tokens, "activation", "num_tokens");
  require_non_negative(p.inter, "activation", "inter");
  const auto act = Activation(p.activation);
  if (p.activation > uint8_t(Activation::kRelu)) {
    throw InvalidArgument("activation: unknown Activation value " + str(p.activation) +
                          " (expected 0.." + str(int(Activation::kRelu)) + ")");
  }
  check_row_scale(p.row_scale, "activation");
  if (p.num_tokens == 0 || p.inter == 0) return;
  const bool vec = p.inter % kVecElems == 0 && aligned16(p.in) && aligned16(p.out);
  const auto s = static_cast<gpu::Stream>(stream);
  dispatch_dtype(p.act_dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_chunk(vec, [&](auto chunk) {
      constexpr int C = decltype(chunk)::value;
      const int64_t total = int64_t{p.num_tokens} * (p.inter / C);
      dim3 grid(unsigned(
          std::min<int64_t>(ceil_div(total, kActivationThreads), kActivationMaxBlocks)));
      if (p.row_scale.source != nullptr) {
        const int64_t row_blocks = std::min<int64_t>(p.num_tokens, kActivationMaxRowBlocks);
        const int64_t wanted = int64_t{current_sm_count()} * kActivationBlocksPerSm / row_blocks;
        grid = dim3(unsigned(std::clamp<int64_t>(
                        wanted, 1, ceil_div(int64_t{p.inter / C}, kActivationThreads))),
                    unsigned(row_blocks));
      }
      auto launch = [&](auto kernel) {
        launch_overlapped(p.num_tokens, kernel, grid, dim3(kActivationThreads), 0, s, p);
      };
      switch (act) {
        case Activation::kSiluGlu: return launch(activation_kernel<T, C, Activation::kSiluGlu>);
        case Activation::kGeluGlu: return launch(activation_kernel<T, C, Activation::kGeluGlu>);
        case Activation::kGeluTanhGlu:
          return launch(activation_kernel<T, C, Activation::kGeluTanhGlu>);
        case Activation::kGelu: return launch(activation_kernel<T, C, Activation::kGelu>);
        case Activation::kGeluTanh: return launch(activation_kernel<T, C, Activation::kGeluTanh>);
        case Activation::kRelu: return launch(activation_kernel<T, C, Activation::kRelu>);
      }
    });
  });
  check_launch("activation");
}

// A negative row index (the CPU reference throws) gives a zero output row. Indices past the end
// of `in` cannot be caught: the params carry no row count for `in`.
void gather_rows(const GatherRowsParams& p, StreamHandle stream) {
  require_half(p.act_dtype, "gather_rows", "activations");
  require_non_negative(p.num_rows, "gather_rows", "num_rows");
  require_non_negative(p.width, "gather_rows", "width");
  if (p.num_rows == 0 || p.width == 0) return;
  const auto s = static_cast<gpu::Stream>(stream);
  const int64_t row_bytes = int64_t{p.width} * dtype_size(p.act_dtype);
  if (row_bytes % sizeof(gpu::Vec16) == 0 && aligned16(p.in) && aligned16(p.out)) {
    const int64_t units = row_bytes / sizeof(gpu::Vec16);
    const RowGeometry geo = row_geometry(units);
    gather_rows_kernel<gpu::Vec16><<<ceil_div(p.num_rows, geo.rows_per_block), kRowThreads, 0, s>>>(
        p.in, p.rows, p.out, p.num_rows, units, geo);
  } else {
    const RowGeometry geo = row_geometry(p.width);
    gather_rows_kernel<uint16_t><<<ceil_div(p.num_rows, geo.rows_per_block), kRowThreads, 0, s>>>(
        p.in, p.rows, p.out, p.num_rows, p.width, geo);
  }
  check_launch("gather_rows");
}

// A token id outside [0, vocab_size) (the CPU reference throws) is skipped.
void add_logit_bias(const LogitBiasParams& p, StreamHandle stream) {
  require_non_negative(p.num_rows, "add_logit_bias", "num_rows");
  require_non_negative(p.vocab_size, "add_logit_bias", "vocab_size");
  if (p.num_rows == 0) return;
  constexpr int kRowsPerBlock = kLogitBiasThreads / gpu::kWarpSize;
  add_logit_bias_kernel<<<ceil_div(p.num_rows, kRowsPerBlock), kLogitBiasThreads, 0,
                          static_cast<gpu::Stream>(stream)>>>(p);
  check_launch("add_logit_bias");
}

}  // namespace octavo::cuda
