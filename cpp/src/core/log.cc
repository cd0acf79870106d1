#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>
#include <utility>

#include "backend/cpu/dtype.h"

namespace octavo {
namespace {

// One lock for both the sink and its calls: set_log_sink() cannot destroy a sink mid-call, and
// sinks see one message at a time.
std::mutex& sink_mutex() {
  static std::mutex mutex;
  return mutex;
}

LogSink& installed_sink() {
  static LogSink sink;
  return sink;
}

std::atomic<bool> g_has_sink{false};
std::atomic<int> g_min_level{int(LogLevel::kInfo)};

}  // namespace

const char* to_string(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kWarning: return "WARNING";
    case LogLevel::kError: return "ERROR";
  }
  return "LOG";
}

LogSink set_log_sink(LogSink sink) {
  std::lock_guard<std::mutex> lock(sink_mutex());
  g_has_sink.store(bool(sink), std::memory_order_relaxed);
  return std::exchange(installed_sink(), std::move(sink));
}

void set_log_level(LogLevel level) { g_min_level.store(int(level), std::memory_order_relaxed); }

LogSink stderr_log_sink() {
  return [](LogLevel level, std::string_view message) {
    std::fprintf(stderr, "octavo %s %.*s\n", to_string(level), int(message.size()), message.data());
  };
}

bool log_enabled(LogLevel level) noexcept {
  return g_has_sink.load(std::memory_order_relaxed) &&
         int(level) >= g_min_level.load(std::memory_order_relaxed);
}

namespace {
std::string grouped(long long value) {
  std::string digits = std::to_string(value < 0 ? -value : value);
  for (int i = int(digits.size()) - 3; i > 0; i -= 3) digits.insert(size_t(i), ",");
  return (value < 0 ? "-" : "") + digits;
}
}  // namespace

void log_engine_ready(const ModelSpec& spec, const EngineConfig& resolved, std::string_view device,
                      DType dtype) noexcept {
  if (!log_enabled(LogLevel::kInfo)) return;
  try {
    const long long blocks = resolved.num_kv_blocks, block_size = resolved.block_size;
    log(LogLevel::kInfo, spec.architecture + " on " + std::string(device) + ", " + cpu::dtype_name(dtype) +
                             "; KV pool " + grouped(blocks) + " blocks x " + grouped(block_size) +
                             " tokens = " + grouped(blocks * block_size) + " tokens; max_model_len " +
                             grouped(resolved.max_model_len));
  } catch (...) {
    // Out of memory while formatting a log line: drop the line, not the engine.
  }
}

void log_graphs_captured(uint64_t count, double seconds) noexcept {
  if (count == 0 || !log_enabled(LogLevel::kInfo)) return;
  try {
    char text[96];
    std::snprintf(text, sizeof text, "captured %s decode graphs in %.2f s",
                  grouped((long long)count).c_str(), seconds);
    log(LogLevel::kInfo, text);
  } catch (...) {
    // As log_engine_ready: a line that cannot be formatted is dropped.
  }
}

void log(LogLevel level, std::string_view message) noexcept {
  if (!log_enabled(level)) return;
  try {
    std::lock_guard<std::mutex> lock(sink_mutex());
    if (installed_sink()) installed_sink()(level, message);
  } catch (...) {
    // A failing sink must not turn a log line into an engine failure.
  }
}

}  // namespace octavo
