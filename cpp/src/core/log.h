// The library's side of octavo/log.h: log(level, message) passes a message to the installed sink.
#pragma once

#include <cstdint>
#include <string_view>

#include <octavo/config.h>
#include <octavo/log.h>
#include <octavo/model_spec.h>

#include "backend/ops.h"

namespace octavo {

/// Whether a message at `level` would reach a sink (callers skip building costly messages).
bool log_enabled(LogLevel level) noexcept;

/// Passes `message` to the sink when one is installed and `level` is enabled. Never throws.
void log(LogLevel level, std::string_view message) noexcept;

/// The INFO line of a constructed engine, as the Python engine logs it: model, device, dtype, KV
/// pool size and max_model_len ("Qwen3ForCausalLM on cuda:0, bfloat16; KV pool 4,096 blocks x 16
/// tokens = 65,536 tokens; max_model_len 40,960").
void log_engine_ready(const ModelSpec& spec, const EngineConfig& resolved, std::string_view device,
                      DType dtype) noexcept;

/// The INFO line of the decode graphs an engine captured before its first step (none: no line).
void log_graphs_captured(uint64_t count, double seconds) noexcept;

}  // namespace octavo
