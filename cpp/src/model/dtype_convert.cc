#include "model/dtype_convert.h"

#include <algorithm>
#include <cstring>

#include <octavo/error.h>

#include "backend/cpu/dtype.h"

namespace octavo {

DType parse_dtype(const std::string& name, const std::string& what) {
  if (name == "float32" || name == "float" || name == "fp32") return DType::kFloat32;
  if (name == "float16" || name == "half" || name == "fp16") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  throw InvalidArgument(what + ": dtype '" + name +
                        "' is not supported (use float32, float16 or bfloat16)");
}

void convert_dtype(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count) {
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, count * dtype_size(src_dtype));
    return;
  }
  constexpr size_t kChunk = 4096;
  float staging[kChunk];
  for (size_t start = 0; start < count; start += kChunk) {
    const size_t n = std::min(kChunk, count - start);
    cpu::load_row(src, src_dtype, int64_t(start), int64_t(n), staging);
    cpu::store_row(staging, int64_t(n), dst, dst_dtype, int64_t(start));
  }
}

}  // namespace octavo
