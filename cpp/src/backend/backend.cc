#include "backend/backend.h"

#include <string>

#include <octavo/error.h>

#ifdef OCTAVO_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace octavo {

std::unique_ptr<Backend> make_cpu_backend();

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#ifdef OCTAVO_WITH_CUDA
    int index = 0;
    if (device.size() > 5) {
      try {
        size_t used = 0;
        index = std::stoi(device.substr(5), &used);
        if (used != device.size() - 5) throw std::invalid_argument(device);
      } catch (const std::exception&) {
        throw InvalidArgument("device '" + device + "': expected cuda or cuda:N");
      }
    }
    return cuda::make_cuda_backend(index);
#else
    throw InvalidArgument("device '" + device +
                          "': this build of octavo has no CUDA backend (it was built without "
                          "nvcc or cuBLAS; see the build log); use device='cpu'");
#endif
  }
  throw InvalidArgument("unknown device '" + device + "'; use 'cpu', 'cuda' or 'cuda:N'");
}

}  // namespace octavo
