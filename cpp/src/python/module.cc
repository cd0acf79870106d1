// octavo._C: the one compiled module. Errors cross as Python exceptions: InvalidArgument and
// FormatError become ValueError (what vLLM users catch for bad input), every other octavo::Error
// a RuntimeError, each with the library's message.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <octavo/error.h>
#include <octavo/version.h>

#include "python/bindings.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  nb::register_exception_translator([](const std::exception_ptr& error, void*) {
    try {
      std::rethrow_exception(error);
    } catch (const octavo::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const octavo::FormatError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const octavo::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });

  octavo::BuildInfo info = octavo::build_info();
  m.attr("__version__") = info.version;
  m.attr("backends") = info.backends;
  m.attr("cuda_runtime") = info.cuda_runtime;
  m.def("cuda_device_count", &octavo::cuda_device_count,
        "Number of CUDA devices usable (0 without the CUDA backend, a driver or a GPU).");

  bind_kv_cache(m);
  bind_ops(m);
  bind_engine(m);
  bind_async_engine(m);  // after bind_engine: it returns EngineOutput and EngineStats
  bind_safetensors(m);
  bind_model_dir(m);  // after bind_engine: it returns ModelSpec and Engine
}
