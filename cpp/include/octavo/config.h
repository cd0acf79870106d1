// Engine configuration as plain structs. Field names follow vLLM's engine arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace octavo {

struct EngineConfig {
  /// An octavo model directory (octavo.json + safetensors, written by `octavo export`), loaded by
  /// Engine(const EngineConfig&). Unused by the constructor that takes the spec and weights.
  std::string model;
  std::string device = "cpu";  // "cpu", "cuda", "cuda:N"
  /// Storage dtype of weights and KV cache: "auto" (the checkpoint's), "float32", "float16",
  /// "bfloat16". The CPU backend computes in fp32 whatever the storage.
  std::string dtype = "auto";
  int max_model_len = 0;             // 0: the model's max_position_embeddings
  /// Running requests per step; 0: 1024 on a GPU of at least 70 GiB, else 256 (vLLM's defaults).
  int max_num_seqs = 0;
  /// Tokens per step (prefill chunks included); 0: 16384 on a GPU of at least 70 GiB, else
  /// min(8192, max_model_len); never below max_num_seqs.
  int max_num_batched_tokens = 0;
  int block_size = 16;               // tokens per KV block
  bool enable_prefix_caching = true;
  /// Fixed KV pool size in blocks (vLLM: num_gpu_blocks_override); 0: sized from memory.
  int num_kv_blocks = 0;
  /// GPU backends: fraction of the device's memory octavo may use; the KV pool gets this share
  /// of the total minus what weights and step buffers took (vLLM's gpu_memory_utilization).
  float gpu_memory_utilization = 0.9f;
  /// CPU backend: bytes given to the KV pool when num_kv_blocks is 0 (vLLM's CPU KV space).
  size_t cpu_kv_cache_bytes = size_t{4} << 30;
  uint64_t seed = 0;                 // seeds requests that bring no seed of their own
  /// Never replay captured graphs (vLLM's enforce_eager). By default a GPU backend captures a
  /// decode step's forward pass once per padded batch size (1, 2, 4, 8, 16, ... up to 512) and
  /// block-table width the first time one runs, and replays it after: one launch instead of
  /// hundreds.
  bool enforce_eager = false;
  /// Schedule and launch step N + 1 while step N runs (vLLM's async_scheduling): the next step's
  /// decode rows read their input tokens on the device, and the host reads step N's results
  /// while N + 1 computes. A sequence that ends on a stop token costs one extra row of compute.
  /// Steps whose rows fork (n > 1) or run beams wait for their tokens first. Unset: on where the
  /// backend queues its work (GPUs); the CPU backend computes each op on return, so there it
  /// would only deliver every token a step later, and is off unless asked for.
  std::optional<bool> async_scheduling;
  std::vector<int32_t> eos_token_ids;  // EOS ids of the model (generation config)
};

}  // namespace octavo
