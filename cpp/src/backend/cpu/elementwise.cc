// CPU reference for the row-wise ops: embedding, norm, rotary, activation, gather_rows.
// Each parallelises over rows (tokens) with OpenMP; per-row statistics (norm mean and variance)
// accumulate in double so the reference is at least as accurate as any fp32 GPU reduction.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <octavo/error.h>
#include <octavo/model_spec.h>

#include "backend/cpu/dtype.h"
#include "backend/row_scale.h"
#include "backend/ops.h"

namespace octavo::cpu {

namespace {

std::string str(long long value) { return std::to_string(value); }

// Below this many elements an op runs on the calling thread: waking the OpenMP team costs more
// than the work (decode touches one row per op), and far more on an oversubscribed host.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;

void require_non_negative(long long value, const char* op, const char* what) {
  if (value < 0) {
    throw InvalidArgument(std::string(op) + ": " + what + " is " + str(value) +
                          "; it must be >= 0");
  }
}

// NormParams' grouping: off (group_stride 0 too), or groups whose rows fit within group_stride.
void check_norm_grouping(const NormParams& p) {
  if (p.rows_per_group < 0) {
    throw InvalidArgument("norm: rows_per_group is " + str(p.rows_per_group) +
                          "; it must be >= 0 (0: no grouping)");
  }
  if (p.rows_per_group == 0) {
    if (p.group_stride != 0) {
      throw InvalidArgument("norm: group_stride is " + str(p.group_stride) +
                            " but rows_per_group is 0 (no grouping); set rows_per_group or leave "
                            "group_stride 0");
    }
    return;
  }
  const int64_t group_extent = (p.rows_per_group - 1) * p.row_stride + p.hidden;
  if (p.group_stride < group_extent) {
    throw InvalidArgument("norm: group_stride " + str(p.group_stride) + " is below the " +
                          str(group_extent) + " elements a group of " + str(p.rows_per_group) +
                          " rows spans (groups would overlap)");
  }
}

int64_t norm_row_start(const NormParams& p, int32_t row) {
  if (p.rows_per_group == 0) return row * p.row_stride;
  return int64_t{row / p.rows_per_group} * p.group_stride + (row % p.rows_per_group) * p.row_stride;
}

}  // namespace

void embedding(const EmbeddingParams& p) {
  constexpr int32_t kZeroRow = std::numeric_limits<int32_t>::min();
  require_fp32_activations(p.act_dtype, "embedding");
  require_valid_dtype(p.weight_dtype, "embedding", "weight");
  require_non_negative(p.num_tokens, "embedding", "num_tokens");
  require_non_negative(p.hidden, "embedding", "hidden");
  // A deferred id reads the previous step's sampled token; one the sampler flagged (outside the
  // vocabulary) belongs to a sequence that ends, and gets a zero row as on the GPU.
  auto token_of = [&](int32_t t) -> int32_t {
    const int32_t id = p.token_ids[t];
    if (id >= 0 || p.deferred_token_ids == nullptr) return id;
    const int32_t deferred = p.deferred_token_ids[-int64_t{id} - 1];
    return deferred >= 0 && deferred < p.vocab_size ? deferred : kZeroRow;
  };
  // Validate every index before writing anything, so a bad batch leaves `out` untouched.
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const int32_t id = token_of(t);
    if (id != kZeroRow && (id < 0 || id >= p.vocab_size)) {
      throw InvalidArgument("embedding: token id " + str(id) + " (token " + str(t) +
                            ") is outside the vocabulary of " + str(p.vocab_size) + " tokens");
    }
    if (p.positions != nullptr) {
      const int64_t row = int64_t{p.position_ids[t]} + p.position_offset;
      if (row < 0 || row >= p.num_positions) {
        throw InvalidArgument("embedding: position " + str(p.position_ids[t]) + " (token " +
                              str(t) + ") plus offset " + str(p.position_offset) +
                              " is outside the " + str(p.num_positions) +
                              " learned positions (the prompt is longer than the model allows)");
      }
    }
  }
  float* out = static_cast<float*>(p.out);
  const int64_t hidden = p.hidden;
#pragma omp parallel if (int64_t{p.num_tokens} * hidden >= kParallelMinElements)
  {
    std::vector<float> position_row(p.positions != nullptr ? hidden : 0);
#pragma omp for schedule(static)
    for (int32_t t = 0; t < p.num_tokens; ++t) {
      float* row = out + t * hidden;
      const int32_t id = token_of(t);
      if (id == kZeroRow) {
        std::fill(row, row + hidden, 0.0f);
        continue;
      }
      load_row(p.table, p.weight_dtype, int64_t{id} * hidden, hidden, row);
      for (int64_t i = 0; i < hidden; ++i) row[i] *= p.scale;
      if (p.positions != nullptr) {
        const int64_t position = int64_t{p.position_ids[t]} + p.position_offset;
        load_row(p.positions, p.weight_dtype, position * hidden, hidden, position_row.data());
        for (int64_t i = 0; i < hidden; ++i) row[i] += position_row[i];
      }
    }
  }
}

void norm(const NormParams& p) {
  require_fp32_activations(p.act_dtype, "norm");
  require_non_negative(p.rows, "norm", "rows");
  if (p.hidden <= 0) throw InvalidArgument("norm: hidden is " + str(p.hidden) + "; it must be > 0");
  if (p.row_stride < p.hidden) {
    throw InvalidArgument("norm: row_stride " + str(p.row_stride) + " is below hidden " +
                          str(p.hidden) + " (rows would overlap)");
  }
  check_norm_grouping(p);
  const auto kind = NormKind(p.kind);
  const bool rms = kind == NormKind::kRMSNorm || kind == NormKind::kRMSNormPlusOne;
  if (!rms && kind != NormKind::kLayerNorm && kind != NormKind::kLayerNormNoWeight) {
    throw InvalidArgument("norm: unknown NormKind value " + str(p.kind) + " (expected 0.." +
                          str(int(NormKind::kLayerNormNoWeight)) + ")");
  }
  const bool uses_weight = kind != NormKind::kLayerNormNoWeight;
  if (uses_weight && p.weight == nullptr) {
    throw InvalidArgument("norm: NormKind " + str(p.kind) + " needs a weight; weight is null");
  }
  const int64_t hidden = p.hidden;
  // weight_dtype is only meaningful when a weight or bias is read.
  const bool has_bias = kind == NormKind::kLayerNorm && p.bias != nullptr;
  if (uses_weight) require_valid_dtype(p.weight_dtype, "norm", "weight");
  // Gemma's (1 + w) is formed in fp32, as HF does before multiplying.
  std::vector<float> weight(uses_weight ? hidden : 0), bias(has_bias ? hidden : 0);
  if (uses_weight) {
    load_row(p.weight, p.weight_dtype, 0, hidden, weight.data());
    if (kind == NormKind::kRMSNormPlusOne) {
      for (float& w : weight) w = 1.0f + w;
    }
  }
  if (has_bias) load_row(p.bias, p.weight_dtype, 0, hidden, bias.data());

  const float* in = static_cast<const float*>(p.in);
  float* out = static_cast<float*>(p.out);
  float* residual = static_cast<float*>(p.residual);
  const bool parallel = int64_t{p.rows} * hidden >= kParallelMinElements;
#pragma omp parallel for schedule(static) if (parallel)
  for (int32_t r = 0; r < p.rows; ++r) {
    const int64_t start = norm_row_start(p, r);
    const float* x = in + start;
    if (residual != nullptr) {
      float* res = residual + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) res[i] += x[i];
      x = res;  // normalise the updated residual stream
    }
    float* y = out + start;
    if (rms) {
      double sum_squares = 0.0;
      for (int64_t i = 0; i < hidden; ++i) sum_squares += double(x[i]) * x[i];
      const float inv_rms = float(1.0 / std::sqrt(sum_squares / hidden + p.eps));
      // HF order: (x * rsqrt(mean(x^2) + eps)) * w.
      for (int64_t i = 0; i < hidden; ++i) y[i] = (x[i] * inv_rms) * weight[i];
    } else {
      double sum = 0.0;
      for (int64_t i = 0; i < hidden; ++i) sum += x[i];
      const double mean = sum / hidden;
      double sum_squares = 0.0;  // biased variance (divide by hidden), as torch's layer_norm
      for (int64_t i = 0; i < hidden; ++i) sum_squares += (x[i] - mean) * (x[i] - mean);
      const float inv_std = float(1.0 / std::sqrt(sum_squares / hidden + p.eps));
      const float mean_f = float(mean);
      if (!uses_weight) {
        for (int64_t i = 0; i < hidden; ++i) y[i] = (x[i] - mean_f) * inv_std;
      } else if (has_bias) {
        for (int64_t i = 0; i < hidden; ++i) y[i] = (x[i] - mean_f) * inv_std * weight[i] + bias[i];
      } else {
        for (int64_t i = 0; i < hidden; ++i) y[i] = (x[i] - mean_f) * inv_std * weight[i];
      }
    }
  }
}

namespace {

// RotaryParams' QK norm: each q and k head normalised in place, as norm() does it.
void qk_norm(const RotaryParams& p) {
  if (p.k_norm_weight == nullptr || p.q == nullptr || p.k == nullptr) {
    throw InvalidArgument("rotary: QK norm needs q_norm_weight and k_norm_weight, q and k");
  }
  norm(qk_norm_params(p, /*k_heads=*/false));
  norm(qk_norm_params(p, /*k_heads=*/true));
}

// RotaryParams' row scale: token t's q and k heads times its factor, in place.
void scale_rows(const RotaryParams& p) {
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const float scale = row_rms_scale(p.row_scale, t);
    if (p.q != nullptr) {
      float* q = static_cast<float*>(p.q) + t * p.q_stride;
      for (int64_t i = 0; i < int64_t{p.num_heads} * p.head_dim; ++i) q[i] *= scale;
    }
    if (p.k != nullptr) {
      float* k = static_cast<float*>(p.k) + t * p.k_stride;
      for (int64_t i = 0; i < int64_t{p.num_kv_heads} * p.head_dim; ++i) k[i] *= scale;
    }
  }
}

}  // namespace

void rotary(const RotaryParams& p) {
  require_fp32_activations(p.act_dtype, "rotary");
  require_non_negative(p.num_tokens, "rotary", "num_tokens");
  const auto pairing = RotaryPairing(p.pairing);
  if (pairing != RotaryPairing::kNeox && pairing != RotaryPairing::kGptj) {
    throw InvalidArgument("rotary: unknown RotaryPairing value " + str(p.pairing) +
                          " (expected 0 = NeoX or 1 = GPT-J)");
  }
  if (p.rotary_dim <= 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim) {
    throw InvalidArgument("rotary: rotary_dim is " + str(p.rotary_dim) +
                          "; it must be even, positive and at most head_dim (" +
                          str(p.head_dim) + ")");
  }
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const int32_t position = p.positions[t];
    if (position < 0 || position >= p.max_position) {
      throw InvalidArgument("rotary: position " + str(position) + " (token " + str(t) +
                            ") is outside the rotary table of " + str(p.max_position) +
                            " positions (build the table for a longer context)");
    }
  }
  check_row_scale(p.row_scale, "rotary");
  if (p.row_scale.source != nullptr) {
    if (p.rotary_dim != p.head_dim) {
      throw InvalidArgument("rotary: a row scale needs every element to rotate (rotary_dim " +
                            str(p.rotary_dim) + ", head_dim " + str(p.head_dim) + ")");
    }
    scale_rows(p);
  }
  if (p.q_norm_weight != nullptr) qk_norm(p);
  const int32_t half = p.rotary_dim / 2;
  const int64_t head_dim = p.head_dim;
  // Rotates the first rotary_dim elements of each head in place; the rest pass through.
  auto rotate_heads = [&](float* base, int32_t num_heads, const float* cos, const float* sin) {
    for (int32_t h = 0; h < num_heads; ++h) {
      float* head = base + h * head_dim;
      for (int32_t i = 0; i < half; ++i) {
        const int32_t a = pairing == RotaryPairing::kNeox ? i : 2 * i;
        const int32_t b = pairing == RotaryPairing::kNeox ? i + half : 2 * i + 1;
        const float x1 = head[a];
        const float x2 = head[b];
        head[a] = x1 * cos[i] - x2 * sin[i];
        head[b] = x2 * cos[i] + x1 * sin[i];
      }
    }
  };
  float* q = static_cast<float*>(p.q);
  float* k = static_cast<float*>(p.k);
  const int64_t work = int64_t{p.num_tokens} * (p.num_heads + p.num_kv_heads) * p.rotary_dim;
#pragma omp parallel for schedule(static) if (work >= kParallelMinElements)
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const float* cos = p.cos_sin + int64_t{p.positions[t]} * p.rotary_dim;
    const float* sin = cos + half;
    if (q != nullptr) rotate_heads(q + t * p.q_stride, p.num_heads, cos, sin);
    if (k != nullptr) rotate_heads(k + t * p.k_stride, p.num_kv_heads, cos, sin);
  }
}

namespace {

// Evaluated in double and rounded once, so the reference is the correctly rounded value (up to
// libm) of what torch computes in fp32.
inline float silu(float x) { return float(double(x) / (1.0 + std::exp(-double(x)))); }

inline float gelu_erf(float x) {
  const double v = x;
  return float(0.5 * v * (1.0 + std::erf(v * 0.70710678118654752440)));
}

inline float gelu_tanh(float x) {
  const double v = x;
  constexpr double kSqrt2OverPi = 0.79788456080286535588;
  return float(0.5 * v * (1.0 + std::tanh(kSqrt2OverPi * (v + 0.044715 * v * v * v))));
}

inline float relu(float x) { return x > 0.0f ? x : 0.0f; }

template <float (*Act)(float), bool kGlu>
void apply_activation(const float* in, float* out, int32_t num_tokens, int64_t inter,
                      const RowRmsScale& row_scale) {
  const int64_t in_width = kGlu ? 2 * inter : inter;
#pragma omp parallel for schedule(static) if (num_tokens * inter >= kParallelMinElements)
  for (int32_t t = 0; t < num_tokens; ++t) {
    const float* gate = in + t * in_width;
    float* y = out + t * inter;
    // x * 1 is x exactly: rows without a scale come out as before.
    const float s = row_scale.source != nullptr ? row_rms_scale(row_scale, t) : 1.0f;
    for (int64_t i = 0; i < inter; ++i) {
      y[i] = kGlu ? Act(s * gate[i]) * (s * gate[inter + i]) : Act(s * gate[i]);
    }
  }
}

}  // namespace

void activation(const ActivationParams& p) {
  require_fp32_activations(p.act_dtype, "activation");
  require_non_negative(p.num_tokens, "activation", "num_tokens");
  require_non_negative(p.inter, "activation", "inter");
  const auto* in = static_cast<const float*>(p.in);
  auto* out = static_cast<float*>(p.out);
  const int32_t tokens = p.num_tokens;
  check_row_scale(p.row_scale, "activation");
  const RowRmsScale& s = p.row_scale;
  switch (Activation(p.activation)) {
    case Activation::kSiluGlu: return apply_activation<silu, true>(in, out, tokens, p.inter, s);
    case Activation::kGeluGlu: return apply_activation<gelu_erf, true>(in, out, tokens, p.inter, s);
    case Activation::kGeluTanhGlu:
      return apply_activation<gelu_tanh, true>(in, out, tokens, p.inter, s);
    case Activation::kGelu: return apply_activation<gelu_erf, false>(in, out, tokens, p.inter, s);
    case Activation::kGeluTanh:
      return apply_activation<gelu_tanh, false>(in, out, tokens, p.inter, s);
    case Activation::kRelu: return apply_activation<relu, false>(in, out, tokens, p.inter, s);
  }
  throw InvalidArgument("activation: unknown Activation value " + str(p.activation) +
                        " (expected 0.." + str(int(Activation::kRelu)) + ")");
}

void gather_rows(const GatherRowsParams& p) {
  require_fp32_activations(p.act_dtype, "gather_rows");
  require_non_negative(p.num_rows, "gather_rows", "num_rows");
  require_non_negative(p.width, "gather_rows", "width");
  for (int32_t i = 0; i < p.num_rows; ++i) {
    if (p.rows[i] < 0) {
      throw InvalidArgument("gather_rows: row index " + str(p.rows[i]) + " (entry " + str(i) +
                            ") is negative");
    }
  }
  const auto* in = static_cast<const float*>(p.in);
  auto* out = static_cast<float*>(p.out);
  const int64_t width = p.width;
#pragma omp parallel for schedule(static) if (p.num_rows * width >= kParallelMinElements)
  for (int32_t i = 0; i < p.num_rows; ++i) {
    const float* src = in + int64_t{p.rows[i]} * width;
    float* dst = out + i * width;
    for (int64_t j = 0; j < width; ++j) dst[j] = src[j];
  }
}

}  // namespace octavo::cpu
