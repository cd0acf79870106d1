// Logging: the library never prints. What it has to say (the KV pool it sized, a dtype it chose)
// goes to one process-wide sink that the application installs; with none installed (the default)
// messages are dropped. Python installs none: octavo's Python package logs its own lines through
// the "octavo" logger.
#pragma once

#include <functional>
#include <string_view>

namespace octavo {

enum class LogLevel : int { kDebug = 10, kInfo = 20, kWarning = 30, kError = 40 };  // Python's numbers

/// "DEBUG", "INFO", "WARNING", "ERROR".
const char* to_string(LogLevel level);

/// Receives each message (one line, no trailing newline) at or above the minimum level. Called
/// from whichever thread logs (the AsyncEngine loop thread among them), one call at a time: the
/// library serializes calls, so a sink needs no lock of its own. Exceptions a sink throws are
/// swallowed. The message is valid only during the call. A sink must not call set_log_sink() (it
/// would wait for itself).
using LogSink = std::function<void(LogLevel level, std::string_view message)>;

/// Installs `sink` (an empty function removes it) and returns the previous one. Thread-safe.
LogSink set_log_sink(LogSink sink);

/// Messages below `level` are not formatted or passed on (default: kInfo). Thread-safe.
void set_log_level(LogLevel level);

/// A sink that writes "octavo LEVEL message" lines to stderr, for programs that want exactly that:
/// `octavo::set_log_sink(octavo::stderr_log_sink())`.
LogSink stderr_log_sink();

}  // namespace octavo
