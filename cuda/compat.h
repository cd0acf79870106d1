// The portability header: everything a kernel needs that differs between CUDA and HIP. Kernels
// include this and never name cuda* or hip* runtime calls, warp sizes or shuffle intrinsics
// directly, so the same .cu sources compile as HIP (hip/hip_compat.h maps the names on AMD).
#pragma once

#include <cstdint>
#include <cstring>  // memcpy in to_float8
#include <type_traits>

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include "../hip/hip_compat.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace octavo::gpu {
using Stream = cudaStream_t;
using Error = cudaError_t;
inline constexpr Error kSuccess = cudaSuccess;
inline const char* error_string(Error error) { return cudaGetErrorString(error); }
inline Error get_last_error() { return cudaGetLastError(); }
inline Error device_count(int* count) { return cudaGetDeviceCount(count); }

/// Threads in a warp: 32 on NVIDIA (64 on most AMD GPUs, see hip_compat.h). Never hard-code it.
inline constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T shfl_xor(T value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask, kWarpSize);
}
template <typename T>
__device__ __forceinline__ T shfl(T value, int src_lane) {
  return __shfl_sync(0xffffffffu, value, src_lane, kWarpSize);
}
/// shfl_xor within aligned groups of `width` lanes (a power of two <= 32, lane_mask < width), for
/// code where only some groups of a warp take the branch: every lane of the caller's group must.
template <typename T>
__device__ __forceinline__ T shfl_xor_group(T value, int lane_mask, int width) {
  const unsigned lane = threadIdx.x % kWarpSize;
  const unsigned group = width >= kWarpSize ? 0xffffffffu
                                            : ((1u << width) - 1u) << (lane & ~unsigned(width - 1));
  return __shfl_xor_sync(group, value, lane_mask, width);
}

using bf16 = __nv_bfloat16;
using fp16 = __half;
}  // namespace octavo::gpu
#endif

namespace octavo::gpu {
/// 16 bytes: the widest load a thread issues in one instruction on both vendors.
struct alignas(16) Vec16 {
  uint32_t words[4];
};

/// Two 16-bit floats packed in one word to fp32 (the lower half first): bf16 is the top half of
/// an fp32, so a shift or a mask converts it.
template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t packed) {
  if constexpr (std::is_same_v<T, gpu::bf16>) {
    return make_float2(__uint_as_float(packed << 16), __uint_as_float(packed & 0xffff0000u));
  } else {
    __half2 pair;
    static_assert(sizeof(pair) == sizeof(uint32_t));
    memcpy(&pair, &packed, sizeof(pair));
    return __half22float2(pair);
  }
}

/// Eight 16-bit floats (one 16-byte chunk) to fp32.
template <typename T>
__device__ __forceinline__ void to_float8(const gpu::Vec16& raw, float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_float2<T>(raw.words[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

/// A 16-byte load of data read once (weights streamed by a GEMV): cached so as not to evict
/// what is reused.
__device__ __forceinline__ Vec16 load_streaming(const Vec16* p) {
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
  Vec16 v;
#pragma unroll
  for (int j = 0; j < 4; ++j) v.words[j] = __builtin_nontemporal_load(&p->words[j]);
  return v;
#else
  const int4 v = __ldcs(reinterpret_cast<const int4*>(p));
  return Vec16{{uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)}};
#endif
}

// Programmatic dependent launch (sm_90+). A kernel launched by launch_overlapped() may be
// scheduled while the kernel before it on the stream is still running, once that one has called
// allow_next_launch() in every CTA. Before it reads anything an earlier kernel writes, or writes
// anything an earlier kernel reads, it must call wait_for_previous_kernels(), and it must call
// it on every path, early exits included: a kernel that finishes without waiting would let the
// kernels after it start before the ones before it end. Reads of memory no kernel of the stream
// writes (weights) may come before the wait. On other devices both calls do nothing.
__device__ __forceinline__ void wait_for_previous_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// Loads `*p` from L2, past this SM's L1: for data that CTAs on other SMs of the running kernel
/// wrote and published (their __threadfence, then an atomic this CTA observed, then its own
/// __threadfence). On AMD the fence already invalidates the L1, so a plain load does.
template <typename T>
__device__ __forceinline__ T load_published(const T* p) {
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
  return *p;
#else
  return __ldcg(p);
#endif
}

/// Starts pulling the 128-byte line holding `p` into L2 (no register written, no wait).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
  (void)p;
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}
}  // namespace octavo::gpu
