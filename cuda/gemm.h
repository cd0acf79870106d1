// cuBLASLt GEMM with a per-shape algorithm cache (host-only header: no CUDA types).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "backend/ops.h"

namespace octavo::cuda {

class GemmRunner {
 public:
  /// `workspace` is device memory cuBLASLt may use for split-K and the like.
  GemmRunner(void* workspace, size_t workspace_bytes);
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;

  /// Runs GemmParams (ops.h) on `stream` (a cudaStream_t). The first call of a shape asks
  /// cuBLASLt's heuristic for an algorithm; later calls reuse it.
  void run(const GemmParams& params, void* stream);

 private:
  struct Plan;
  // m, n, k, strides, bias (0 none, 1 weight dtype, 2 fp32), accumulate, act and out dtypes.
  using Key = std::tuple<int, int, int, int64_t, int64_t, int, bool, uint8_t, uint8_t>;
  const Plan& plan(const GemmParams& params);

  void* handle_ = nullptr;  // cublasLtHandle_t
  void* workspace_;
  size_t workspace_bytes_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace octavo::cuda
