// HIP side of cuda/compat.h: the same names over the HIP runtime, for AMD GPUs where a warp
// (wavefront) has 64 lanes on CDNA parts. Kept beside the HIP CMake (not built yet: OCTAVO_HIP is
// reserved), so that kernels written against compat.h need no change when it is.
#pragma once

#include <hip/hip_bf16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>

namespace octavo::gpu {
using Stream = hipStream_t;
using Error = hipError_t;
inline constexpr Error kSuccess = hipSuccess;
inline const char* error_string(Error error) { return hipGetErrorString(error); }
inline Error get_last_error() { return hipGetLastError(); }
inline Error device_count(int* count) { return hipGetDeviceCount(count); }

#if defined(__GFX10__) || defined(__GFX11__) || defined(__GFX12__)
inline constexpr int kWarpSize = 32;  // RDNA runs wave32 by default
#else
inline constexpr int kWarpSize = 64;  // CDNA (MI200, MI300)
#endif

template <typename T>
__device__ __forceinline__ T shfl_xor(T value, int lane_mask) {
  return __shfl_xor(value, lane_mask, kWarpSize);
}
template <typename T>
__device__ __forceinline__ T shfl(T value, int src_lane) {
  return __shfl(value, src_lane, kWarpSize);
}
/// shfl_xor within aligned groups of `width` lanes (compat.h); AMD's shuffle takes no lane mask.
template <typename T>
__device__ __forceinline__ T shfl_xor_group(T value, int lane_mask, int width) {
  return __shfl_xor(value, lane_mask, width);
}

using bf16 = __hip_bfloat16;
using fp16 = __half;
}  // namespace octavo::gpu
