// Zeroed int counters in device memory for kernels whose CTAs coordinate through atomics (a work
// queue, a count of finished splits) and that leave every counter they touch at zero when they
// end, so the next launch needs no memset. Host-only header: no CUDA types.
#pragma once

#include <atomic>
#include <cstddef>
#include <mutex>

#include "cuda/cuda_ops.h"

namespace octavo::cuda {

class DeviceCounters {
 public:
  /// `slots` regions of `ints_per_slot` counters on each device, allocated at the first
  /// request on that device and kept for the process. `owner` names the op in errors.
  DeviceCounters(const char* owner, size_t ints_per_slot, int slots);
  DeviceCounters(const DeviceCounters&) = delete;
  DeviceCounters& operator=(const DeviceCounters&) = delete;

  /// The next region of the current device (regions are handed out in turn, so launches on
  /// different streams share one only when `slots` launches are in flight at once). nullptr when
  /// the region is not yet allocated and `stream` (a cudaStream_t) is capturing a CUDA graph,
  /// where nothing may be allocated. Throws BackendError when the allocation fails.
  int* next(void* stream);

 private:
  const char* owner_;
  size_t ints_per_slot_;
  int slots_;
  std::mutex mutex_;
  int* memory_[kMaxCudaDevices] = {};
  std::atomic<unsigned> next_slot_{0};
};

}  // namespace octavo::cuda
