// Element conversions for the CPU backend: fp32 <-> fp16 / bf16 in software, so the reference
// backend gives the same bits on every host and compiler. Both narrowing conversions round to
// nearest, ties to even (what torch's .to(), CUDA's __float2bfloat16 and __float2half do);
// fp16 handles subnormals, overflow to inf and NaN as IEEE 754 binary16 does.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include <octavo/error.h>

#include "backend/ops.h"

namespace octavo::cpu {

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float bf16_to_float(uint16_t bf16) { return bits_float(uint32_t{bf16} << 16); }

inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x0040u);  // quiet NaN
  // Adding 0x7fff plus the lowest kept bit rounds the 16 dropped bits to nearest, ties to even;
  // a carry out of the mantissa bumps the exponent, and the largest finite values round to inf.
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding) >> 16);
}

inline float fp16_to_float(uint16_t half) {
  const uint32_t sign = uint32_t(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in fp32.
    const float magnitude = float(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  // Normal: rebias the exponent from 15 to 127.
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // inf stays inf; NaN stays a quiet NaN with its top payload bits
    if (magnitude == 0x7f800000u) return uint16_t(sign | 0x7c00u);
    return uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  }
  // 65520 = 65504 (the largest half) + half an ulp: from there on the value rounds to inf.
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (magnitude >= 0x38800000u) {  // >= 2^-14: a normal half
    // Round the 13 dropped mantissa bits to nearest even, then rebias the exponent 127 -> 15
    // (subtract 112 << 23); a mantissa carry correctly bumps the exponent.
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (magnitude <= 0x33000000u) return sign;  // <= 2^-25: rounds to zero (2^-25 is a tie to even 0)
  // Subnormal half: count units of 2^-24. The fp32 significand (with its implicit 1) times
  // 2^(exponent - 150) is shifted right by 126 - exponent (14..24) bits, rounding to nearest even.
  const uint32_t exponent = magnitude >> 23;
  const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exponent;
  uint32_t units = significand >> shift;
  const uint32_t remainder = significand & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (remainder > halfway || (remainder == halfway && (units & 1u))) ++units;
  return uint16_t(sign | units);  // units may reach 0x400: the smallest normal, as it should
}

inline bool is_valid(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown dtype";
}

/// Element `index` of an array of `dtype`, as fp32.
inline float load_element(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[index];
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
  return 0.0f;  // unreachable for a validated dtype
}

/// Stores fp32 `value` as element `index` of an array of `dtype`, rounding to nearest even.
inline void store_element(void* base, DType dtype, int64_t index, float value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[index] = value; return;
    case DType::kFloat16: static_cast<uint16_t*>(base)[index] = float_to_fp16(value); return;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[index] = float_to_bf16(value); return;
  }
}

/// dst[i] = src[offset + i] as fp32 for i < count. The dtype switch sits outside the loop so each
/// case is a tight loop the compiler vectorises.
inline void load_row(const void* src, DType dtype, int64_t offset, int64_t count, float* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* from = static_cast<const float*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = from[i];
      return;
    }
    case DType::kFloat16: {
      const uint16_t* from = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = fp16_to_float(from[i]);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* from = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(from[i]);
      return;
    }
  }
}

/// dst[offset + i] = src[i] converted to `dtype` for i < count.
inline void store_row(const float* src, int64_t count, void* dst, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: {
      float* to = static_cast<float*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) to[i] = src[i];
      return;
    }
    case DType::kFloat16: {
      uint16_t* to = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) to[i] = float_to_fp16(src[i]);
      return;
    }
    case DType::kBFloat16: {
      uint16_t* to = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) to[i] = float_to_bf16(src[i]);
      return;
    }
  }
}

/// The CPU backend computes activations in fp32 only; `op` names the caller in the message.
inline void require_fp32_activations(DType act_dtype, const char* op) {
  if (act_dtype != DType::kFloat32) {
    throw InvalidArgument(std::string(op) + ": activations are " + dtype_name(act_dtype) +
                          "; the CPU backend computes in float32 only (pass float32 activations)");
  }
}

/// Weights and the KV cache may be fp32, fp16 or bf16; anything else is a corrupt enum value.
inline void require_valid_dtype(DType dtype, const char* op, const char* what) {
  if (!is_valid(dtype)) {
    throw InvalidArgument(std::string(op) + ": " + what + " dtype has the unknown value " +
                          std::to_string(int(dtype)) + " (expected float32, float16 or bfloat16)");
  }
}

}  // namespace octavo::cpu
