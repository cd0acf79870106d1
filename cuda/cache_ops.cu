// Cache ops on the GPU.
//
// copy_blocks: copy-on-write duplicates whole blocks. Work decomposition: one thread block per
// (copy pair, layer); its threads stride through the block's bytes 16 at a time. Pure memory
// traffic (2 x block_bytes per pair and layer), bounded by device bandwidth.
#include <cublasLt.h>

#include <string>

#include <octavo/error.h>

#include "compat.h"
#include "cuda_ops.h"

namespace octavo::cuda {
namespace {

constexpr int kCopyThreads = 256;

__global__ void copy_blocks_kernel(const CopyBlocksParams params) {
  const BlockCopy copy = params.copies[blockIdx.x];
  // The cache manager never emits an id outside the pool; skipping one keeps a corrupt pair from
  // writing outside the cache if that contract is ever broken.
  if (copy.src < 0 || copy.src >= params.num_blocks || copy.dst < 0 ||
      copy.dst >= params.num_blocks) {
    return;
  }
  auto* layer_base = static_cast<char*>(params.cache) + blockIdx.y * params.layer_stride;
  const auto* src = reinterpret_cast<const gpu::Vec16*>(layer_base + copy.src * params.block_bytes);
  auto* dst = reinterpret_cast<gpu::Vec16*>(layer_base + copy.dst * params.block_bytes);
  const int64_t num_vectors = params.block_bytes / int64_t{sizeof(gpu::Vec16)};
  for (int64_t i = threadIdx.x; i < num_vectors; i += blockDim.x) {
    dst[i] = src[i];
  }
}

void check_launch(const char* op) {
  gpu::Error error = gpu::get_last_error();
  if (error != gpu::kSuccess) {
    throw BackendError(std::string(op) + " launch failed: " + gpu::error_string(error));
  }
}

}  // namespace

int device_count() {
  int count = 0;
  if (gpu::device_count(&count) != gpu::kSuccess) {
    gpu::get_last_error();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string runtime_info() {
  int runtime_version = 0;
  cudaRuntimeGetVersion(&runtime_version);
  return "cuBLASLt " + std::to_string(cublasLtGetVersion()) + ", CUDA runtime " +
         std::to_string(runtime_version / 1000) + "." + std::to_string(runtime_version % 1000 / 10);
}

void copy_blocks(const CopyBlocksParams& params, StreamHandle stream) {
  if (params.num_copies == 0 || params.num_layers == 0) return;
  if (params.block_bytes % sizeof(gpu::Vec16) != 0 ||
      reinterpret_cast<uintptr_t>(params.cache) % alignof(gpu::Vec16) != 0 ||
      params.layer_stride % sizeof(gpu::Vec16) != 0) {
    throw InvalidArgument("copy_blocks: cache base, layer stride and block bytes (" +
                          std::to_string(params.block_bytes) + ") must be multiples of 16 bytes");
  }
  if (params.num_layers > 65535) {
    throw InvalidArgument("copy_blocks: " + std::to_string(params.num_layers) +
                          " layers; the grid allows at most 65,535");
  }
  const dim3 grid(params.num_copies, params.num_layers);
  copy_blocks_kernel<<<grid, kCopyThreads, 0, static_cast<gpu::Stream>(stream)>>>(params);
  check_launch("copy_blocks");
}

}  // namespace octavo::cuda
