// The engine's automatic per-step limits (EngineConfig fields left at 0), apart so that both
// branches are testable without the device they depend on.
#pragma once

#include <cstddef>
#include <optional>

#include <octavo/config.h>

namespace octavo {

/// A device of at least this much memory gets vLLM's large-GPU throughput defaults.
constexpr size_t kLargeDeviceBytes = size_t{70} << 30;

/// Fills max_num_seqs (0: 1024 on a device of >= kLargeDeviceBytes, else 256) and
/// max_num_batched_tokens (<= 0: 16384 on such a device, else min(8192, max_model_len); never
/// below max_num_seqs). device_total_bytes: the device's memory, nullopt on the CPU.
/// config.max_model_len must already be resolved.
void resolve_step_limits(EngineConfig& config, std::optional<size_t> device_total_bytes);

}  // namespace octavo
