// What this build of octavo is: its version and the backends compiled into it.
#pragma once

#include <string>
#include <vector>

namespace octavo {

struct BuildInfo {
  std::string version;                // "0.1.0"
  std::vector<std::string> backends;  // always "cpu"; "cuda" when built with the CUDA backend
  std::string cuda_runtime;           // "cuBLASLt 131000, CUDA runtime 13.0", empty without CUDA
};

/// The version and backends of the library this program linked.
BuildInfo build_info();

/// Number of CUDA devices this process can use (0 without the CUDA backend, a driver or a GPU).
int cuda_device_count();

}  // namespace octavo
