// Test-only access to AsyncEngine: makes a step fail as a device error would, so that the tests
// can check what a failed step does to in-flight and later requests.
#pragma once

#include <string>

#include <octavo/async_engine.h>

namespace octavo {

struct AsyncEngineTesting {
  /// The loop's next step throws BackendError(message) instead of running.
  static void fail_next_step(AsyncEngine& engine, std::string message);
};

}  // namespace octavo
