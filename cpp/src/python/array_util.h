// Helpers for the op bindings: the octavo dtype and device of an array passed from Python
// (numpy on the CPU; torch or cupy on the GPU, through DLPack).
#pragma once

#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>

#include <octavo/error.h>

#include "backend/ops.h"
#ifdef OCTAVO_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace octavo::python {

using AnyArray = nanobind::ndarray<nanobind::c_contig>;

inline bool on_cuda(const AnyArray& array) {
  return array.device_type() == nanobind::device::cuda::value;
}

/// float32 / float16 / bfloat16 arrays; anything else is an InvalidArgument naming `what`.
inline DType dtype_of(const AnyArray& array, const char* what) {
  const nanobind::dlpack::dtype d = array.dtype();
  if (d == nanobind::dtype<float>()) return DType::kFloat32;
  if (d.code == uint8_t(nanobind::dlpack::dtype_code::Float) && d.bits == 16) return DType::kFloat16;
  if (d.code == uint8_t(nanobind::dlpack::dtype_code::Bfloat) && d.bits == 16) return DType::kBFloat16;
  throw InvalidArgument(std::string(what) + ": expected a float32, float16 or bfloat16 array");
}

/// Throws InvalidArgument "OP: WHAT must be an intBITS array" (or uint, float) unless the array
/// holds scalars of that kind and width.
inline void require_dtype(const AnyArray& array, nanobind::dlpack::dtype_code code, int bits,
                          const char* op, const char* what) {
  const nanobind::dlpack::dtype d = array.dtype();
  if (d.code != uint8_t(code) || d.bits != bits || d.lanes != 1) {
    const char* kind = code == nanobind::dlpack::dtype_code::Int    ? "int"
                       : code == nanobind::dlpack::dtype_code::UInt ? "uint"
                                                                    : "float";
    throw InvalidArgument(std::string(op) + ": " + what + " must be a " + kind +
                          std::to_string(bits) + " array");
  }
}

/// Throws unless every array lives on the same device as the first.
template <typename... Arrays>
bool same_device_is_cuda(const char* op, const AnyArray& first, const Arrays&... rest) {
  const bool cuda = on_cuda(first);
  if (((on_cuda(rest) != cuda) || ...)) {
    throw InvalidArgument(std::string(op) + ": arrays on different devices");
  }
#ifndef OCTAVO_WITH_CUDA
  if (cuda) throw InvalidArgument(std::string(op) + ": a CUDA array, but this build has no CUDA backend");
#endif
  return cuda;
}

#ifdef OCTAVO_WITH_CUDA
/// The stream a Python caller passes (torch's `cuda_stream`, an integer) as the CUDA ops take it.
inline cuda::StreamHandle as_stream(uintptr_t stream) {
  return reinterpret_cast<cuda::StreamHandle>(stream);
}
#endif

[[noreturn]] inline void no_cuda() { throw InvalidArgument("this build has no CUDA backend"); }

}  // namespace octavo::python

// The CUDA op, in builds that have it; same_device_is_cuda already threw for a CUDA array in
// builds that do not, so the other branch is never taken.
#ifdef OCTAVO_WITH_CUDA
#define OCTAVO_ON_CUDA(call) ::octavo::cuda::call
#else
#define OCTAVO_ON_CUDA(call) ::octavo::python::no_cuda()
#endif
