// The executor: owns the weights, the KV pool and the step workspace on one backend, and runs the
// generic decoder over one step. It never decides who runs (the scheduler does); it receives a
// packed StepBatch and returns the sampled tokens.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include <octavo/engine.h>
#include <octavo/model_spec.h>

#include "backend/backend.h"

namespace octavo {

/// One step, packed on the host (DESIGN.md, "One step"). Request r owns query rows
/// [query_start[r], query_start[r + 1]) and block-table row r.
struct StepBatch {
  std::vector<int32_t> token_ids;      // [num_tokens]
  std::vector<int32_t> positions;      // [num_tokens]
  std::vector<int64_t> slot_mapping;   // [num_tokens]
  std::vector<int32_t> query_start;    // [num_requests + 1]
  std::vector<int32_t> context_lens;   // [num_requests]: cached + new tokens
  std::vector<int32_t> block_tables;   // [num_requests, block_table_width]
  int32_t block_table_width = 0;
  int32_t max_query_len = 0;           // max over requests of new tokens
  int32_t max_context_len = 0;         // max of context_lens
  std::vector<BlockCopy> block_copies; // copy-on-write copies to make before the forward
  // Sampling: one entry per request whose last scheduled token is the sequence's last.
  std::vector<int32_t> sample_rows;    // query row whose hidden state samples
  std::vector<SamplingRow> sampling;
  std::vector<int32_t> bias_offsets;   // [num_samples + 1] into bias_token_ids / bias_values
  std::vector<int32_t> bias_token_ids;
  std::vector<float> bias_values;
  int32_t num_top_logprobs = 0;        // top-N reported for every sampled row
  // Penalties: empty when no sampled row has any; else one per sampled row (slot -1: none).
  std::vector<PenaltyRow> penalties;
  // Token-count table updates, applied before the step's sampling: rows to zero, then adds.
  std::vector<int32_t> count_resets;
  std::vector<TokenCountEntry> count_entries;
  // Prompt logprobs: query rows whose logits give the logprob of the next prompt token.
  std::vector<int32_t> prompt_logprob_rows;
  std::vector<int32_t> prompt_logprob_targets;
  int32_t num_prompt_top_logprobs = 0; // top-N reported for every prompt-logprob row

  int32_t num_tokens() const { return int32_t(token_ids.size()); }
  int32_t num_requests() const { return int32_t(context_lens.size()); }
  int32_t num_samples() const { return int32_t(sample_rows.size()); }
  int32_t num_prompt_logprob_rows() const { return int32_t(prompt_logprob_rows.size()); }
  void clear();
};

struct StepResult {
  std::vector<int32_t> sampled;        // [num_samples]
  std::vector<float> sampled_logprob;  // [num_samples]
  std::vector<int32_t> top_ids;        // [num_samples, num_top_logprobs]
  std::vector<float> top_logprobs;     // [num_samples, num_top_logprobs]
  // One per prompt-logprob row: the target token's logprob and rank, and the top-N report.
  std::vector<float> prompt_logprob;
  std::vector<int32_t> prompt_rank;
  std::vector<int32_t> prompt_top_ids;       // [rows, num_prompt_top_logprobs]
  std::vector<float> prompt_top_logprobs;    // [rows, num_prompt_top_logprobs]
};

struct ExecutorLimits {
  int max_num_tokens = 0;   // tokens in one step
  int max_num_seqs = 0;     // requests in one step
  int max_model_len = 0;    // positions are below this
  int max_bias_per_seq = 0; // logit-bias entries one request may bring to a step
  bool use_graphs = true;   // replay captured graphs for decode steps where the backend can
};

class Executor {
 public:
  /// Loads and validates the weights (every canonical name the spec needs, with its shape; no
  /// extras), converting them to `weight_dtype`, and allocates everything a step of the largest
  /// size needs (workspace, backend scratch), so that memory left afterwards can all go to the
  /// KV pool. Throws OutOfMemory naming what the weights need and what the device has.
  Executor(const ModelSpec& spec, Backend& backend, DType weight_dtype, const ExecutorLimits& limits,
           int block_size, const std::vector<HostTensor>& weights);

  /// Allocates the KV pool: `num_blocks` blocks in every layer. Call once, before launch().
  void allocate_kv_cache(int num_blocks);

  /// Captures the decode graphs a run may replay so that none is recorded mid-run: every batch
  /// bucket at every block-table width up to 8192 tokens of context (wider ones are captured
  /// when first met), after an eager pass per bucket that makes its GEMM plans. Call once, after
  /// allocate_kv_cache(); without graphs it does nothing.
  void capture_graphs();
  /// Device memory capture_graphs() will take (an estimate; 0 without graphs), so that the KV
  /// pool can be sized around it.
  size_t startup_graph_bytes() const;

  /// Queues the step on the device and returns without waiting for it. A token id -1 - i in
  /// batch.token_ids stands for the token the previous launch sampled in row i, read on the
  /// device (the host need not have it yet). At most kMaxInFlight steps may be launched and not
  /// yet collected.
  void launch(const StepBatch& batch);
  /// Waits for the oldest launched step's results (that step's download only, not the steps
  /// launched after it) and returns them.
  StepResult collect();
  static constexpr int kMaxInFlight = 2;

  /// Where collect() waits rather than works, and graph captures, summed (wall clock).
  struct Timings {
    double device_wait_seconds = 0.0;    // blocked on the device for the step's results
    uint64_t graph_captures = 0;         // decode graphs captured mid-run (new bucket and width)
    double graph_capture_seconds = 0.0;  // capturing and instantiating them
    uint64_t startup_graph_captures = 0;         // by capture_graphs(), not counted above
    double startup_graph_capture_seconds = 0.0;  // all of capture_graphs(), warm-up passes too
  };
  const Timings& timings() const { return timings_; }

  /// Penalty slots in the token-count table (one per sequence that can run at once).
  int num_penalty_slots() const { return limits_.max_num_seqs; }
  static constexpr int kMaxTopLogprobs = 20;

  const KVCacheShape& kv_shape() const { return kv_shape_; }
  /// Bytes one KV block takes across all layers.
  static size_t kv_block_bytes(const ModelSpec& spec, int block_size, DType cache_dtype);

 private:
  struct Layer {
    const void* input_norm_w = nullptr;
    const void* input_norm_b = nullptr;
    const void* qkv_w = nullptr;
    const void* qkv_b = nullptr;
    const void* q_norm_w = nullptr;
    const void* k_norm_w = nullptr;
    const void* o_w = nullptr;
    const void* o_b = nullptr;
    const void* attn_out_norm_w = nullptr;  // sandwich norms
    const void* attn_out_norm_b = nullptr;
    const void* mlp_out_norm_w = nullptr;
    const void* mlp_out_norm_b = nullptr;
    const void* post_norm_w = nullptr;
    const void* post_norm_b = nullptr;
    const void* mlp_in_w = nullptr;  // gate_up (GLU) or up
    const void* mlp_in_b = nullptr;
    const void* down_w = nullptr;
    const void* down_b = nullptr;
  };

  void load_weights(const std::vector<HostTensor>& weights);
  const void* weight(const std::string& name) const;     // nullptr when absent
  /// The sizes one forward pass runs at (the batch's own, or a graph bucket's padded ones).
  struct ForwardShape {
    int32_t num_tokens;
    int32_t num_requests;
    int32_t block_table_width;
    int32_t max_query_len;
    int32_t max_context_len;
    int32_t num_decode_prefix = 0;  // leading requests with one query token (AttentionParams)
  };
  /// A decode graph's padded sizes: requests, and block-table width (a power of two of blocks,
  /// which also bounds the context the attention plan is made for).
  struct GraphKey {
    int batch = 0;  // 0: no graph, the step runs eagerly
    int table_width = 0;
    bool operator==(const GraphKey& o) const { return batch == o.batch && table_width == o.table_width; }
  };
  struct GraphKeyHash {
    size_t operator()(const GraphKey& k) const { return size_t(k.batch) << 32 | size_t(k.table_width); }
  };
  /// Uploads the step's inputs. With a graph key: in the fixed layout every graph reads, the
  /// requests padded to key.batch with empty ones (token 0 at position 0, no cache slot,
  /// context 0), block-table rows key.table_width wide at the fixed table_offset_. The first
  /// `decoding` requests (those that take the decode kernel) get a longest-context-first order.
  void upload_step(const StepBatch& batch, GraphKey graph, int32_t decoding);
  /// The graph a step can replay (the smallest bucket holding its requests, the smallest
  /// power-of-two width holding its block tables), or batch 0: the step runs eagerly (prefill,
  /// prompt logprobs, forks or beams whose rows are not one per request, no graph support).
  GraphKey graph_key_of(const StepBatch& batch) const;
  /// The graph width (in blocks) that holds block tables `table_width` blocks wide.
  int graph_width(int table_width) const;
  /// The table widths capture_graphs() records for every bucket.
  std::vector<int> startup_widths() const;
  /// The sizes a graph's forward runs at.
  ForwardShape graph_shape(GraphKey key) const;
  void forward(const ForwardShape& shape);
  void update_token_counts(const StepBatch& batch);
  /// Final norm and LM head for `rows` query rows (device indices) into logits_.
  void compute_logits(const int32_t* rows, int num_rows);
  /// A launched step's results on their way to the host.
  struct PendingResults {
    size_t num_samples = 0, num_top = 0;
    size_t num_prompt_rows = 0, num_prompt_top = 0;
    std::vector<std::byte> sampled_host;  // sampled ids, logprobs and top-N, as sampled_ holds them
    std::vector<std::byte> prompt_host;   // as prompt_logprobs_ holds them
    uint64_t ticket = 0;                  // the backend download that brings the last of them
  };
  /// Queues the sampling of the step's rows and their download; logits_ready: a graph already
  /// computed logits for rows [0, S).
  void sample(const StepBatch& batch, PendingResults& pending, bool logits_ready);
  void prompt_logprobs(const StepBatch& batch, PendingResults& pending);
  /// Queues everything launch() runs after the upload: block copies, token counts, the forward
  /// (eager or a graph's replay), sampling and prompt logprobs with their downloads.
  void enqueue_step(const StepBatch& batch, GraphKey graph_key, int32_t num_decode_prefix,
                    PendingResults& pending);
  /// Records the decode graph of `graph_key` (its forward and LM head at `shape`).
  void capture(GraphKey graph_key, const ForwardShape& shape);
  /// How many requests lead the batch with one query token each (rows 0, 1, ...).
  static int32_t decode_prefix(const StepBatch& batch);
  /// Throws unless every deferred token id names a row the previous launch sampled.
  void check_deferred_tokens(const StepBatch& batch) const;
  void run_layer(int layer_index, const ForwardShape& shape, bool first);
  /// Whether the sub-blocks' output projections add into residual_ themselves (run_layer): all
  /// but models with sandwich norms, whose outputs are normalised before the add.
  bool outputs_fold_into_residual() const { return !spec_.sandwich_norms; }
  /// Whether each sub-block's RMSNorm folds into the projection after it (sequential RMSNorm
  /// models whose outputs fold into the residual, with full rotary, no qkv or MLP bias, and
  /// bf16 or fp32 activations): at
  /// load the norm weight multiplies the input columns of qkv and gate_up (or up), those GEMMs
  /// read the residual stream itself, and the op after each (rotary + KV write, the activation)
  /// multiplies its row by the stream row's 1 / RMS (RowRmsScale): no norm launch in a layer.
  bool norms_fold_into_projections() const;
  void norm(const void* in, void* residual, void* out, int rows, const void* w, const void* b);
  void gemm(const void* in, const void* w, const void* b, void* out, int m, int n, int k,
            bool accumulate = false, bool fp32_out = false, const float* bias_f32 = nullptr);
  /// One layer's share of the KV pool (its own KV head count).
  KVCacheShape layer_kv_shape(int layer) const;

  ModelSpec spec_;
  Backend& backend_;
  DType weight_dtype_;
  DType act_dtype_;
  ExecutorLimits limits_;
  KVCacheShape kv_shape_;

  std::unordered_map<std::string, DeviceBuffer> weights_;
  std::vector<Layer> layers_;
  const void* embed_tokens_ = nullptr;
  const void* embed_positions_ = nullptr;
  const void* final_norm_w_ = nullptr;
  const void* final_norm_b_ = nullptr;
  const void* lm_head_w_ = nullptr;
  const float* lm_head_b_ = nullptr;  // fp32
  const void* embed_norm_w_ = nullptr;
  const void* embed_norm_b_ = nullptr;

  DeviceBuffer identity_rows_;  // [max_num_seqs] int32 0, 1, 2, ...: a graph's logit rows
  std::vector<int> graph_buckets_;          // padded batch sizes decode graphs are captured for
  Timings timings_;
  std::unordered_map<GraphKey, int, GraphKeyHash> graphs_;  // -> the backend's graph id
  int max_blocks_ = 0;       // blocks of a max_model_len sequence: the widest graph table
  size_t table_offset_ = 0;  // graph steps' block tables: a fixed place at the end of step_inputs_
  DeviceBuffer kv_cache_;
  std::vector<size_t> kv_layer_offsets_;  // byte offset of each layer's share, then the total
  DeviceBuffer rope_cos_sin_;   // [max_model_len, rotary_dim] fp32
  DeviceBuffer alibi_slopes_;   // [num_heads] fp32

  // Step inputs: one device buffer, one upload per step; the pointers below point into it.
  DeviceBuffer step_inputs_;
  std::vector<std::byte> step_staging_;
  std::deque<PendingResults> in_flight_;  // launched, not yet collected, oldest first
  int32_t deferrable_rows_ = 0;  // rows the last launch sampled: what a deferred token may name
  int32_t* d_token_ids_ = nullptr;
  int32_t* d_positions_ = nullptr;
  int64_t* d_slot_mapping_ = nullptr;
  int32_t* d_query_start_ = nullptr;
  int32_t* d_context_lens_ = nullptr;
  int32_t* d_request_order_ = nullptr;  // decode steps: requests by descending context
  int32_t* d_block_tables_ = nullptr;
  int32_t* d_sample_rows_ = nullptr;
  SamplingRow* d_sampling_ = nullptr;
  int32_t* d_bias_offsets_ = nullptr;
  int32_t* d_bias_token_ids_ = nullptr;
  float* d_bias_values_ = nullptr;
  BlockCopy* d_block_copies_ = nullptr;
  PenaltyRow* d_penalties_ = nullptr;
  int32_t* d_count_resets_ = nullptr;
  int32_t* d_prompt_logprob_rows_ = nullptr;
  int32_t* d_prompt_logprob_targets_ = nullptr;
  size_t max_bias_entries_ = 0;

  // Workspace, act dtype unless noted.
  DeviceBuffer residual_;   // [T, hidden]
  DeviceBuffer hidden_;     // [T, hidden] normed input of a sub-block (unless norms fold)
  DeviceBuffer hidden2_;    // [T, hidden] second norm of a two-norm parallel block
  DeviceBuffer qkv_;        // [T, q + 2 kv]
  DeviceBuffer attn_out_;   // [T, q]
  DeviceBuffer delta_;      // [T, hidden] a sub-block's output before the residual add (only
                            // with sandwich norms: outputs_fold_into_residual)
  DeviceBuffer mlp_in_;     // [T, 2 * inter]
  DeviceBuffer mlp_act_;    // [T, inter]
  DeviceBuffer sample_hidden_;  // [S, hidden]
  DeviceBuffer logits_;     // [S, vocab] fp32
  DeviceBuffer sampled_;    // [S] int32, [S] fp32 logprob, [S, top] ids and logprobs
  DeviceBuffer token_counts_;   // [max_num_seqs, vocab] int32: the penalty slots
  DeviceBuffer count_entries_;  // [kCountEntryChunk] TokenCountEntry, uploaded in chunks
  DeviceBuffer prompt_logprobs_;  // [T] logprob, [T] rank, [T, top] ids and logprobs
  static constexpr int kCountEntryChunk = 16384;
};

}  // namespace octavo
