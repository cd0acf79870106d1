// Rotary tables, following transformers' modeling_rope_utils.py operation by operation. Tensor
// operations there run in fp32 with Python scalars cast to fp32 (torch's rule for a float32
// tensor and a Python number), so each fp32 step below is one torch op; Python-only arithmetic
// (YaRN's correction range and attention factor) stays in double.
#include "model/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

#include <octavo/error.h>

namespace octavo {

namespace {

std::string str(long long value) { return std::to_string(value); }

int rotary_dim_of(const RopeConfig& rope, int head_dim) {
  if (head_dim <= 0) {
    throw InvalidArgument("rope: head_dim is " + str(head_dim) + "; it must be > 0");
  }
  const int dim = rope.rotary_dim > 0 ? rope.rotary_dim : head_dim;
  if (dim % 2 != 0 || dim > head_dim) {
    throw InvalidArgument("rope: rotary_dim is " + str(dim) +
                          "; it must be even and at most head_dim (" + str(head_dim) + ")");
  }
  if (!(rope.theta > 0.0f)) {
    throw InvalidArgument("rope: theta is " + std::to_string(rope.theta) + "; it must be > 0");
  }
  return dim;
}

void require_factor(const RopeConfig& rope, const char* scaling) {
  if (!(rope.factor > 0.0f)) {
    throw InvalidArgument(std::string("rope: ") + scaling + " scaling factor is " +
                          std::to_string(rope.factor) + "; it must be > 0");
  }
}

void require_original_max_position(const RopeConfig& rope, const char* scaling) {
  if (rope.original_max_position <= 0) {
    throw InvalidArgument(std::string("rope: ") + scaling +
                          " scaling needs original_max_position > 0 (the pretraining context, "
                          "config.rope_scaling.original_max_position_embeddings); it is " +
                          str(rope.original_max_position));
  }
}

// base ** (arange(0, dim, 2).float() / dim) in fp32: the exponent is an fp32 division, the power
// is rounded once to fp32 (torch's fp32 pow is within an ulp of that).
std::vector<float> position_frequencies(float theta, int dim) {
  std::vector<float> powers(dim / 2);
  for (int i = 0; i < dim / 2; ++i) {
    const float exponent = float(2 * i) / float(dim);
    powers[i] = float(std::pow(double(theta), double(exponent)));
  }
  return powers;
}

// _compute_llama3_parameters, applied to the default fp32 inv_freq.
void apply_llama3(const RopeConfig& rope, std::vector<float>& inv_freq) {
  require_factor(rope, "llama3");
  require_original_max_position(rope, "llama3");
  if (rope.high_freq_factor == rope.low_freq_factor) {
    throw InvalidArgument("rope: llama3 scaling needs low_freq_factor != high_freq_factor (both " +
                          std::to_string(rope.low_freq_factor) + ")");
  }
  const double old_context = rope.original_max_position;
  const float low_freq_wavelen = float(old_context / rope.low_freq_factor);
  const float high_freq_wavelen = float(old_context / rope.high_freq_factor);
  const float two_pi = float(2.0 * std::numbers::pi);
  const float factor = rope.factor;
  const float low = rope.low_freq_factor;
  const float freq_factor_span = float(double(rope.high_freq_factor) - rope.low_freq_factor);
  for (float& f : inv_freq) {
    const float wavelen = (1.0f / f) * two_pi;  // 2 * math.pi / inv_freq
    const float llama = wavelen > low_freq_wavelen ? f / factor : f;
    const float smooth = ((1.0f / wavelen) * float(old_context) - low) / freq_factor_span;
    const float smoothed = (1.0f - smooth) * llama / factor + smooth * llama;
    const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    f = medium ? smoothed : llama;
  }
}

// _compute_yarn_parameters' inverse frequencies.
std::vector<float> yarn_inverse_frequencies(const RopeConfig& rope, int dim) {
  require_factor(rope, "yarn");
  require_original_max_position(rope, "yarn");
  const double base = rope.theta;
  const double beta_fast = rope.beta_fast != 0.0f ? rope.beta_fast : 32.0;  // `or 32`
  const double beta_slow = rope.beta_slow != 0.0f ? rope.beta_slow : 1.0;   // `or 1`
  auto correction_dim = [&](double num_rotations) {
    const double turns = num_rotations * 2 * std::numbers::pi;
    return (dim * std::log(rope.original_max_position / turns)) / (2 * std::log(base));
  };
  // find_correction_range with truncate=True (HF's default).
  double low = std::floor(correction_dim(beta_fast));
  double high = std::ceil(correction_dim(beta_slow));
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // linear_ramp_factor's guard against a zero span

  const std::vector<float> powers = position_frequencies(rope.theta, dim);
  const float factor = rope.factor;
  const float low_f = float(low);
  const float span = float(high - low);
  std::vector<float> inv_freq(dim / 2);
  for (int i = 0; i < dim / 2; ++i) {
    const float extrapolation = 1.0f / powers[i];
    const float interpolation = 1.0f / (factor * powers[i]);
    const float ramp = std::clamp((float(i) - low_f) / span, 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    inv_freq[i] = interpolation * (1.0f - extrapolation_factor) +
                  extrapolation * extrapolation_factor;
  }
  return inv_freq;
}

}  // namespace

std::vector<float> rope_inverse_frequencies(const RopeConfig& rope, int head_dim) {
  const int dim = rotary_dim_of(rope, head_dim);
  switch (rope.scaling) {
    case RopeScaling::kNone:
    case RopeScaling::kLinear:
    case RopeScaling::kLlama3: {
      std::vector<float> inv_freq = position_frequencies(rope.theta, dim);
      for (float& f : inv_freq) f = 1.0f / f;
      if (rope.scaling == RopeScaling::kLinear) {
        require_factor(rope, "linear");
        for (float& f : inv_freq) f /= rope.factor;
      } else if (rope.scaling == RopeScaling::kLlama3) {
        apply_llama3(rope, inv_freq);
      }
      return inv_freq;
    }
    case RopeScaling::kYarn: return yarn_inverse_frequencies(rope, dim);
    case RopeScaling::kDynamicNtk:
      throw InvalidArgument("dynamic NTK rope scaling is not supported yet");
  }
  throw InvalidArgument("rope: unknown RopeScaling value " + str(int(rope.scaling)));
}

float rope_attention_factor(const RopeConfig& rope) {
  if (rope.scaling != RopeScaling::kYarn) return 1.0f;
  if (rope.attention_factor > 0.0f) return rope.attention_factor;
  // get_mscale(factor): 0.1 * ln(factor) + 1, and 1 when the factor does not stretch.
  return rope.factor <= 1.0f ? 1.0f : float(0.1 * std::log(double(rope.factor)) + 1.0);
}

std::vector<float> rope_cos_sin_table(const RopeConfig& rope, int head_dim, int max_position) {
  if (max_position <= 0) {
    throw InvalidArgument("rope: max_position is " + str(max_position) + "; it must be > 0");
  }
  const std::vector<float> inv_freq = rope_inverse_frequencies(rope, head_dim);
  const float attention_factor = rope_attention_factor(rope);
  const int half = int(inv_freq.size());
  const int dim = 2 * half;
  std::vector<float> table(size_t(max_position) * dim);
  for (int position = 0; position < max_position; ++position) {
    float* row = table.data() + size_t(position) * dim;
    for (int i = 0; i < half; ++i) {
      const float angle = float(position) * inv_freq[i];  // HF's fp32 position * inv_freq
      row[i] = float(std::cos(double(angle))) * attention_factor;
      row[half + i] = float(std::sin(double(angle))) * attention_factor;
    }
  }
  return table;
}

}  // namespace octavo
