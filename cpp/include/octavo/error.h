// Errors thrown by the octavo library. Every message names the offending value, the limit it broke
// and, where there is one, the fix ("prompt has 5,120 tokens; max_model_len is 4,096 (raise
// --max-model-len or shorten the prompt)"). The library never prints, exits or aborts.
#pragma once

#include <stdexcept>
#include <string>

namespace octavo {

/// Base of every exception octavo throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A caller passed a value outside its allowed range (Python: ValueError).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A file (checkpoint, model directory) is missing, malformed or truncated.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// Device or pool memory cannot hold what was asked for.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

/// A backend (CUDA runtime, cuBLAS, ...) reported a failure.
class BackendError : public Error {
 public:
  using Error::Error;
};

}  // namespace octavo
