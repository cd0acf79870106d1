#include "cuda/device_counters.h"

#include <cuda_runtime.h>

#include <string>

#include <octavo/error.h>

namespace octavo::cuda {

DeviceCounters::DeviceCounters(const char* owner, size_t ints_per_slot, int slots)
    : owner_(owner), ints_per_slot_(ints_per_slot), slots_(slots) {}

int* DeviceCounters::next(void* stream) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxCudaDevices) {
    cudaGetLastError();
    throw BackendError(std::string(owner_) + ": no usable current CUDA device");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (memory_[device] == nullptr) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &capture) == cudaSuccess &&
        capture != cudaStreamCaptureStatusNone) {
      return nullptr;
    }
    void* memory = nullptr;
    const size_t bytes = ints_per_slot_ * size_t(slots_) * sizeof(int);
    if (cudaMalloc(&memory, bytes) != cudaSuccess || cudaMemset(memory, 0, bytes) != cudaSuccess) {
      const std::string error = cudaGetErrorString(cudaGetLastError());
      if (memory != nullptr) cudaFree(memory);
      throw BackendError(std::string(owner_) + ": cannot allocate its " +
                         std::to_string(bytes) + " bytes of counters: " + error);
    }
    memory_[device] = static_cast<int*>(memory);
  }
  const unsigned slot = next_slot_.fetch_add(1, std::memory_order_relaxed) % unsigned(slots_);
  return memory_[device] + ints_per_slot_ * slot;
}

}  // namespace octavo::cuda
