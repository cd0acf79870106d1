// Kernel launches that may overlap the kernel before them on the stream (programmatic dependent
// launch, compute capability 9.0+): the launched kernel is scheduled once the previous one has
// called gpu::allow_next_launch() in every CTA, and waits for it in
// gpu::wait_for_previous_kernels() (compat.h states the rules a kernel launched so must follow).
// What it buys: the next kernel's launch and start-up, and its reads of weights, run under the
// previous kernel's tail instead of after it. Captured into a CUDA graph, the dependency stays
// programmatic.
#pragma once

#include <utility>

#include "compat.h"
#include "cuda_ops.h"

namespace octavo::cuda {

/// Steps of at most this many rows (tokens or decode requests) overlap their launches: there
/// every kernel of a layer is octavo's (GEMMs of so few rows are cuda/gemv.cu's), and on an H100
/// the latency workload's step took 1.7% less time. Larger steps launch plainly: their GEMMs are
/// cuBLASLt's, and with every octavo kernel overlapped the nano workload ran 0.6% slower
/// (2026-11-27).
constexpr int64_t kOverlapMaxRows = kMaxGemvRows;

/// kernel<<<grid, block, shared_bytes, stream>>>(args...) for a step of `rows` rows, overlapped
/// with the kernel before it where the device allows and rows <= kOverlapMaxRows. Errors surface
/// through gpu::get_last_error(), as after a <<<>>> launch.
template <typename... Params, typename... Args>
void launch_overlapped(int64_t rows, void (*kernel)(Params...), dim3 grid, dim3 block,
                       size_t shared_bytes, gpu::Stream stream, Args&&... args) {
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
  (void)rows;
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#else
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  if (rows <= kOverlapMaxRows && current_device_overlaps_launches()) {
    config.attrs = &overlap;
    config.numAttrs = 1;
  }
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
#endif
}

}  // namespace octavo::cuda
