// Host entry points of the CUDA backend, callable from plain C++ (no CUDA types here: a stream is
// passed as an opaque handle). Each checks its inputs, owns its launch geometry and throws
// BackendError naming the op when the launch fails.
#pragma once

#include <string>

#include "backend/ops.h"

namespace octavo::cuda {

using StreamHandle = void*;  // a cudaStream_t; nullptr is the legacy default stream

/// Number of CUDA devices visible; 0 when there is no driver or no device (never throws).
int device_count();

/// "cuBLASLt <version>, CUDA runtime <version>", for build and log lines.
std::string runtime_info();

/// copy_blocks on the device: `params.cache` and `params.copies` are device pointers.
void copy_blocks(const CopyBlocksParams& params, StreamHandle stream);

}  // namespace octavo::cuda
