#include <octavo/version.h>

#ifdef OCTAVO_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace octavo {

BuildInfo build_info() {
  BuildInfo info{OCTAVO_VERSION, {"cpu"}, {}};
#ifdef OCTAVO_WITH_CUDA
  info.backends.push_back("cuda");
  info.cuda_runtime = cuda::runtime_info();
#endif
  return info;
}

int cuda_device_count() {
#ifdef OCTAVO_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace octavo
