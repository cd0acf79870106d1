// RowRmsScale (ops.h): the checks every backend makes, and the CPU reference factor.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include <octavo/error.h>

#include "backend/ops.h"

namespace octavo {

/// Throws InvalidArgument naming `op` unless `s` is off (no source) or names rows of positive
/// width that fit their stride, with a finite eps >= 0.
inline void check_row_scale(const RowRmsScale& s, const char* op) {
  if (s.source == nullptr) return;
  if (s.width <= 0 || s.stride < s.width || !(s.eps >= 0.0f) || !std::isfinite(s.eps)) {
    throw InvalidArgument(std::string(op) + ": row scale width " + std::to_string(s.width) +
                          ", stride " + std::to_string(s.stride) + ", eps " +
                          std::to_string(s.eps) +
                          "; the width must be positive and at most the stride, eps finite and "
                          ">= 0");
  }
}

namespace cpu {

/// Row `row`'s factor, from fp32 rows; the sum in double, as norm() sums.
inline float row_rms_scale(const RowRmsScale& s, int64_t row) {
  const float* x = static_cast<const float*>(s.source) + row * s.stride;
  double sum_squares = 0.0;
  for (int32_t i = 0; i < s.width; ++i) sum_squares += double(x[i]) * x[i];
  return float(1.0 / std::sqrt(sum_squares / s.width + s.eps));
}

}  // namespace cpu
}  // namespace octavo
