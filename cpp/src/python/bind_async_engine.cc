// octavo._C.AsyncEngine: the engine loop on its own thread (async_engine.h). Python reads outputs
// from the shared queue (get_outputs); callbacks are not bound, as they would need the GIL on the
// loop thread. Every call that may wait releases the GIL.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>

#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <octavo/async_engine.h>
#include <octavo/error.h>

#include "python/bindings.h"
#include "python/weights.h"

namespace nb = nanobind;
using namespace octavo;

namespace {

AsyncEngine* make_async_engine(const ModelSpec& spec, const EngineConfig& config,
                               const std::vector<WeightTuple>& weights) {
  std::vector<HostTensor> tensors = to_host_tensors(weights);
  nb::gil_scoped_release release;  // the arrays stay alive: `weights` holds them
  return new AsyncEngine(spec, config, tensors);  // nb::new_ takes ownership
}

std::vector<RequestOutput> get_outputs(AsyncEngine& engine, double timeout) {
  if (!(timeout >= 0.0)) {
    throw InvalidArgument("timeout is " + std::to_string(timeout) +
                          " seconds; it must be >= 0 (math.inf waits until outputs come)");
  }
  // Beyond a century is forever; wait_outputs clamps to that without overflowing.
  const double ms = std::min(std::ceil(timeout * 1000.0), 1e13);
  nb::gil_scoped_release release;
  return engine.wait_outputs(std::chrono::milliseconds(int64_t(ms)));
}

}  // namespace

void bind_async_engine(nb::module_& m) {
  nb::class_<AsyncEngine>(
      m, "AsyncEngine",
      "The engine loop on its own thread: thread-safe add_request and abort; outputs of every "
      "request, in step order, from get_outputs. Same arguments as Engine.")
      .def(nb::new_(&make_async_engine), nb::arg("spec"), nb::arg("config"), nb::arg("weights"))
      .def(
          "add_request",
          [](AsyncEngine& e, std::vector<int32_t> prompt_token_ids, SamplingParams params) {
            return e.add_request(std::move(prompt_token_ids), params);
          },
          nb::arg("prompt_token_ids"), nb::arg("params"), nb::call_guard<nb::gil_scoped_release>(),
          "Queues a request and returns its id (the group_id of its outputs). Raises ValueError "
          "for a request that can never run, RuntimeError after shutdown or a failed step.")
      .def("add_requests", &AsyncEngine::add_requests, nb::arg("prompts"), nb::arg("params"),
           nb::call_guard<nb::gil_scoped_release>(),
           "Queues several requests with no step between them; returns their ids. Raises like "
           "add_request (the ones before an invalid request are aborted).")
      .def("abort", &AsyncEngine::abort, nb::arg("id"), nb::arg("whole_group") = true,
           nb::call_guard<nb::gil_scoped_release>(),
           "Aborts request `id` (whole_group) or only the sequence `id`, before the next step; "
           "its final output has finish_reason 'abort'. Unknown or finished ids are ignored.")
      .def("get_outputs", &get_outputs, nb::arg("timeout"),
           "Waits up to `timeout` seconds for outputs and returns every queued EngineOutput, in "
           "order ([] on timeout; at once after shutdown once the loop stopped).")
      .def("shutdown", &AsyncEngine::shutdown, nb::arg("finish_in_flight") = false,
           nb::call_guard<nb::gil_scoped_release>(),
           "Stops accepting requests, then finishes (finish_in_flight) or aborts what runs, and "
           "joins the loop thread. Idempotent.")
      .def("stats", &AsyncEngine::stats, nb::call_guard<nb::gil_scoped_release>())
      .def("num_unfinished", &AsyncEngine::num_unfinished,
           nb::call_guard<nb::gil_scoped_release>(),
           "Requests added whose final outputs are not all queued yet.")
      .def_prop_ro("config", [](const AsyncEngine& e) { return e.config(); })
      .def_prop_ro("spec", [](const AsyncEngine& e) { return e.spec(); });
}
