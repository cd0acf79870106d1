#include "model/executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>

#include <octavo/error.h>

#include "backend/cpu/dtype.h"
#include "model/dtype_convert.h"
#include "model/expected_weights.h"
#include "model/rope.h"

namespace octavo {
namespace {

// Weights in another dtype are converted through a staging buffer of this size (the CUDA
// backend's pinned upload size).
constexpr size_t kConvertChunkBytes = size_t{8} << 20;
// The largest decode batch replayed from a graph (vLLM's largest capture size).
constexpr int kMaxGraphBatch = 512;
// Decode graphs for block tables up to this context are captured at start-up, wider ones when
// first met (vLLM's max_seq_len_to_capture).
constexpr int kStartupCaptureTokens = 8192;
// Device memory one captured decode graph holds, estimated as a fixed part and a part per layer:
// 0.77 and 0.80 MiB were measured on an H100 for 28- and 32-layer models (about 0.53 MiB plus
// 8 KiB a layer); both parts are taken about twice over.
constexpr size_t kGraphBytesFixed = size_t{1} << 20;
constexpr size_t kGraphBytesPerLayer = size_t{16} << 10;

// Per-row results as the sampler and token_logprobs write them, in one device region downloaded
// at once: [rows] 4-byte values (ids or logprobs), a second [rows] of 4-byte values, then
// [rows, top] ids and [rows, top] logprobs.
struct RowResults {
  size_t rows, top;
  size_t second() const { return rows * 4; }
  size_t top_ids() const { return rows * 8; }
  size_t top_logprobs() const { return rows * 8 + rows * top * 4; }
  size_t bytes() const { return rows * 8 * (1 + top); }
};

template <typename T>
void read_back(const std::vector<std::byte>& host, size_t offset, size_t count, std::vector<T>& out) {
  out.resize(count);
  if (count > 0) std::memcpy(out.data(), host.data() + offset, count * sizeof(T));
}

// Copies the four arrays of a downloaded RowResults region into the step's result vectors.
template <typename First, typename Second>
void unpack_row_results(const std::vector<std::byte>& host, const RowResults& l,
                        std::vector<First>& first, std::vector<Second>& second,
                        std::vector<int32_t>& top_ids, std::vector<float>& top_logprobs) {
  static_assert(sizeof(First) == 4 && sizeof(Second) == 4);
  read_back(host, 0, l.rows, first);
  read_back(host, l.second(), l.rows, second);
  read_back(host, l.top_ids(), l.rows * l.top, top_ids);
  read_back(host, l.top_logprobs(), l.rows * l.top, top_logprobs);
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ALiBi slopes as BLOOM and MPT define them: a geometric sequence from 2^(-8/n) for the nearest
// power of two n, interleaved with the odd steps of the next power when heads are not a power of 2.
std::vector<float> alibi_slopes(int num_heads) {
  int closest = 1;
  while (closest * 2 <= num_heads) closest *= 2;
  const double base = std::pow(2.0, -std::pow(2.0, -(std::log2(closest) - 3)));
  std::vector<float> slopes;
  for (int i = 1; i <= closest; ++i) slopes.push_back(float(std::pow(base, i)));
  if (closest != num_heads) {
    const double extra_base = std::pow(2.0, -std::pow(2.0, -(std::log2(2 * closest) - 3)));
    for (int i = 1; int(slopes.size()) < num_heads; i += 2) {
      slopes.push_back(float(std::pow(extra_base, i)));
    }
  }
  return slopes;
}

template <typename T>
T* carve(std::byte*& cursor, size_t count) {
  constexpr size_t kAlign = 64;
  T* out = reinterpret_cast<T*>(cursor);
  cursor += (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

void StepBatch::clear() {
  token_ids.clear();
  positions.clear();
  slot_mapping.clear();
  query_start.assign(1, 0);
  context_lens.clear();
  block_tables.clear();
  block_table_width = 0;
  max_query_len = 0;
  max_context_len = 0;
  block_copies.clear();
  sample_rows.clear();
  sampling.clear();
  bias_offsets.assign(1, 0);
  bias_token_ids.clear();
  bias_values.clear();
  num_top_logprobs = 0;
  penalties.clear();
  count_resets.clear();
  count_entries.clear();
  prompt_logprob_rows.clear();
  prompt_logprob_targets.clear();
  num_prompt_top_logprobs = 0;
}

size_t Executor::kv_block_bytes(const ModelSpec& spec, int block_size, DType cache_dtype) {
  size_t bytes = 0;
  for (int l = 0; l < spec.num_layers; ++l) {
    bytes += KVCacheShape{1, 1, spec.kv_heads_of(l), block_size, spec.head_dim, cache_dtype}.block_bytes();
  }
  return bytes;
}

KVCacheShape Executor::layer_kv_shape(int layer) const {
  KVCacheShape shape = kv_shape_;
  shape.num_layers = 1;
  shape.num_kv_heads = spec_.kv_heads_of(layer);
  return shape;
}

Executor::Executor(const ModelSpec& spec, Backend& backend, DType weight_dtype,
                   const ExecutorLimits& limits, int block_size,
                   const std::vector<HostTensor>& weights)
    : spec_(spec),
      backend_(backend),
      weight_dtype_(weight_dtype),
      act_dtype_(backend.act_dtype(weight_dtype)),
      limits_(limits) {
  spec_.validate();
  load_weights(weights);

  kv_shape_ = KVCacheShape{spec_.num_layers, 0, spec_.num_kv_heads, block_size, spec_.head_dim,
                           weight_dtype_};

  if (spec_.positions == PositionKind::kRotary) {
    std::vector<float> table = rope_cos_sin_table(spec_.rope, spec_.head_dim, limits_.max_model_len);
    rope_cos_sin_ = DeviceBuffer(backend_, table.size() * sizeof(float));
    backend_.upload(rope_cos_sin_.data(), table.data(), table.size() * sizeof(float));
  }
  if (spec_.positions == PositionKind::kAlibi) {
    std::vector<float> slopes = alibi_slopes(spec_.num_heads);
    for (float& slope : slopes) slope *= spec_.alibi_slope_scale;
    alibi_slopes_ = DeviceBuffer(backend_, slopes.size() * sizeof(float));
    backend_.upload(alibi_slopes_.data(), slopes.data(), slopes.size() * sizeof(float));
  }

  const size_t T = limits_.max_num_tokens, S = limits_.max_num_seqs;
  const size_t act = dtype_size(act_dtype_);
  const size_t hidden = spec_.hidden_size, inter = spec_.intermediate_size;
  residual_ = DeviceBuffer(backend_, T * hidden * act);
  if (!norms_fold_into_projections()) hidden_ = DeviceBuffer(backend_, T * hidden * act);
  if (spec_.residual == ResidualKind::kParallelTwoNorms) hidden2_ = DeviceBuffer(backend_, T * hidden * act);
  qkv_ = DeviceBuffer(backend_, T * (spec_.q_size() + 2 * size_t(spec_.max_kv_heads()) * spec_.head_dim) * act);
  attn_out_ = DeviceBuffer(backend_, T * spec_.q_size() * act);
  if (!outputs_fold_into_residual()) delta_ = DeviceBuffer(backend_, T * hidden * act);
  mlp_in_ = DeviceBuffer(backend_, T * (is_glu(spec_.activation) ? 2 : 1) * inter * act);
  mlp_act_ = DeviceBuffer(backend_, T * inter * act);
  sample_hidden_ = DeviceBuffer(backend_, S * hidden * act);
  logits_ = DeviceBuffer(backend_, S * size_t(spec_.vocab_size) * sizeof(float));
  sampled_ = DeviceBuffer(backend_, S * (sizeof(int32_t) + sizeof(float)) * (1 + kMaxTopLogprobs));
  token_counts_ = DeviceBuffer(backend_, S * size_t(spec_.vocab_size) * sizeof(int32_t));
  count_entries_ = DeviceBuffer(backend_, kCountEntryChunk * sizeof(TokenCountEntry));
  prompt_logprobs_ = DeviceBuffer(backend_, T * (sizeof(int32_t) + sizeof(float)) * (1 + kMaxTopLogprobs));

  // Step inputs: sized for the largest step so that the per-step upload never reallocates.
  const size_t max_blocks = (limits_.max_model_len + block_size - 1) / block_size;
  max_blocks_ = int(max_blocks);
  max_bias_entries_ = S * size_t(std::max(limits_.max_bias_per_seq, 1));
  size_t step_bytes = 64 * 16 + T * (4 + 4 + 8) + (S + 1) * 4 + 2 * S * 4 + S * max_blocks * 4 +
                            S * 4 + S * sizeof(SamplingRow) + (S + 1) * 4 +
                            max_bias_entries_ * 8 + S * sizeof(BlockCopy) * 4 +
                            S * sizeof(PenaltyRow) + S * 4 + T * 8;
  // Graph steps' tables get their own region after the rest, so a step uploads only the rows
  // and width its graph reads rather than the whole [max_num_seqs, max_blocks] capacity.
  table_offset_ = (step_bytes + 15) / 16 * 16;
  step_bytes = table_offset_ + S * max_blocks * 4;
  step_inputs_ = DeviceBuffer(backend_, step_bytes);
  step_staging_.resize(step_bytes);

  if (limits_.use_graphs && backend_.supports_graphs()) {
    // vLLM's capture sizes: 1, 2, 4, then every multiple of 8 up to the running-request cap.
    for (int b : {1, 2, 4}) {
      if (b < limits_.max_num_seqs) graph_buckets_.push_back(b);
    }
    // Larger batches run eagerly: their launch overhead is small beside their work.
    const int largest = std::min(limits_.max_num_seqs, kMaxGraphBatch);
    for (int b = 8; b < largest; b += 8) graph_buckets_.push_back(b);
    graph_buckets_.push_back(largest);
    std::vector<int32_t> identity(limits_.max_num_seqs);
    for (int i = 0; i < limits_.max_num_seqs; ++i) identity[i] = i;
    identity_rows_ = DeviceBuffer(backend_, identity.size() * sizeof(int32_t));
    backend_.upload(identity_rows_.data(), identity.data(), identity.size() * sizeof(int32_t));
  }

  BackendLimits backend_limits;
  backend_limits.max_num_tokens = limits_.max_num_tokens;
  backend_limits.max_num_seqs = limits_.max_num_seqs;
  backend_limits.max_model_len = limits_.max_model_len;
  backend_limits.num_heads = spec_.num_heads;
  for (int l = 0; l < spec_.num_layers; ++l) {
    std::vector<int>& counts = backend_limits.kv_head_counts;
    if (std::find(counts.begin(), counts.end(), spec_.kv_heads_of(l)) == counts.end()) {
      counts.push_back(spec_.kv_heads_of(l));
    }
  }
  backend_limits.head_dim = spec_.head_dim;
  backend_limits.vocab_size = spec_.vocab_size;
  backend_limits.max_top_logprobs = kMaxTopLogprobs;
  backend_.reserve_workspace(backend_limits);
}

void Executor::allocate_kv_cache(int num_blocks) {
  if (kv_cache_.data()) throw InvalidArgument("executor: the KV pool is already allocated");
  kv_shape_.num_blocks = num_blocks;
  // Layers may differ in KV heads (num_kv_heads_per_layer): each starts where the previous ends.
  kv_layer_offsets_.assign(1, 0);
  for (int l = 0; l < spec_.num_layers; ++l) {
    kv_layer_offsets_.push_back(kv_layer_offsets_.back() + layer_kv_shape(l).layer_bytes());
  }
  kv_cache_ = DeviceBuffer(backend_, kv_layer_offsets_.back());
}

bool Executor::norms_fold_into_projections() const {
  const bool rms = spec_.norm == NormKind::kRMSNorm || spec_.norm == NormKind::kRMSNormPlusOne;
  // fp16 keeps the norms: the unnormalised stream times the weights can leave its range (LLM
  // residual streams carry outliers in the thousands); bf16 and fp32 have fp32's exponent range.
  return rms && act_dtype_ != DType::kFloat16 && !spec_.norm_bias &&
         spec_.residual == ResidualKind::kSequential && outputs_fold_into_residual() &&
         spec_.positions == PositionKind::kRotary && spec_.rotary_dim() == spec_.head_dim &&
         !spec_.qkv_bias && !spec_.mlp_bias;
}

namespace {

// Uploads t ([rows, K] in `source`) into `buffer` as `stored`, column k multiplied by scale[k]
// (in fp32, then one rounding): a norm's weight folded into the projection after it.
void upload_column_scaled(Backend& backend, const HostTensor& t, DType source, DType stored,
                          const std::vector<float>& scale, DeviceBuffer& buffer) {
  const int64_t K = int64_t(scale.size());
  int64_t rows = 1;
  for (int64_t d : t.shape) rows *= d;
  rows /= K;
  const int64_t chunk_rows =
      std::max<int64_t>(1, int64_t(kConvertChunkBytes / (K * sizeof(float))));
  std::vector<float> row_f32(size_t(chunk_rows * K));
  std::vector<std::byte> staging(size_t(chunk_rows * K) * dtype_size(stored));
  const auto* src = static_cast<const std::byte*>(t.data);
  for (int64_t first = 0; first < rows; first += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - first);
#pragma omp parallel for schedule(static) if (n * K >= (int64_t{1} << 16))
    for (int64_t r = 0; r < n; ++r) {
      float* row = row_f32.data() + r * K;
      convert_dtype(src + (first + r) * K * dtype_size(source), source, row, DType::kFloat32, K);
      for (int64_t k = 0; k < K; ++k) row[k] *= scale[k];
      convert_dtype(row, DType::kFloat32, staging.data() + r * K * dtype_size(stored), stored, K);
    }
    backend.upload(buffer.as<std::byte>() + first * K * dtype_size(stored), staging.data(),
                   size_t(n * K) * dtype_size(stored));
  }
}

}  // namespace

void Executor::load_weights(const std::vector<HostTensor>& weights) {
  if (std::optional<MemoryInfo> memory = backend_.memory_info()) {
    size_t needed = 0;
    for (const ExpectedWeight& e : expected_weights(spec_)) {
      size_t count = 1;
      for (int64_t d : e.shape) count *= size_t(d);
      needed += count * dtype_size(weight_dtype_);
    }
    if (needed > memory->free_bytes) {
      throw OutOfMemory(spec_.architecture + " weights need " + std::to_string(needed >> 20) +
                        " MiB in " + std::string(cpu::dtype_name(weight_dtype_)) + "; " +
                        backend_.name() + " has " + std::to_string(memory->free_bytes >> 20) +
                        " MiB free of " + std::to_string(memory->total_bytes >> 20) + " MiB");
    }
  }
  std::unordered_map<std::string, const HostTensor*> by_name;
  std::vector<std::byte> staging;
  for (const HostTensor& t : weights) {
    if (!by_name.emplace(t.name, &t).second) {
      throw FormatError("weight '" + t.name + "' was given twice");
    }
  }
  // With norms_fold_into_projections(): the projection weights and the norm each is scaled by.
  std::unordered_map<std::string, const HostTensor*> column_scales;
  if (norms_fold_into_projections()) {
    const std::string mlp_in = is_glu(spec_.activation) ? "gate_up" : "up";
    for (int l = 0; l < spec_.num_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      for (const auto& [projection, norm] : {std::pair{p + "qkv.weight", p + "input_norm.weight"},
                                             std::pair{p + mlp_in + ".weight",
                                                       p + "post_attn_norm.weight"}}) {
        auto it = by_name.find(norm);
        if (it != by_name.end()) column_scales[projection] = it->second;
      }
    }
  }
  for (const ExpectedWeight& e : expected_weights(spec_)) {
    auto it = by_name.find(e.name);
    if (it == by_name.end()) {
      throw FormatError("missing weight '" + e.name + "' (shape " + shape_string(e.shape) + ") for " +
                        spec_.architecture);
    }
    const HostTensor& t = *it->second;
    if (t.shape != e.shape) {
      throw FormatError("weight '" + e.name + "' has shape " + shape_string(t.shape) + "; " +
                        spec_.architecture + " with this config needs " + shape_string(e.shape));
    }
    const DType source = parse_dtype(t.dtype, "weight '" + e.name + "'");
    size_t count = 1;
    for (int64_t d : t.shape) count *= size_t(d);
    // The LM head's bias is added to fp32 logits: it is kept in fp32.
    const DType stored = e.name == "lm_head.bias" ? DType::kFloat32 : weight_dtype_;
    DeviceBuffer buffer(backend_, count * dtype_size(stored));
    if (auto scaled = column_scales.find(e.name); scaled != column_scales.end()) {
      const HostTensor& norm = *scaled->second;
      if (norm.shape != std::vector<int64_t>{spec_.hidden_size}) {
        throw FormatError("weight '" + norm.name + "' has shape " + shape_string(norm.shape) +
                          "; " + spec_.architecture + " with this config needs [" +
                          std::to_string(spec_.hidden_size) + "]");
      }
      std::vector<float> scale(size_t(spec_.hidden_size));
      convert_dtype(norm.data, parse_dtype(norm.dtype, "weight '" + norm.name + "'"), scale.data(),
                    DType::kFloat32, scale.size());
      if (spec_.norm == NormKind::kRMSNormPlusOne) {
        for (float& w : scale) w += 1.0f;  // (1 + w) in fp32, as HF forms it
      }
      upload_column_scaled(backend_, t, source, stored, scale, buffer);
    } else if (source == stored) {
      backend_.upload(buffer.data(), t.data, count * dtype_size(stored));
    } else {
      // Converted a slice at a time through one staging buffer: no whole-model host copy.
      const size_t chunk = kConvertChunkBytes / dtype_size(stored);
      staging.resize(std::min(count, chunk) * dtype_size(stored));
      for (size_t first = 0; first < count; first += chunk) {
        const size_t n = std::min(chunk, count - first);
        convert_dtype(static_cast<const std::byte*>(t.data) + first * dtype_size(source), source,
                      staging.data(), stored, n);
        backend_.upload(buffer.as<std::byte>() + first * dtype_size(stored), staging.data(),
                        n * dtype_size(stored));
      }
    }
    weights_.emplace(e.name, std::move(buffer));
    by_name.erase(it);
  }
  if (!by_name.empty()) {
    throw FormatError("unexpected weight '" + by_name.begin()->first + "' for " +
                      spec_.architecture + " (" + std::to_string(by_name.size()) +
                      " weights the spec does not use)");
  }

  embed_tokens_ = weight("embed_tokens.weight");
  embed_positions_ = weight("embed_positions.weight");
  final_norm_w_ = weight("final_norm.weight");
  final_norm_b_ = weight("final_norm.bias");
  lm_head_w_ = spec_.tied_embeddings ? embed_tokens_ : weight("lm_head.weight");
  lm_head_b_ = static_cast<const float*>(weight("lm_head.bias"));
  embed_norm_w_ = weight("embed_norm.weight");
  embed_norm_b_ = weight("embed_norm.bias");
  const bool glu = is_glu(spec_.activation);
  for (int l = 0; l < spec_.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    Layer layer;
    layer.input_norm_w = weight(p + "input_norm.weight");
    layer.input_norm_b = weight(p + "input_norm.bias");
    layer.qkv_w = weight(p + "qkv.weight");
    layer.qkv_b = weight(p + "qkv.bias");
    layer.q_norm_w = weight(p + "q_norm.weight");
    layer.k_norm_w = weight(p + "k_norm.weight");
    layer.o_w = weight(p + "o.weight");
    layer.o_b = weight(p + "o.bias");
    layer.attn_out_norm_w = weight(p + "attn_out_norm.weight");
    layer.attn_out_norm_b = weight(p + "attn_out_norm.bias");
    layer.mlp_out_norm_w = weight(p + "mlp_out_norm.weight");
    layer.mlp_out_norm_b = weight(p + "mlp_out_norm.bias");
    layer.post_norm_w = weight(p + "post_attn_norm.weight");
    layer.post_norm_b = weight(p + "post_attn_norm.bias");
    layer.mlp_in_w = weight(p + (glu ? "gate_up.weight" : "up.weight"));
    layer.mlp_in_b = weight(p + (glu ? "gate_up.bias" : "up.bias"));
    layer.down_w = weight(p + "down.weight");
    layer.down_b = weight(p + "down.bias");
    layers_.push_back(layer);
  }
}

const void* Executor::weight(const std::string& name) const {
  auto it = weights_.find(name);
  return it == weights_.end() ? nullptr : it->second.data();
}

int32_t Executor::decode_prefix(const StepBatch& b) {
  int32_t r = 0;
  while (r < b.num_requests() && b.query_start[size_t(r) + 1] == r + 1) ++r;
  return r;
}

void Executor::check_deferred_tokens(const StepBatch& b) const {
  auto check = [&](int32_t id, const char* what, size_t index) {
    if (id < 0 && -int64_t{id} > deferrable_rows_) {
      throw InvalidArgument(std::string(what) + " " + std::to_string(index) +
                            " defers to sampled row " + std::to_string(-int64_t{id} - 1) +
                            " of the previous step, which sampled " +
                            std::to_string(deferrable_rows_) + " rows");
    }
  };
  for (size_t t = 0; t < b.token_ids.size(); ++t) check(b.token_ids[t], "step token", t);
  for (size_t i = 0; i < b.count_entries.size(); ++i) {
    check(b.count_entries[i].token, "token-count entry", i);
  }
}

Executor::GraphKey Executor::graph_key_of(const StepBatch& b) const {
  if (graph_buckets_.empty() || b.max_query_len != 1 || b.num_prompt_logprob_rows() > 0 ||
      b.num_samples() != b.num_requests() || b.num_requests() > graph_buckets_.back()) {
    return {};
  }
  for (int r = 0; r < b.num_samples(); ++r) {
    if (b.sample_rows[r] != r) return {};
  }
  return {*std::lower_bound(graph_buckets_.begin(), graph_buckets_.end(), b.num_requests()),
          graph_width(b.block_table_width)};
}

int Executor::graph_width(int table_width) const {
  // Widths from 16 blocks up in powers of two: few graphs per batch bucket, and an attention
  // plan made for at most twice the longest context rather than for max_model_len.
  int width = 16;
  while (width < table_width) width *= 2;
  return std::min(width, max_blocks_);
}

void Executor::capture_graphs() {
  if (graph_buckets_.empty()) return;
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int> widths = startup_widths();
  StepBatch padding_only;  // no requests: every row of the bucket is padding
  padding_only.query_start = {0};
  for (int bucket : graph_buckets_) {
    for (int width : widths) {
      const GraphKey key{bucket, width};
      const ForwardShape shape = graph_shape(key);
      upload_step(padding_only, key, 0);
      if (width == widths.front()) {
        // An eager pass per bucket makes its GEMM plans (cuBLASLt's heuristic) outside a
        // capture. Kernels a capture meets first load inside it, as drivers from CUDA 12.3 allow.
        forward(shape);
        compute_logits(identity_rows_.as<int32_t>(), bucket);
      }
      capture(key, shape);
      ++timings_.startup_graph_captures;
    }
  }
  backend_.synchronize();
  timings_.startup_graph_capture_seconds += seconds_since(start);
}

std::vector<int> Executor::startup_widths() const {
  std::vector<int> widths{graph_width(1)};
  while (widths.back() < max_blocks_ &&
         int64_t(widths.back()) * kv_shape_.block_size < kStartupCaptureTokens) {
    widths.push_back(graph_width(widths.back() + 1));
  }
  return widths;
}

size_t Executor::startup_graph_bytes() const {
  if (graph_buckets_.empty()) return 0;
  return graph_buckets_.size() * startup_widths().size() *
         (kGraphBytesFixed + size_t(spec_.num_layers) * kGraphBytesPerLayer);
}

Executor::ForwardShape Executor::graph_shape(GraphKey key) const {
  return {key.batch, key.batch, key.table_width, 1,
          std::min(limits_.max_model_len, key.table_width * kv_shape_.block_size)};
}

void Executor::upload_step(const StepBatch& b, GraphKey graph_key, int32_t decoding) {
  const int32_t T = b.num_tokens(), R = b.num_requests(), S = b.num_samples();
  const size_t bias_entries = b.bias_token_ids.size();
  const int32_t P = b.num_prompt_logprob_rows();
  if (T > limits_.max_num_tokens || R > limits_.max_num_seqs || S > limits_.max_num_seqs ||
      bias_entries > max_bias_entries_ || b.block_copies.size() > size_t(4 * limits_.max_num_seqs) ||
      (!b.penalties.empty() && b.penalties.size() != size_t(S)) ||
      b.count_resets.size() > size_t(S) || P > T ||
      b.prompt_logprob_targets.size() != size_t(P)) {
    throw InvalidArgument("step of " + std::to_string(T) + " tokens, " + std::to_string(R) +
                          " requests exceeds the executor's limits (" +
                          std::to_string(limits_.max_num_tokens) + " tokens, " +
                          std::to_string(limits_.max_num_seqs) + " requests)");
  }
  std::byte* base = step_staging_.data();
  std::byte* cursor = base;
  auto stage = [&](auto* dst_host, const auto& src) {
    // An empty vector's data() may be null, which memcpy may not take even for 0 bytes.
    if (!src.empty()) std::memcpy(dst_host, src.data(), src.size() * sizeof(src[0]));
  };
  // What a forward pass reads comes first; graph steps carve it at fixed capacities so that every
  // graph finds its inputs at the addresses it was captured with.
  const bool graph = graph_key.batch > 0;
  const size_t token_capacity = graph ? size_t(limits_.max_num_seqs) : size_t(T);
  const size_t request_capacity = graph ? size_t(limits_.max_num_seqs) : size_t(R);
  int32_t* token_ids = carve<int32_t>(cursor, token_capacity);
  int32_t* positions = carve<int32_t>(cursor, token_capacity);
  int64_t* slots = carve<int64_t>(cursor, token_capacity);
  int32_t* query_start = carve<int32_t>(cursor, request_capacity + 1);
  int32_t* context_lens = carve<int32_t>(cursor, request_capacity);
  int32_t* request_order = carve<int32_t>(cursor, request_capacity);
  int32_t* block_tables = graph ? reinterpret_cast<int32_t*>(base + table_offset_)
                                : carve<int32_t>(cursor, b.block_tables.size());
  int32_t* sample_rows = carve<int32_t>(cursor, S);
  SamplingRow* sampling = carve<SamplingRow>(cursor, S);
  int32_t* bias_offsets = carve<int32_t>(cursor, S + 1);
  int32_t* bias_ids = carve<int32_t>(cursor, bias_entries);
  float* bias_values = carve<float>(cursor, bias_entries);
  BlockCopy* copies = carve<BlockCopy>(cursor, b.block_copies.size());
  PenaltyRow* penalties = carve<PenaltyRow>(cursor, b.penalties.size());
  int32_t* count_resets = carve<int32_t>(cursor, b.count_resets.size());
  int32_t* prompt_rows = carve<int32_t>(cursor, P);
  int32_t* prompt_targets = carve<int32_t>(cursor, P);
  stage(token_ids, b.token_ids);
  stage(positions, b.positions);
  stage(slots, b.slot_mapping);
  stage(query_start, b.query_start);
  stage(context_lens, b.context_lens);
  const size_t graph_table_bytes =
      graph ? size_t(graph_key.batch) * graph_key.table_width * sizeof(int32_t) : 0;
  if (graph) {
    const int B = graph_key.batch, W = graph_key.table_width;
    for (int i = T; i < B; ++i) {
      token_ids[i] = 0;
      positions[i] = 0;
      slots[i] = -1;  // padding writes no cache slot
    }
    for (int r = R; r < B; ++r) {
      query_start[r + 1] = query_start[r] + 1;
      context_lens[r] = 0;  // padding attends to nothing
    }
    // Rows at the graph's width; what no request covers (the columns past the step's width and
    // the padding rows) is zeroed, so a graph never reads a stale block id.
    const size_t width = size_t(b.block_table_width);
    for (int r = 0; r < R; ++r) {
      int32_t* row = block_tables + size_t(r) * W;
      std::memcpy(row, b.block_tables.data() + size_t(r) * width, width * sizeof(int32_t));
      std::memset(row + width, 0, (size_t(W) - width) * sizeof(int32_t));
    }
    std::memset(block_tables + size_t(R) * W, 0, size_t(B - R) * W * sizeof(int32_t));
  } else {
    stage(block_tables, b.block_tables);
  }
  // Decode attention starts the longest contexts first; graph padding rows (empty) go last.
  if (decoding > 0 || graph) {
    const int rows = graph ? graph_key.batch : R;
    for (int r = 0; r < rows; ++r) request_order[r] = r;
    std::stable_sort(request_order, request_order + decoding, [&](int32_t x, int32_t y) {
      return b.context_lens[size_t(x)] > b.context_lens[size_t(y)];
    });
  }
  stage(sample_rows, b.sample_rows);
  stage(sampling, b.sampling);
  stage(bias_offsets, b.bias_offsets);
  stage(bias_ids, b.bias_token_ids);
  stage(bias_values, b.bias_values);
  stage(copies, b.block_copies);
  stage(penalties, b.penalties);
  stage(count_resets, b.count_resets);
  stage(prompt_rows, b.prompt_logprob_rows);
  stage(prompt_targets, b.prompt_logprob_targets);
  const size_t used = size_t(cursor - base);
  backend_.upload(step_inputs_.data(), base, used);
  if (graph) {
    backend_.upload(step_inputs_.as<std::byte>() + table_offset_, block_tables, graph_table_bytes);
  }

  auto device = [&](auto* host_pointer) {
    using T = std::remove_pointer_t<decltype(host_pointer)>;
    return reinterpret_cast<T*>(step_inputs_.as<std::byte>() +
                                (reinterpret_cast<std::byte*>(host_pointer) - base));
  };
  d_token_ids_ = device(token_ids);
  d_positions_ = device(positions);
  d_slot_mapping_ = device(slots);
  d_query_start_ = device(query_start);
  d_context_lens_ = device(context_lens);
  d_request_order_ = device(request_order);
  d_block_tables_ = device(block_tables);
  d_sample_rows_ = device(sample_rows);
  d_sampling_ = device(sampling);
  d_bias_offsets_ = device(bias_offsets);
  d_bias_token_ids_ = device(bias_ids);
  d_bias_values_ = device(bias_values);
  d_block_copies_ = device(copies);
  d_penalties_ = device(penalties);
  d_count_resets_ = device(count_resets);
  d_prompt_logprob_rows_ = device(prompt_rows);
  d_prompt_logprob_targets_ = device(prompt_targets);
}

void Executor::update_token_counts(const StepBatch& b) {
  TokenCountParams p{};
  p.counts = token_counts_.as<int32_t>();
  p.reset_slots = d_count_resets_;
  p.num_resets = int32_t(b.count_resets.size());
  p.entries = count_entries_.as<TokenCountEntry>();
  p.deferred_token_ids = sampled_.as<int32_t>();  // this step has not sampled yet
  p.num_slots = num_penalty_slots();
  p.vocab_size = spec_.vocab_size;
  // Rebuilding a slot uploads a whole prompt's tokens: rare, so chunks through a fixed buffer
  // rather than a buffer sized for the worst step. Each upload is ordered after the previous
  // chunk's kernel on the backend's stream.
  size_t done = 0;
  do {
    const size_t n = std::min(b.count_entries.size() - done, size_t(kCountEntryChunk));
    if (n > 0) {
      backend_.upload(count_entries_.data(), b.count_entries.data() + done,
                      n * sizeof(TokenCountEntry));
    }
    p.num_entries = int32_t(n);
    backend_.update_token_counts(p);
    p.num_resets = 0;
    done += n;
  } while (done < b.count_entries.size());
}

void Executor::norm(const void* in, void* residual, void* out, int rows, const void* w,
                    const void* b) {
  NormParams p{};
  p.in = in;
  p.residual = residual;
  p.out = out;
  p.weight = w;
  p.bias = b;
  p.rows = rows;
  p.hidden = spec_.hidden_size;
  p.row_stride = spec_.hidden_size;
  p.eps = spec_.norm_eps;
  p.kind = uint8_t(spec_.norm);
  p.weight_dtype = weight_dtype_;
  p.act_dtype = act_dtype_;
  backend_.norm(p);
}

void Executor::gemm(const void* in, const void* w, const void* b, void* out, int m, int n, int k,
                    bool accumulate, bool fp32_out, const float* bias_f32) {
  GemmParams p{};
  p.in = in;
  p.weight = w;
  p.bias = b;
  p.bias_f32 = bias_f32;
  p.out = out;
  p.m = m;
  p.n = n;
  p.k = k;
  p.in_stride = k;
  p.out_stride = n;
  p.accumulate = accumulate;
  p.weight_dtype = weight_dtype_;
  p.act_dtype = act_dtype_;
  p.out_dtype = fp32_out ? DType::kFloat32 : act_dtype_;
  backend_.gemm(p);
}

// One decoder layer. A sub-block's output projection adds its result into residual_ itself
// (the GEMM's accumulate, beta = 1), so each norm reads the one stream it normalises: a separate
// residual add + norm read two tensors and wrote two (H100, Llama-3.1-8B at 512 rows: 5.8 us
// a norm). With sandwich norms (a norm on the sub-block's output before the add) the output waits
// in delta_ instead and the next norm folds it in: on entry residual_ then holds the stream minus
// the previous layer's last output (the first layer: the embeddings, delta_ unused).
void Executor::run_layer(int l, const ForwardShape& f, bool first) {
  const Layer& w = layers_[l];
  const int T = f.num_tokens;
  const int hidden = spec_.hidden_size, q_size = spec_.q_size(), kv_size = spec_.kv_size_of(l);
  const int num_kv_heads = spec_.kv_heads_of(l);
  const size_t act = dtype_size(act_dtype_);
  const bool folded = outputs_fold_into_residual();
  void* const sub_block_out = folded ? residual_.data() : delta_.data();
  // Normalises the residual stream into `out`, first adding delta_ into it when a sub-block's
  // output is still waiting there.
  auto norm_stream = [&](void* out, const void* nw, const void* nb, bool delta_waits) {
    if (delta_waits) {
      norm(delta_.data(), residual_.data(), out, T, nw, nb);
    } else {
      norm(residual_.data(), nullptr, out, T, nw, nb);
    }
  };

  // With folded norms the GEMMs read the stream and the ops after them scale each row.
  const bool fold_norms = norms_fold_into_projections();
  const RowRmsScale stream_scale =
      fold_norms ? RowRmsScale{residual_.data(), hidden, hidden, spec_.norm_eps} : RowRmsScale{};
  const void* const normed = fold_norms ? residual_.data() : hidden_.data();
  if (!fold_norms) norm_stream(hidden_.data(), w.input_norm_w, w.input_norm_b, !first && !folded);
  if (spec_.residual == ResidualKind::kParallelTwoNorms) {
    norm_stream(hidden2_.data(), w.post_norm_w, w.post_norm_b, /*delta_waits=*/false);
  }

  // QKV: one fused GEMM writes [T, q | k | v]; q, k and v are strided views into it.
  const int width = q_size + 2 * kv_size;
  auto* qkv = qkv_.as<std::byte>();
  gemm(normed, w.qkv_w, w.qkv_b, qkv, T, width, hidden);
  void* q = qkv;
  void* k = qkv + size_t(q_size) * act;
  void* v = qkv + size_t(q_size + kv_size) * act;
  const int64_t q_stride = width, kv_stride = width;
  void* layer_cache = kv_cache_.as<std::byte>() + kv_layer_offsets_[l];
  WriteKVParams wkv{};
  wkv.k = k;
  wkv.v = v;
  wkv.layer_cache = layer_cache;
  wkv.slot_mapping = d_slot_mapping_;
  wkv.num_tokens = T;
  wkv.num_kv_heads = num_kv_heads;
  wkv.head_dim = spec_.head_dim;
  wkv.block_size = kv_shape_.block_size;
  wkv.k_stride = wkv.v_stride = kv_stride;
  wkv.act_dtype = act_dtype_;
  wkv.cache_dtype = kv_shape_.dtype;
  wkv.v_row_scale = stream_scale;
  RotaryParams r{};
  r.q = q;
  r.k = k;
  r.num_tokens = T;
  r.num_heads = spec_.num_heads;
  r.num_kv_heads = num_kv_heads;
  r.head_dim = spec_.head_dim;
  r.q_stride = q_stride;
  r.k_stride = kv_stride;
  r.act_dtype = act_dtype_;
  r.row_scale = stream_scale;
  if (spec_.qk_norm) {
    r.q_norm_weight = w.q_norm_w;
    r.k_norm_weight = w.k_norm_w;
    r.qk_norm_eps = spec_.norm_eps;
    r.qk_norm_plus_one = spec_.norm == NormKind::kRMSNormPlusOne;
    r.norm_weight_dtype = weight_dtype_;
  }
  if (spec_.positions == PositionKind::kRotary) {  // QK norm, rotation and cache write in one op
    r.positions = d_positions_;
    r.cos_sin = rope_cos_sin_.as<float>();
    r.rotary_dim = spec_.rotary_dim();
    r.max_position = limits_.max_model_len;
    r.pairing = uint8_t(spec_.rope.pairing);
    backend_.rotary_write_kv(r, wkv);
  } else {
    if (spec_.qk_norm) {
      backend_.norm(qk_norm_params(r, /*k_heads=*/false));
      backend_.norm(qk_norm_params(r, /*k_heads=*/true));
    }
    backend_.write_kv(wkv);
  }

  AttentionParams a{};
  a.q = q;
  a.layer_cache = layer_cache;
  a.out = attn_out_.data();
  a.query_start = d_query_start_;
  a.context_lens = d_context_lens_;
  a.request_order = f.max_query_len == 1 || f.num_decode_prefix > 0 ? d_request_order_ : nullptr;
  a.num_decode_prefix = f.num_decode_prefix;
  a.block_tables = d_block_tables_;
  a.alibi_slopes = spec_.positions == PositionKind::kAlibi ? alibi_slopes_.as<float>() : nullptr;
  a.num_requests = f.num_requests;
  a.num_tokens = T;
  a.num_heads = spec_.num_heads;
  a.num_kv_heads = num_kv_heads;
  a.head_dim = spec_.head_dim;
  a.block_size = kv_shape_.block_size;
  a.max_blocks_per_request = f.block_table_width;
  a.q_stride = q_stride;
  a.sliding_window = spec_.window_of(l);
  a.max_query_len = f.max_query_len;
  a.max_context_len = f.max_context_len;
  a.scale = spec_.softmax_scale();
  a.softcap = spec_.attn_logit_softcap;
  a.act_dtype = act_dtype_;
  a.cache_dtype = kv_shape_.dtype;
  backend_.paged_attention(a);

  gemm(attn_out_.data(), w.o_w, w.o_b, sub_block_out, T, hidden, q_size, /*accumulate=*/folded);
  if (spec_.sandwich_norms) {
    norm(delta_.data(), nullptr, delta_.data(), T, w.attn_out_norm_w, w.attn_out_norm_b);
  }

  const void* mlp_input = normed;
  if (spec_.residual == ResidualKind::kSequential) {
    if (!fold_norms) norm_stream(hidden_.data(), w.post_norm_w, w.post_norm_b, !folded);
  } else if (spec_.residual == ResidualKind::kParallelTwoNorms) {
    mlp_input = hidden2_.data();
  }
  const int inter = spec_.intermediate_size;
  const bool glu = is_glu(spec_.activation);
  gemm(mlp_input, w.mlp_in_w, w.mlp_in_b, mlp_in_.data(), T, (glu ? 2 : 1) * inter, hidden);
  ActivationParams ap{};
  ap.in = mlp_in_.data();
  ap.out = mlp_act_.data();
  ap.num_tokens = T;
  ap.inter = inter;
  ap.activation = uint8_t(spec_.activation);
  ap.act_dtype = act_dtype_;
  ap.row_scale = stream_scale;
  backend_.activation(ap);
  // Unfolded, parallel blocks sum attention and MLP into one delta; sequential ones start a
  // fresh delta.
  const bool accumulate = folded || spec_.residual != ResidualKind::kSequential;
  gemm(mlp_act_.data(), w.down_w, w.down_b, sub_block_out, T, hidden, inter, accumulate);
  if (spec_.sandwich_norms) {
    norm(delta_.data(), nullptr, delta_.data(), T, w.mlp_out_norm_w, w.mlp_out_norm_b);
  }
}

StepResult Executor::collect() {
  if (in_flight_.empty()) throw Error("internal: collect() with no step launched");
  const PendingResults pending = std::move(in_flight_.front());
  in_flight_.pop_front();
  const auto start = std::chrono::steady_clock::now();
  backend_.wait_download(pending.ticket);
  timings_.device_wait_seconds += seconds_since(start);
  StepResult result;
  unpack_row_results(pending.sampled_host, RowResults{pending.num_samples, pending.num_top},
                     result.sampled, result.sampled_logprob, result.top_ids, result.top_logprobs);
  unpack_row_results(pending.prompt_host,
                     RowResults{pending.num_prompt_rows, pending.num_prompt_top},
                     result.prompt_logprob, result.prompt_rank, result.prompt_top_ids,
                     result.prompt_top_logprobs);
  return result;
}

void Executor::launch(const StepBatch& batch) {
  if (int(in_flight_.size()) >= kMaxInFlight) {
    throw Error("internal: launch() with " + std::to_string(in_flight_.size()) +
                " steps in flight; collect one first");
  }
  PendingResults pending;
  const int T = batch.num_tokens(), S = batch.num_samples();
  if (T == 0) {
    in_flight_.push_back(std::move(pending));
    deferrable_rows_ = 0;
    return;
  }
  check_deferred_tokens(batch);
  const GraphKey graph_key = graph_key_of(batch);
  // The requests that take the decode kernel: all of a decode step's, else its leading
  // single-token ones (AttentionParams::num_decode_prefix).
  const int32_t decoding = batch.max_query_len == 1 ? batch.num_requests() : decode_prefix(batch);
  upload_step(batch, graph_key, decoding);
  try {
    enqueue_step(batch, graph_key, batch.max_query_len == 1 ? 0 : decoding, pending);
  } catch (...) {
    // Downloads already queued land in `pending`'s buffers: let them finish before it goes.
    try {
      backend_.synchronize();
    } catch (...) {
    }
    throw;
  }
  in_flight_.push_back(std::move(pending));  // moving keeps the buffers the downloads write
  deferrable_rows_ = S;
}

void Executor::enqueue_step(const StepBatch& batch, GraphKey graph_key,
                            int32_t num_decode_prefix, PendingResults& pending) {
  const int T = batch.num_tokens(), S = batch.num_samples();
  if (!batch.block_copies.empty()) {
    CopyBlocksParams c{};
    c.num_blocks = kv_shape_.num_blocks;
    c.copies = d_block_copies_;
    c.num_copies = int32_t(batch.block_copies.size());
    if (spec_.num_kv_heads_per_layer.empty()) {  // one launch covers every layer
      c.cache = kv_cache_.data();
      c.layer_stride = int64_t(kv_shape_.layer_bytes());
      c.block_bytes = int64_t(kv_shape_.block_bytes());
      c.num_layers = kv_shape_.num_layers;
      backend_.copy_blocks(c);
    } else {
      for (int l = 0; l < spec_.num_layers; ++l) {
        const KVCacheShape shape = layer_kv_shape(l);
        c.cache = kv_cache_.as<std::byte>() + kv_layer_offsets_[l];
        c.layer_stride = int64_t(shape.layer_bytes());
        c.block_bytes = int64_t(shape.block_bytes());
        c.num_layers = 1;
        backend_.copy_blocks(c);
      }
    }
  }

  if (!batch.count_resets.empty() || !batch.count_entries.empty()) update_token_counts(batch);

  if (graph_key.batch == 0) {
    forward(ForwardShape{T, batch.num_requests(), batch.block_table_width, batch.max_query_len,
                         batch.max_context_len, num_decode_prefix});
    if (S > 0) sample(batch, pending, /*logits_ready=*/false);
  } else {
    // A decode step: the forward and the LM head over the padded bucket, as one graph; the
    // sampling (which varies with the requests' settings) runs after it on rows [0, S).
    const int bucket = graph_key.batch;
    const ForwardShape shape = graph_shape(graph_key);
    auto graph = graphs_.find(graph_key);
    if (graph != graphs_.end()) {
      backend_.replay(graph->second);
      sample(batch, pending, /*logits_ready=*/true);
    } else {
      // The first step of a bucket runs eagerly (and creates the GEMM plans); once all its work
      // is queued, the host records the graph while the device runs it.
      forward(shape);
      compute_logits(identity_rows_.as<int32_t>(), bucket);
      sample(batch, pending, /*logits_ready=*/true);
      const auto capture_start = std::chrono::steady_clock::now();
      capture(graph_key, shape);
      ++timings_.graph_captures;
      timings_.graph_capture_seconds += seconds_since(capture_start);
    }
  }
  if (batch.num_prompt_logprob_rows() > 0) prompt_logprobs(batch, pending);
}

void Executor::capture(GraphKey graph_key, const ForwardShape& shape) {
  backend_.begin_capture();
  try {
    forward(shape);
    compute_logits(identity_rows_.as<int32_t>(), shape.num_requests);
  } catch (...) {
    try {
      backend_.end_capture();
    } catch (...) {
    }
    throw;
  }
  graphs_[graph_key] = backend_.end_capture();
}

void Executor::forward(const ForwardShape& f) {
  const int T = f.num_tokens;
  EmbeddingParams e{};
  e.token_ids = d_token_ids_;
  e.deferred_token_ids = sampled_.as<int32_t>();  // the previous step's sampled ids come first
  e.table = embed_tokens_;
  e.position_ids = d_positions_;
  e.positions = embed_positions_;
  e.out = residual_.data();
  e.num_tokens = T;
  e.hidden = spec_.hidden_size;
  e.vocab_size = spec_.vocab_size;
  e.num_positions = spec_.max_position_embeddings + spec_.position_offset;
  e.position_offset = spec_.position_offset;
  e.scale = spec_.embedding_scale;
  e.weight_dtype = weight_dtype_;
  e.act_dtype = act_dtype_;
  backend_.embedding(e);
  if (spec_.embedding_norm) {
    norm(residual_.data(), nullptr, residual_.data(), T, embed_norm_w_, embed_norm_b_);
  }

  for (int l = 0; l < spec_.num_layers; ++l) run_layer(l, f, l == 0);
}

void Executor::compute_logits(const int32_t* rows, int num_rows) {
  // Only the rows that need logits go through the final norm and the LM head. An unfolded final
  // residual add is row-wise, so gathering first and adding after is the same sum on fewer rows.
  GatherRowsParams g{};
  g.rows = rows;
  g.num_rows = num_rows;
  g.width = spec_.hidden_size;
  g.act_dtype = act_dtype_;
  if (outputs_fold_into_residual()) {
    g.in = residual_.data();
    g.out = sample_hidden_.data();
    backend_.gather_rows(g);
    norm(sample_hidden_.data(), nullptr, sample_hidden_.data(), num_rows, final_norm_w_,
         final_norm_b_);
  } else {
    g.in = delta_.data();
    g.out = sample_hidden_.data();
    backend_.gather_rows(g);
    auto* gathered_residual = hidden_.as<std::byte>();  // free now: reuse as [rows, hidden]
    g.in = residual_.data();
    g.out = gathered_residual;
    backend_.gather_rows(g);
    norm(sample_hidden_.data(), gathered_residual, sample_hidden_.data(), num_rows,
         final_norm_w_, final_norm_b_);
  }
  gemm(sample_hidden_.data(), lm_head_w_, nullptr, logits_.data(), num_rows, spec_.vocab_size,
       spec_.hidden_size, /*accumulate=*/false, /*fp32_out=*/true, lm_head_b_);
}

void Executor::sample(const StepBatch& batch, PendingResults& pending, bool logits_ready) {
  const int S = batch.num_samples();
  if (!logits_ready) compute_logits(d_sample_rows_, S);

  if (!batch.bias_token_ids.empty()) {
    LogitBiasParams lb{};
    lb.logits = logits_.as<float>();
    lb.row_offsets = d_bias_offsets_;
    lb.token_ids = d_bias_token_ids_;
    lb.bias = d_bias_values_;
    lb.num_rows = S;
    lb.vocab_size = spec_.vocab_size;
    backend_.add_logit_bias(lb);
  }
  if (!batch.penalties.empty()) {
    PenaltyParams pp{};
    pp.logits = logits_.as<float>();
    pp.counts = token_counts_.as<int32_t>();
    pp.rows = d_penalties_;
    pp.num_rows = S;
    pp.num_slots = num_penalty_slots();
    pp.vocab_size = spec_.vocab_size;
    backend_.apply_penalties(pp);
  }

  const int top = std::min(batch.num_top_logprobs, kMaxTopLogprobs);
  const RowResults layout{size_t(S), size_t(top)};
  auto* out = sampled_.as<std::byte>();
  SampleParams sp{};
  sp.logits = logits_.as<float>();
  sp.rows = d_sampling_;
  sp.sampled = reinterpret_cast<int32_t*>(out);
  sp.sampled_logprob = reinterpret_cast<float*>(out + layout.second());
  sp.top_ids = reinterpret_cast<int32_t*>(out + layout.top_ids());
  sp.top_logprobs = reinterpret_cast<float*>(out + layout.top_logprobs());
  sp.num_rows = S;
  sp.vocab_size = spec_.vocab_size;
  sp.num_top = top;
  sp.final_softcap = spec_.final_logit_softcap;
  backend_.sample(sp);

  // One download brings back every sampled id and logprob.
  pending.num_samples = layout.rows;
  pending.num_top = layout.top;
  pending.sampled_host.resize(layout.bytes());
  pending.ticket = backend_.download_async(pending.sampled_host.data(), out, layout.bytes());
}

void Executor::prompt_logprobs(const StepBatch& batch, PendingResults& pending) {
  const int P = batch.num_prompt_logprob_rows();
  const int top = std::clamp(batch.num_prompt_top_logprobs, 0, kMaxTopLogprobs);
  const RowResults layout{size_t(P), size_t(top)};
  auto* out = prompt_logprobs_.as<std::byte>();
  auto* logprob = reinterpret_cast<float*>(out);
  auto* rank = reinterpret_cast<int32_t*>(out + layout.second());
  auto* top_ids = reinterpret_cast<int32_t*>(out + layout.top_ids());
  auto* top_logprobs = reinterpret_cast<float*>(out + layout.top_logprobs());
  // The logits buffer holds max_num_seqs rows: a long prompt chunk goes through in pieces.
  const int chunk = limits_.max_num_seqs;
  for (int first = 0; first < P; first += chunk) {
    const int n = std::min(chunk, P - first);
    compute_logits(d_prompt_logprob_rows_ + first, n);
    TokenLogprobsParams t{};
    t.logits = logits_.as<float>();
    t.targets = d_prompt_logprob_targets_ + first;
    t.target_logprob = logprob + first;
    t.target_rank = rank + first;
    t.top_ids = top_ids + size_t(first) * top;
    t.top_logprobs = top_logprobs + size_t(first) * top;
    t.num_rows = n;
    t.vocab_size = spec_.vocab_size;
    t.num_top = top;
    t.final_softcap = spec_.final_logit_softcap;
    backend_.token_logprobs(t);
  }
  pending.num_prompt_rows = layout.rows;
  pending.num_prompt_top = layout.top;
  pending.prompt_host.resize(layout.bytes());
  pending.ticket = backend_.download_async(pending.prompt_host.data(), out, layout.bytes());
}

}  // namespace octavo
