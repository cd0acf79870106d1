#include "model/expected_weights.h"

namespace octavo {

std::vector<ExpectedWeight> expected_weights(const ModelSpec& s) {
  std::vector<ExpectedWeight> w;
  const int64_t hidden = s.hidden_size, inter = s.intermediate_size;
  const bool has_norm_weight = s.norm != NormKind::kLayerNormNoWeight;
  auto add_norm = [&](const std::string& prefix) {
    if (has_norm_weight) w.push_back({prefix + ".weight", {hidden}});
    if (has_norm_weight && s.norm_bias) w.push_back({prefix + ".bias", {hidden}});
  };
  w.push_back({"embed_tokens.weight", {s.vocab_size, hidden}});
  if (s.embedding_norm) add_norm("embed_norm");
  if (s.positions == PositionKind::kLearned) {
    w.push_back({"embed_positions.weight", {s.max_position_embeddings + s.position_offset, hidden}});
  }
  for (int l = 0; l < s.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    const int64_t qkv_rows = s.q_size() + 2 * int64_t(s.kv_size_of(l));
    add_norm(p + "input_norm");
    w.push_back({p + "qkv.weight", {qkv_rows, hidden}});
    if (s.qkv_bias) w.push_back({p + "qkv.bias", {qkv_rows}});
    if (s.qk_norm) {
      w.push_back({p + "q_norm.weight", {s.head_dim}});
      w.push_back({p + "k_norm.weight", {s.head_dim}});
    }
    w.push_back({p + "o.weight", {hidden, s.q_size()}});
    if (s.o_bias) w.push_back({p + "o.bias", {hidden}});
    if (s.sandwich_norms) {
      add_norm(p + "attn_out_norm");
      add_norm(p + "mlp_out_norm");
    }
    if (s.residual != ResidualKind::kParallelOneNorm) add_norm(p + "post_attn_norm");
    const bool glu = is_glu(s.activation);
    const std::string mlp_in = glu ? "gate_up" : "up";
    w.push_back({p + mlp_in + ".weight", {(glu ? 2 : 1) * inter, hidden}});
    if (s.mlp_bias) w.push_back({p + mlp_in + ".bias", {(glu ? 2 : 1) * inter}});
    w.push_back({p + "down.weight", {hidden, inter}});
    if (s.mlp_bias) w.push_back({p + "down.bias", {hidden}});
  }
  add_norm("final_norm");
  if (!s.tied_embeddings) w.push_back({"lm_head.weight", {s.vocab_size, hidden}});
  if (s.lm_head_bias) w.push_back({"lm_head.bias", {s.vocab_size}});
  return w;
}

}  // namespace octavo
