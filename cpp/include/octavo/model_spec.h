// ModelSpec: every supported architecture is one generic decoder described by data. Python maps a
// Hugging Face config.json to a ModelSpec (python/octavo/models); octavo's own model directory
// stores it as octavo.json. Adding an architecture never adds a C++ code path unless it needs an op.
//
// Canonical weight names (per layer L; [rows, cols] row-major, Linear weights as [out, in]):
//   embed_tokens.weight            [vocab, hidden]
//   embed_positions.weight         [max_positions + position_offset, hidden]  (learned positions)
//   layers.L.input_norm.weight     [hidden]        (.bias for LayerNorm with bias)
//   layers.L.qkv.weight            [(heads + 2 * kv_heads) * head_dim, hidden]  q rows, k rows, v rows
//   layers.L.qkv.bias              [(heads + 2 * kv_heads) * head_dim]          (qkv_bias)
//   layers.L.q_norm.weight         [head_dim]      (qk_norm)
//   layers.L.k_norm.weight         [head_dim]      (qk_norm)
//   layers.L.o.weight              [hidden, heads * head_dim]                   (.bias: o_bias)
//   layers.L.post_attn_norm.weight [hidden]        the norm before the MLP (absent for one-norm
//                                                  parallel residual)
//   layers.L.gate_up.weight        [2 * intermediate, hidden]  gate rows then up rows (GLU activations)
//   layers.L.up.weight             [intermediate, hidden]      (non-GLU activations)
//   layers.L.down.weight           [hidden, intermediate]      (.bias on gate_up/up/down: mlp_bias)
//   layers.L.attn_out_norm.weight  [hidden]        (sandwich_norms: on the attention output)
//   layers.L.mlp_out_norm.weight   [hidden]        (sandwich_norms: on the MLP output)
//   embed_norm.weight              [hidden]        (embedding_norm; .bias for LayerNorm with bias)
//   final_norm.weight              [hidden]        (.bias for LayerNorm with bias)
//   lm_head.weight                 [vocab, hidden] (absent when tied_embeddings)
//   lm_head.bias                   [vocab]         (lm_head_bias)
// kv_heads is num_kv_heads, or the layer's entry of num_kv_heads_per_layer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace octavo {

enum class NormKind : uint8_t {
  kRMSNorm,            // x / rms(x) * w
  kRMSNormPlusOne,     // x / rms(x) * (1 + w)  (Gemma)
  kLayerNorm,          // (x - mean) / std * w + b  (bias optional: norm_bias)
  kLayerNormNoWeight,  // (x - mean) / std  (OLMo)
};

enum class Activation : uint8_t {
  kSiluGlu,      // silu(gate) * up
  kGeluGlu,      // gelu(gate) * up, exact erf
  kGeluTanhGlu,  // gelu_tanh(gate) * up
  kGelu,         // gelu(x), exact erf
  kGeluTanh,     // gelu with the tanh approximation
  kRelu,
};

constexpr bool is_glu(Activation a) {
  return a == Activation::kSiluGlu || a == Activation::kGeluGlu || a == Activation::kGeluTanhGlu;
}

enum class PositionKind : uint8_t { kRotary, kAlibi, kLearned, kNone };

/// Which elements of a head rotate together: NeoX pairs i with i + rotary_dim / 2; GPT-J pairs
/// neighbours 2i and 2i + 1.
enum class RotaryPairing : uint8_t { kNeox, kGptj };

enum class RopeScaling : uint8_t { kNone, kLinear, kDynamicNtk, kLlama3, kYarn };

struct RopeConfig {
  RotaryPairing pairing = RotaryPairing::kNeox;
  float theta = 10000.0f;
  int rotary_dim = 0;  // elements of each head that rotate (partial rotary); 0 means head_dim
  RopeScaling scaling = RopeScaling::kNone;
  float factor = 1.0f;
  // Llama-3 scaling
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position = 0;
  // YaRN
  float beta_fast = 32.0f;
  float beta_slow = 1.0f;
  float attention_factor = 0.0f;  // 0: YaRN's default 0.1 * ln(factor) + 1
};

enum class ResidualKind : uint8_t {
  kSequential,         // x += attn(norm1(x)); x += mlp(norm2(x))
  kParallelOneNorm,    // h = norm1(x); x += attn(h) + mlp(h)      (GPT-J, Falcon-7B, Phi)
  kParallelTwoNorms,   // x += attn(norm1(x)) + mlp(norm2(x))      (GPT-NeoX, Falcon-40B)
};

/// The architecture of a decoder-only transformer, as data.
struct ModelSpec {
  std::string architecture;  // the HF name it came from, for messages ("LlamaForCausalLM")
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;  // == num_heads: MHA; 1: MQA; between: GQA
  /// Per layer KV heads (DeciLM's variable GQA); empty: num_kv_heads in every layer.
  std::vector<int> num_kv_heads_per_layer;
  int head_dim = 0;
  int intermediate_size = 0;
  int max_position_embeddings = 0;

  NormKind norm = NormKind::kRMSNorm;
  float norm_eps = 1e-6f;
  bool norm_bias = false;  // LayerNorm carries a bias
  Activation activation = Activation::kSiluGlu;

  PositionKind positions = PositionKind::kRotary;
  RopeConfig rope;
  int position_offset = 0;  // learned positions: row of position 0 (OPT stores 2 extra rows)

  ResidualKind residual = ResidualKind::kSequential;
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  bool qk_norm = false;  // per-head RMSNorm of q and k before rotary (Qwen3, OLMo-2)
  bool tied_embeddings = false;
  bool lm_head_bias = false;    // lm_head.bias (Phi-1.5/2, GPT-J)
  bool embedding_norm = false;  // a norm right after the token embedding (BLOOM)
  /// Norms on the attention output and on the MLP output before each residual add (Gemma 2).
  bool sandwich_norms = false;

  float embedding_scale = 1.0f;       // multiplies the token embedding (Gemma: sqrt(hidden))
  float attention_scale = 0.0f;       // softmax scale; 0 means 1 / sqrt(head_dim)
  float attn_logit_softcap = 0.0f;    // 0: none; else cap * tanh(score / cap) (Gemma 2)
  float final_logit_softcap = 0.0f;   // same on the LM head's logits
  /// Multiplies every ALiBi slope (Falcon-RW scales its bias with the scores: 1 / sqrt(head_dim)).
  float alibi_slope_scale = 1.0f;
  /// Per layer: attend only to the last `window` positions (0 = full attention). Empty: all full.
  std::vector<int> sliding_window;

  int window_of(int layer) const {
    return sliding_window.empty() ? 0 : sliding_window.at(layer);
  }
  int q_size() const { return num_heads * head_dim; }
  int kv_size() const { return num_kv_heads * head_dim; }
  int kv_heads_of(int layer) const {
    return num_kv_heads_per_layer.empty() ? num_kv_heads : num_kv_heads_per_layer.at(layer);
  }
  int kv_size_of(int layer) const { return kv_heads_of(layer) * head_dim; }
  /// The largest kv_heads_of over the layers.
  int max_kv_heads() const;
  int rotary_dim() const { return rope.rotary_dim > 0 ? rope.rotary_dim : head_dim; }
  float softmax_scale() const;

  /// Throws InvalidArgument naming the first field that is inconsistent (heads not a multiple of
  /// kv heads, odd rotary_dim, a window list of the wrong length, ...).
  void validate() const;
};

}  // namespace octavo
