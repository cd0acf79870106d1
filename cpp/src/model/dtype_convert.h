// Host-side dtype names and conversion, for loading weights into the storage dtype.
#pragma once

#include <cstddef>
#include <string>

#include "backend/ops.h"

namespace octavo {

/// "float32" / "float16" / "bfloat16" (and torch's "float", "half", "bf16" spellings) -> DType.
/// Throws InvalidArgument naming `what` and the accepted names.
DType parse_dtype(const std::string& name, const std::string& what);

/// Converts `count` elements; src and dst may not overlap. fp32 -> half types round to nearest even.
void convert_dtype(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count);

}  // namespace octavo
