// GEMM for a few rows (decode at small batches): out[m, n] = in[m, k] . weight[n, k]^T (+ bias)
// (+ out), the contract of GemmParams (backend/ops.h), for m <= kMaxGemvRows.
//
// At these sizes the weight read is the whole cost (a Llama-3.1-8B decode step at batch 1 reads
// 15 GB of weights and does 30 GFLOP), so the kernel is a streaming read of the weight: each block
// takes kRowsPerBlock weight rows, its threads split k in 16-byte chunks with several loads in
// flight per thread, and every thread keeps fp32 sums for all m x kRowsPerBlock outputs; a
// warp-shuffle and shared-memory reduction ends the block. The input rows (m x k, a few KB) are
// read by every block and stay in L1/L2; the weight is read once, with a streaming cache hint so
// it does not evict them. Measured on an H100 (bench/kernels.py): 0.98-1.08 of the copy ceiling
// (a pure read can beat a copy) and 1.02-1.23x cuBLASLt at one row; at two rows 0.84-1.16x, and at
// four cuBLASLt wins on the 4096-wide shapes, hence kMaxGemvRows.
#include <string>

#include <octavo/error.h>

#include "compat.h"
#include "cuda_ops.h"
#include "launch.h"

namespace octavo::cuda {
namespace {

constexpr int kGemvThreads = 128;
constexpr int kRowsPerBlock = 4;
constexpr int kChunkElems = 8;  // 16 bytes of bf16 / fp16
constexpr int kChunksPerLine = 8;  // 16-byte chunks in a 128-byte cache line
// Lines of each weight row a block prefetches before its input is ready: 2 KB a row, ~17 MB over
// the blocks an H100 holds at once (sized by estimate to stay well inside L2; not tuned, and its
// share of the overlapped launches' gain was not measured apart).
constexpr int kPrefetchLines = 16;
static_assert(kRowsPerBlock * kPrefetchLines <= kGemvThreads, "one prefetch a thread at most");

__device__ __forceinline__ float to_float(gpu::bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(gpu::fp16 x) { return __half2float(x); }

// The dot product of one 16-byte chunk of a weight row and one of an input row, in fp32. Word by
// word (convert, multiply, convert the next): converting both whole chunks first compiled to 50
// registers instead of 56 (ptxas, sm_90a, one row, bf16), and that build timed 2-8% slower on an
// H100; this form put the latency workload back at 5.77 ms per token (H100, 2026-11-27).
template <typename T>
__device__ __forceinline__ float dot_chunk(const gpu::Vec16& w, const gpu::Vec16& x) {
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 a = gpu::to_float2<T>(w.words[j]);
    const float2 b = gpu::to_float2<T>(x.words[j]);
    sum = fmaf(a.x, b.x, sum);
    sum = fmaf(a.y, b.y, sum);
  }
  return sum;
}

template <typename T, int M>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const GemmParams p) {
  const int64_t n0 = int64_t{blockIdx.x} * kRowsPerBlock;
  const int chunks = p.k / kChunkElems;
  const auto* weight = static_cast<const gpu::Vec16*>(p.weight);
  // No kernel writes the weight: the start of this block's rows heads for L2 while the kernel
  // before (launch_overlapped) finishes; the rest of the block waits for its input.
  if (threadIdx.x < kRowsPerBlock * kPrefetchLines) {
    const int64_t n = min(n0 + threadIdx.x / kPrefetchLines, int64_t{p.n} - 1);
    const int chunk = threadIdx.x % kPrefetchLines * kChunksPerLine;
    if (chunk < chunks) gpu::prefetch_l2(weight + n * chunks + chunk);
  }
  gpu::wait_for_previous_kernels();
  gpu::allow_next_launch();
  const auto* in = static_cast<const gpu::Vec16*>(p.in);
  const int64_t in_stride = p.in_stride / kChunkElems;

  float acc[M][kRowsPerBlock] = {};
#pragma unroll 2
  for (int c = threadIdx.x; c < chunks; c += kGemvThreads) {
    gpu::Vec16 w[kRowsPerBlock];
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) {
      // Rows past n repeat the last one: a valid address, never stored.
      const int64_t n = min(n0 + r, int64_t{p.n} - 1);
      w[r] = gpu::load_streaming(weight + n * chunks + c);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (m < p.m) {
        const gpu::Vec16 x = in[m * in_stride + c];
#pragma unroll
        for (int r = 0; r < kRowsPerBlock; ++r) acc[m][r] += dot_chunk<T>(w[r], x);
      }
    }
  }

  constexpr int kWarps = kGemvThreads / gpu::kWarpSize;
  __shared__ float partial[kWarps][M * kRowsPerBlock];
  const int lane = threadIdx.x % gpu::kWarpSize, warp = threadIdx.x / gpu::kWarpSize;
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int offset = gpu::kWarpSize / 2; offset > 0; offset >>= 1) v += gpu::shfl_xor(v, offset);
      if (lane == 0) partial[warp][m * kRowsPerBlock + r] = v;
    }
  }
  __syncthreads();
  const int i = threadIdx.x;
  if (i >= M * kRowsPerBlock) return;
  const int m = i / kRowsPerBlock, r = i % kRowsPerBlock;
  const int64_t n = n0 + r;
  if (m >= p.m || n >= p.n) return;
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += partial[w][i];
  if (p.bias_f32 != nullptr) sum += p.bias_f32[n];
  if (p.bias != nullptr) sum += to_float(static_cast<const T*>(p.bias)[n]);
  const int64_t at = m * p.out_stride + n;
  if (p.out_dtype == DType::kFloat32) {
    float* out = static_cast<float*>(p.out);
    out[at] = p.accumulate ? out[at] + sum : sum;
  } else {
    T* out = static_cast<T*>(p.out);
    if (p.accumulate) sum += to_float(out[at]);
    out[at] = T(sum);
  }
}

bool aligned16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % sizeof(gpu::Vec16) == 0;
}

}  // namespace

bool gemv_supports(const GemmParams& p) {
  return p.m >= 1 && p.m <= kMaxGemvRows && p.n >= 1 && p.k >= kChunkElems &&
         p.k % kChunkElems == 0 && p.in_stride % kChunkElems == 0 &&
         (p.act_dtype == DType::kBFloat16 || p.act_dtype == DType::kFloat16) &&
         p.weight_dtype == p.act_dtype &&
         (p.out_dtype == p.act_dtype || p.out_dtype == DType::kFloat32) &&
         (p.bias_f32 == nullptr || p.out_dtype == DType::kFloat32) && aligned16(p.in) &&
         aligned16(p.weight);
}

void gemv(const GemmParams& p, StreamHandle stream) {
  if (!gemv_supports(p)) {
    throw InvalidArgument(
        "gemv: needs 1 <= m <= " + std::to_string(kMaxGemvRows) +
        ", k and in_stride multiples of 8, 16-byte aligned in and weight, bf16 or fp16 "
        "activations and weights of one dtype, out in that dtype or float32 (m=" +
        std::to_string(p.m) + " n=" + std::to_string(p.n) + " k=" + std::to_string(p.k) + ")");
  }
  const dim3 grid((p.n + kRowsPerBlock - 1) / kRowsPerBlock);
  const auto s = static_cast<gpu::Stream>(stream);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    static_assert(kMaxGemvRows == 2, "one instantiation per row count");
    if (p.m == 1) {
      launch_overlapped(p.m, gemv_kernel<T, 1>, grid, dim3(kGemvThreads), 0, s, p);
    } else {
      launch_overlapped(p.m, gemv_kernel<T, 2>, grid, dim3(kGemvThreads), 0, s, p);
    }
  };
  if (p.act_dtype == DType::kBFloat16) {
    launch(gpu::bf16{});
  } else {
    launch(gpu::fp16{});
  }
  const gpu::Error error = gpu::get_last_error();
  if (error != gpu::kSuccess) {
    throw BackendError(std::string("gemv launch failed: ") + gpu::error_string(error));
  }
}

}  // namespace octavo::cuda
