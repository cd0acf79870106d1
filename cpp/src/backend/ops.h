// The op contract every backend implements. Each op takes raw pointers and one parameter struct
// passed by value whose fields document layout and strides; the CPU backend (backend/cpu) is the
// reference, the CUDA backend (cuda/) implements the same contract on a stream, and a test holds
// each GPU op to its CPU twin on the same random inputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include <octavo/model_spec.h>  // NormKind, for qk_norm_params

namespace octavo {

enum class DType : uint8_t { kFloat32, kFloat16, kBFloat16 };

constexpr size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

/// Shape of the one KV pool shared by all layers. A block id names the same block in every layer.
/// Memory order: [layer][block][K|V][kv_head][token in block][head_dim], so one KV head's part of
/// a block is one contiguous run of block_size * head_dim elements.
struct KVCacheShape {
  int num_layers = 0;
  int num_blocks = 0;
  int num_kv_heads = 0;
  int block_size = 0;
  int head_dim = 0;
  DType dtype = DType::kBFloat16;

  /// Bytes of one block in one layer, K and V together.
  size_t block_bytes() const {
    return size_t{2} * num_kv_heads * block_size * head_dim * dtype_size(dtype);
  }
  /// Bytes of one layer's share of the pool.
  size_t layer_bytes() const { return block_bytes() * num_blocks; }
  size_t total_bytes() const { return layer_bytes() * num_layers; }
};

/// One copy-on-write copy: block `src` duplicated into block `dst`, in every layer.
struct BlockCopy {
  int32_t src;
  int32_t dst;
};

/// copy_blocks: for each pair and each layer, the block_bytes at src are copied over dst.
/// Pairs never share a dst, and no dst is also a src (the cache manager guarantees both).
struct CopyBlocksParams {
  void* cache;               // base of the KV pool, KVCacheShape order; 16-byte aligned
  int64_t layer_stride;      // bytes from one layer's pool to the next (KVCacheShape::layer_bytes)
  int64_t block_bytes;       // bytes of one block in one layer; a multiple of 16
  int32_t num_layers;
  int32_t num_blocks;        // blocks per layer, to bound-check the pairs
  const BlockCopy* copies;   // num_copies pairs, in memory the backend can read (device on GPU)
  int32_t num_copies;
};

// ---- the model ops ------------------------------------------------------------------------
// Activations ("act") are in ActDType: fp32 on the CPU backend; bf16 or fp16 on GPUs. Weights and
// the KV cache are in their own dtype (fp32, fp16 or bf16 on every backend). All arrays are dense
// row-major unless a stride is given. Index arrays are int32 except slot ids (int64).

/// out[t, :] = table[token_ids[t], :] * scale  (+ positions[position_ids[t] + position_offset, :]
/// when `positions` is set: learned absolute positions).
struct EmbeddingParams {
  const int32_t* token_ids;     // [num_tokens]; each in [0, vocab_size), or deferred (below)
  // A token id -1 - i reads deferred_token_ids[i] instead: a token the previous step sampled on
  // the device, which the host has not seen yet. nullptr: no deferred ids. A deferred id outside
  // the vocabulary (a row the sampler flagged) gives a zero row on every backend.
  const int32_t* deferred_token_ids;
  const void* table;            // [vocab_size, hidden], weight_dtype
  const int32_t* position_ids;  // [num_tokens]; read only when `positions` is set
  const void* positions;        // [num_positions, hidden], weight_dtype, or nullptr
  void* out;                    // [num_tokens, hidden], act dtype
  int32_t num_tokens;
  int32_t hidden;
  int32_t vocab_size;
  int32_t num_positions;
  int32_t position_offset;
  float scale;
  DType weight_dtype;
  DType act_dtype;
};

/// Normalises each of `rows` rows of length `hidden`. With `residual` set, first
/// residual[r] += in[r] (the residual stream is updated in place) and the sum is normalised:
/// the fused "residual add + norm". `in` and `out` may alias; `residual` aliases neither.
/// kind: NormKind (model_spec.h); weight and bias are [hidden] in weight_dtype (bias optional).
/// A per-head norm (QK norm) is the same op with rows = tokens * heads, hidden = head_dim,
/// row_stride = the distance between heads and, when a token's heads sit inside a wider row
/// (q or k of a fused [T, q | k | v] matrix), rows_per_group = heads and group_stride = that row.
///
/// Row r of in and out starts at element
///   rows_per_group == 0: r * row_stride
///   rows_per_group  > 0: (r / rows_per_group) * group_stride + (r % rows_per_group) * row_stride
/// Elements outside the rows (the gaps between rows and groups) are neither read nor written.
struct NormParams {
  const void* in;       // rows x [hidden] at the row starts above
  void* residual;       // [rows, hidden] contiguous, or nullptr; never grouped
  void* out;            // rows x [hidden] at the row starts above
  const void* weight;   // [hidden] or nullptr (kLayerNormNoWeight)
  const void* bias;     // [hidden] or nullptr
  int32_t rows;
  int32_t hidden;
  int64_t row_stride;   // elements between consecutive rows (of one group) of in and out
  int32_t rows_per_group;  // 0: no grouping; else rows in each group of in and out
  int64_t group_stride;    // elements between consecutive groups; 0 when rows_per_group is 0
  float eps;
  uint8_t kind;         // NormKind
  DType weight_dtype;
  DType act_dtype;
};

/// out[m, n] = sum_k in[m, k] * weight[n, k]  (+ bias[n])  (+ out[m, n] when accumulate).
/// fp32 accumulation. The weight is a Linear's [out, in] matrix. `out` is in out_dtype: the act
/// dtype, or fp32 for the LM head's logits (the sampler reads fp32).
struct GemmParams {
  const void* in;       // [m, k], act dtype, rows `in_stride` elements apart
  const void* weight;   // [n, k], weight_dtype
  const void* bias;     // [n] weight_dtype, or nullptr
  const float* bias_f32;  // [n] fp32 instead of `bias`, for fp32 outputs (the LM head's bias)
  void* out;            // [m, n], act dtype, rows `out_stride` elements apart
  int32_t m;
  int32_t n;
  int32_t k;
  int64_t in_stride;
  int64_t out_stride;
  bool accumulate;
  DType weight_dtype;
  DType act_dtype;
  DType out_dtype;
};

/// The inverse RMS of row t of `source`, rsqrt(mean(source[t, 0:width]^2) + eps): an RMSNorm
/// whose weight the executor folded into the projection that made an op's input, so that the op
/// applies the rest of the norm to each row of that input. source == nullptr: no scale.
struct RowRmsScale {
  const void* source;  // [rows] x [width], act dtype, rows `stride` elements apart
  int64_t stride;
  int32_t width;
  float eps;
};

/// Rotates q and k in place at their tokens' positions. cos_sin holds, per position p, rotary_dim/2
/// cosines then rotary_dim/2 sines (fp32; the host computes it once from RopeConfig, every scaling
/// variant folded in). Only the first rotary_dim elements of each head rotate.
/// Pairing NeoX: (i, i + rotary_dim/2); GPT-J: (2i, 2i + 1).
struct RotaryParams {
  void* q;                   // [num_tokens] x [num_heads, head_dim] at q_stride elements apart
  void* k;                   // [num_tokens] x [num_kv_heads, head_dim] at k_stride elements apart
  const int32_t* positions;  // [num_tokens]
  const float* cos_sin;      // [max_position, rotary_dim]
  int32_t num_tokens;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t rotary_dim;
  int32_t max_position;      // rows of cos_sin; positions must be below it
  int64_t q_stride;
  int64_t k_stride;
  uint8_t pairing;           // RotaryPairing
  DType act_dtype;
  // QK norm (Qwen3, OLMo-2, Gemma 3): when q_norm_weight is set, every q and k head is first
  // RMS-normalised over head_dim with these [head_dim] weights (as NormKind kRMSNorm, or
  // kRMSNormPlusOne when qk_norm_plus_one), then rotated; one pass on the GPU.
  const void* q_norm_weight;
  const void* k_norm_weight;
  float qk_norm_eps;
  bool qk_norm_plus_one;
  DType norm_weight_dtype;
  // q and k of token t are multiplied by row_scale's row t first (before the QK norm); needs
  // rotary_dim == head_dim.
  RowRmsScale row_scale;
};

/// The grouped norm RotaryParams' QK norm amounts to for its q heads (or, with k_heads, its k
/// heads), in place: for backends that normalise apart from the rotation.
inline NormParams qk_norm_params(const RotaryParams& r, bool k_heads) {
  NormParams n{};
  n.in = n.out = k_heads ? r.k : r.q;
  n.weight = k_heads ? r.k_norm_weight : r.q_norm_weight;
  n.hidden = r.head_dim;
  n.row_stride = r.head_dim;
  n.rows_per_group = k_heads ? r.num_kv_heads : r.num_heads;
  n.rows = r.num_tokens * n.rows_per_group;
  n.group_stride = k_heads ? r.k_stride : r.q_stride;
  n.eps = r.qk_norm_eps;
  n.kind = uint8_t(r.qk_norm_plus_one ? NormKind::kRMSNormPlusOne : NormKind::kRMSNorm);
  n.weight_dtype = r.norm_weight_dtype;
  n.act_dtype = r.act_dtype;
  return n;
}

/// Writes each token's K and V into its cache slot (slot = block * block_size + offset) of one
/// layer. A slot of -1 is skipped (padding).
struct WriteKVParams {
  const void* k;               // [num_tokens] x [num_kv_heads, head_dim] at k_stride apart
  const void* v;               // [num_tokens] x [num_kv_heads, head_dim] at v_stride apart
  void* layer_cache;           // this layer's pool: [num_blocks][2][num_kv_heads][block_size][head_dim]
  const int64_t* slot_mapping; // [num_tokens]
  int32_t num_tokens;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t block_size;
  int64_t k_stride;
  int64_t v_stride;
  DType act_dtype;
  DType cache_dtype;
  // The v written for token t is multiplied by v_row_scale's row t (k is written as given: the
  // fused rotary_write_kv scales it as it rotates it).
  RowRmsScale v_row_scale;
};

/// Paged attention for a batch of requests, each with q_len new tokens (a prompt chunk, or 1 for
/// decode) whose K/V are already in the cache. Request r's queries are rows
/// [query_start[r], query_start[r+1]) of q; it has context_lens[r] tokens in the cache, the new
/// ones last, so its query j sits at position context_lens[r] - q_len + j and attends the cached
/// positions <= its own (causal) and > its own - sliding_window (when sliding_window > 0).
/// score = q.k * scale; with softcap > 0, score = softcap * tanh(score / softcap); with alibi
/// slopes, score += slope[h] * (key_pos - query_pos). Query head h reads KV head
/// h / (num_heads / num_kv_heads). Softmax in fp32.
///
/// request_order (optional) is a permutation of [0, num_requests): the order in which a decode
/// launch should start the requests' work. It never changes the result. Longest context first lets
/// the GPU's block scheduler pack a batch of uneven lengths (a long request started last finishes
/// alone); the executor passes it for decode steps. The CPU backend checks that it is a permutation.
struct AttentionParams {
  const void* q;                 // [num_tokens] x [num_heads, head_dim] at q_stride apart
  const void* layer_cache;       // as WriteKVParams::layer_cache
  void* out;                     // [num_tokens, num_heads * head_dim] contiguous
  const int32_t* query_start;    // [num_requests + 1]
  const int32_t* context_lens;   // [num_requests]
  const int32_t* block_tables;   // [num_requests, max_blocks_per_request]
  const float* alibi_slopes;     // [num_heads] or nullptr
  int32_t num_requests;
  int32_t num_tokens;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t block_size;
  int32_t max_blocks_per_request;
  // The first num_decode_prefix requests have one query token each (rows 0 .. n - 1); a GPU
  // backend may run them through its decode kernel. 0: unknown. Never changes the result.
  // (Here, in the hole before q_stride: see the size note below.)
  int32_t num_decode_prefix = 0;
  int64_t q_stride;
  int32_t sliding_window;        // 0: full attention
  int32_t max_query_len;         // max over requests of q_len; the host knows it once per step
  int32_t max_context_len;       // max of context_lens; sizes grids and splits without a sync
  float scale;
  float softcap;                 // 0: none
  DType act_dtype;
  DType cache_dtype;
  const int32_t* request_order = nullptr;  // [num_requests] or nullptr (index order)
};
// The CUDA prefill kernel takes this struct as its parameter. At 136 bytes (num_decode_prefix
// appended at the end) nvcc 13.0 addressed the parameter through a pointer instead of loading its
// fields once, the kernel compiled to 254 registers instead of 249 and ran at 155 instead of
// 196 TFLOP/s (H100, batch 4 x 4096). A new field goes into a hole or takes this up on purpose.
static_assert(sizeof(AttentionParams) <= 128, "AttentionParams grew past 128 bytes");

/// GLU: out[t, i] = act(in[t, i]) * in[t, inter + i] for in [num_tokens, 2 * inter] (gate | up).
/// Plain: out[t, i] = act(in[t, i]) for in [num_tokens, inter]. `activation` is an Activation.
/// in and out may alias for plain activations.
struct ActivationParams {
  const void* in;
  void* out;          // [num_tokens, inter]
  int32_t num_tokens;
  int32_t inter;
  uint8_t activation;
  DType act_dtype;
  RowRmsScale row_scale;  // input row t (gate and up) is multiplied by its row t first
};

/// out[i, :] = in[rows[i], :]: picks the hidden states of the tokens that sample.
struct GatherRowsParams {
  const void* in;        // [*, width]
  const int32_t* rows;   // [num_rows]
  void* out;             // [num_rows, width]
  int32_t num_rows;
  int32_t width;
  DType act_dtype;
};

/// logits[r, token_ids[i]] += bias[i] for i in [row_offsets[r], row_offsets[r + 1]): suppresses
/// tokens (bias -inf: EOS before min_tokens) and applies logit_bias, before sampling.
struct LogitBiasParams {
  float* logits;               // [num_rows, vocab_size], fp32
  const int32_t* row_offsets;  // [num_rows + 1]
  const int32_t* token_ids;    // [row_offsets[num_rows]]; each in [0, vocab_size)
  const float* bias;           // [row_offsets[num_rows]]
  int32_t num_rows;
  int32_t vocab_size;
};

/// The token-count table behind the repetition, frequency and presence penalties: one row of
/// vocab_size int32 per penalty slot (a running sequence that uses penalties owns one). Low 30 bits:
/// how often the token occurs in the output so far; kPromptTokenBit: it occurs in the prompt.
/// Kept incrementally: a slot is rebuilt once when a sequence gets it, then each step adds the
/// sequence's newest output tokens.
constexpr int32_t kPromptTokenBit = 1 << 30;

/// Zeroes rows reset_slots[...] of the table, then adds entries[i].add to
/// counts[entries[i].slot, entries[i].token] (entries may repeat a cell; the adds sum).
struct TokenCountEntry {
  int32_t slot;
  int32_t token;
  int32_t add;  // 1 per output occurrence; kPromptTokenBit once per distinct prompt token
};
struct TokenCountParams {
  int32_t* counts;                 // [num_slots, vocab_size]
  const int32_t* reset_slots;      // [num_resets]
  const TokenCountEntry* entries;  // [num_entries]
  // An entry's token -1 - i reads deferred_token_ids[i] (the previous step's sampled ids, as in
  // EmbeddingParams); one outside the vocabulary (a flagged row) adds nothing. nullptr: none.
  const int32_t* deferred_token_ids;
  int32_t num_resets;
  int32_t num_entries;
  int32_t num_slots;
  int32_t vocab_size;
};

/// One sampled row's penalties (vLLM's meanings), applied to the logits before sampling:
/// for a token with output count c > 0: logit -= frequency * c + presence; for a token in the
/// prompt or the output: logit = logit > 0 ? logit / repetition : logit * repetition.
/// Repetition first, then frequency and presence. slot < 0: the row has no penalties.
struct PenaltyRow {
  int32_t slot;
  float repetition;  // 1: off
  float frequency;   // 0: off
  float presence;    // 0: off
};
struct PenaltyParams {
  float* logits;             // [num_rows, vocab_size], fp32, in place
  const int32_t* counts;     // the TokenCountParams table
  const PenaltyRow* rows;    // [num_rows]
  int32_t num_rows;
  int32_t num_slots;
  int32_t vocab_size;
};

/// Log-probabilities of given tokens (prompt logprobs): per row, the log-softmax of the logits
/// (after the final soft-cap) at targets[r], its rank (1 + the number of tokens with a strictly
/// larger logit, vLLM's rank), and the num_top most likely tokens (descending, ties to the lower
/// id). The logits are not modified.
struct TokenLogprobsParams {
  const float* logits;        // [num_rows, vocab_size], fp32
  const int32_t* targets;     // [num_rows], each in [0, vocab_size)
  float* target_logprob;      // [num_rows] out
  int32_t* target_rank;       // [num_rows] out
  int32_t* top_ids;           // [num_rows, num_top] out
  float* top_logprobs;        // [num_rows, num_top] out
  int32_t num_rows;
  int32_t vocab_size;
  int32_t num_top;            // [0, 20]
  float final_softcap;        // 0: none
};

/// Per-row sampling settings, one per sampled row.
struct SamplingRow {
  float temperature;  // 0: greedy (argmax; ties to the lowest id)
  int32_t top_k;      // <= 0 or >= vocab: off
  float top_p;        // 1: off
  float min_p;        // 0: off
  uint64_t seed;      // the request's generator seed
  uint64_t draw;      // index of this draw in the request's stream (its output position)
};

/// Samples one token per row of fp32 logits. Temperatures below 1e-5 are greedy (argmax, ties to
/// the lowest id). Otherwise the filters keep a prefix of the order (scaled logit descending, ties
/// to the lower id), in the order temperature, top-k, top-p, min-p, and the token is the kept one
/// with the largest logit / temperature + gumbel_noise(draw_key(seed, draw), id)
/// (backend/sampling_rng.h; the Gumbel-max trick), the same on every backend. A draw is a pure
/// function of (seed, draw) and the row, so a request gets the same tokens whatever else is in
/// the batch. Reported log-probabilities are those of the raw distribution (log_softmax of the
/// logits after final soft-capping, before temperature and filtering), as vLLM reports them.
struct SampleParams {
  float* logits;              // [num_rows, vocab], fp32; may be modified (scratch)
  const SamplingRow* rows;    // [num_rows]
  int32_t* sampled;           // [num_rows] out: token ids
  float* sampled_logprob;     // [num_rows] out: logprob of the sampled token
  int32_t* top_ids;           // [num_rows, num_top] out: the num_top most likely ids, descending
  float* top_logprobs;        // [num_rows, num_top] out
  int32_t num_rows;
  int32_t vocab_size;
  int32_t num_top;            // 0: no top-N report (top_ids / top_logprobs unused)
  float final_softcap;        // 0: none
};

/// The reference backend: plain C++ (OpenMP where it pays), fp32 activations only; weights and
/// cache in fp32, fp16 or bf16. Each op throws InvalidArgument on a value its contract rules out.
namespace cpu {
void copy_blocks(const CopyBlocksParams& params);  // throws on a block id outside the pool
void embedding(const EmbeddingParams& params);       // throws on a token id outside the vocab
void norm(const NormParams& params);
void gemm(const GemmParams& params);
void rotary(const RotaryParams& params);
void write_kv(const WriteKVParams& params);
void paged_attention(const AttentionParams& params);
void activation(const ActivationParams& params);
void gather_rows(const GatherRowsParams& params);
void sample(const SampleParams& params);
void add_logit_bias(const LogitBiasParams& params);
void update_token_counts(const TokenCountParams& params);  // throws on a slot or token out of range
void apply_penalties(const PenaltyParams& params);
void token_logprobs(const TokenLogprobsParams& params);
}  // namespace cpu

}  // namespace octavo
