// The CUDA implementation of Backend (backend/backend.h).
#pragma once

#include <memory>

#include "backend/backend.h"

namespace octavo::cuda {

/// The backend for CUDA device `device`. Throws InvalidArgument when there is no such device.
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace octavo::cuda
