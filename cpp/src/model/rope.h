// The rotary cos/sin table the rotary op reads (RotaryParams::cos_sin), built once per model on the
// host from RopeConfig with every scaling variant folded in.
#pragma once

#include <vector>

#include <octavo/model_spec.h>

namespace octavo {

/// [max_position, rotary_dim] fp32: per position p, rotary_dim/2 cosines then rotary_dim/2 sines
/// of p * inv_freq[i], both times the scaling's attention factor (YaRN; 1 otherwise).
///
/// inv_freq follows Hugging Face transformers (modeling_rope_utils.py) step by step in the same
/// precision: inv_freq is fp32, computed by the same sequence of fp32 operations (pow rounded to
/// fp32, then 1 / pow in fp32, ...; the scalar-only parts, such as YaRN's correction range and
/// attention factor, in double as Python does), and the angle is the fp32 product p * inv_freq
/// that HF's fp32 rotary embedding forms. Only cos and sin themselves are evaluated in double and
/// rounded to fp32 (correctly rounded where torch's fp32 cos is within an ulp), so the table
/// matches transformers' to about an ulp at every position, including the large positions where
/// the fp32 angle itself is coarse.
///
/// Scalings: kNone; kLinear (inv_freq / factor, i.e. positions / factor); kLlama3 (needs
/// original_max_position > 0 and low_freq_factor != high_freq_factor); kYarn (needs
/// original_max_position > 0: the mapper fills it from max_position_embeddings when the config
/// lacks it, as HF does, and folds DeepSeek's mscale / mscale_all_dim into attention_factor).
/// kDynamicNtk throws InvalidArgument (not supported yet). rotary_dim 0 means head_dim.
std::vector<float> rope_cos_sin_table(const RopeConfig& rope, int head_dim, int max_position);

/// The fp32 inverse frequencies, rotary_dim / 2 of them, exactly as rope_cos_sin_table uses them.
std::vector<float> rope_inverse_frequencies(const RopeConfig& rope, int head_dim);

/// The factor YaRN multiplies cos and sin by (1 for the other scalings).
float rope_attention_factor(const RopeConfig& rope);

}  // namespace octavo
