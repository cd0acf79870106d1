// Host entry points of the CUDA backend, callable from plain C++ (no CUDA types here: a stream is
// passed as an opaque handle). Each checks its inputs, owns its launch geometry and throws
// BackendError naming the op when the launch fails.
#pragma once

#include <string>

#include "backend/ops.h"

namespace octavo::cuda {

using StreamHandle = void*;  // a cudaStream_t; nullptr is the legacy default stream

/// Devices a process keeps per-device state for (cached attributes, counters): ordinals 0 to
/// kMaxCudaDevices - 1.
inline constexpr int kMaxCudaDevices = 64;

/// Number of CUDA devices visible; 0 when there is no driver or no device (never throws).
int device_count();

/// Multiprocessors of the current device, queried once per device (throws BackendError).
int current_sm_count();
/// Whether the current device runs programmatic dependent launches (compute capability 9.0+),
/// queried once per device (throws BackendError).
bool current_device_overlaps_launches();
/// Whether the current device is compute capability 9.0 exactly (H100, H200: the sm_90a kernels'
/// only target), queried once per device (throws BackendError).
bool current_device_is_sm90();

/// "cuBLASLt <version>, CUDA runtime <version>", for build and log lines.
std::string runtime_info();

/// copy_blocks on the device: `params.cache` and `params.copies` are device pointers.
void copy_blocks(const CopyBlocksParams& params, StreamHandle stream);

// The model ops (contracts in backend/ops.h), every pointer in device memory. Activations,
// weights and cache are bf16 or fp16, one dtype for all three (the launchers throw
// InvalidArgument otherwise); logits and the rotary table are fp32. All launch asynchronously on
// `stream` and never synchronize.

// cuda/elementwise.cu
void embedding(const EmbeddingParams& params, StreamHandle stream);
void norm(const NormParams& params, StreamHandle stream);
void rotary(const RotaryParams& params, StreamHandle stream);
void write_kv(const WriteKVParams& params, StreamHandle stream);
/// One kernel: rotary on q and k, then k and v into their slots (rotary.k == write.k).
void rotary_write_kv(const RotaryParams& rotary, const WriteKVParams& write, StreamHandle stream);
void activation(const ActivationParams& params, StreamHandle stream);
void gather_rows(const GatherRowsParams& params, StreamHandle stream);
void add_logit_bias(const LogitBiasParams& params, StreamHandle stream);
void update_token_counts(const TokenCountParams& params, StreamHandle stream);
void apply_penalties(const PenaltyParams& params, StreamHandle stream);
void token_logprobs(const TokenLogprobsParams& params, StreamHandle stream);

// cuda/gemv.cu: GemmParams (ops.h) for a few rows, a streaming read of the weight; faster than
// cuBLASLt's kernels at decode batches this small. gemv_supports says whether it takes a call
// (rows, alignment, dtypes); gemv throws InvalidArgument for one it does not.
inline constexpr int kMaxGemvRows = 2;  // at 4 rows cuBLASLt wins on some shapes
bool gemv_supports(const GemmParams& params);
void gemv(const GemmParams& params, StreamHandle stream);

// cuda/attention_decode.cu: every request has exactly one query token (max_query_len == 1).
// `workspace` holds the split-K partial results; decode_workspace_bytes() says how much.
size_t decode_workspace_bytes(const AttentionParams& params);
void paged_attention_decode(const AttentionParams& params, void* workspace, StreamHandle stream);

// cuda/attention_prefill.cu: any query lengths (prompt chunks and decodes mixed), tensor cores.
void paged_attention_prefill(const AttentionParams& params, StreamHandle stream);
/// Which prefill kernel `params` would run on the current device: "wgmma" (sm_90a, head dim 128,
/// a chunk longer than 64 tokens) or "mma.sync".
const char* prefill_kernel_name(const AttentionParams& params);

// A batch with prompt chunks whose first params.num_decode_prefix requests have one query token
// each runs those through the decode kernel (which reads each K/V block once per KV head, split
// along the sequence) and the rest through the prefill kernel, once the prefix has at least
// kMinDecodePrefix requests; fewer stay in the prefill kernel's grid rather than pay for a second
// launch (16 is a guess, not a measured crossover). split_decode_prefix gives the two launches'
// parameters.
inline constexpr int kMinDecodePrefix = 16;
struct DecodePrefixSplit {
  AttentionParams decode;   // requests [0, n): rows [0, n)
  AttentionParams prefill;  // requests [n, num_requests), rows as query_start says
};
bool splits_decode_prefix(const AttentionParams& params);
DecodePrefixSplit split_decode_prefix(const AttentionParams& params);

// cuda/sampling.cu: `workspace` of sample_workspace_bytes() bytes.
size_t sample_workspace_bytes(const SampleParams& params);
void sample(const SampleParams& params, void* workspace, StreamHandle stream);

}  // namespace octavo::cuda
