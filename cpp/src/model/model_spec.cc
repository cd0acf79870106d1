#include <octavo/model_spec.h>

#include <algorithm>
#include <cmath>
#include <string>

#include <octavo/error.h>

namespace octavo {

int ModelSpec::max_kv_heads() const {
  int most = num_kv_heads;
  for (int heads : num_kv_heads_per_layer) most = std::max(most, heads);
  return most;
}

float ModelSpec::softmax_scale() const {
  return attention_scale > 0.0f ? attention_scale : 1.0f / std::sqrt(float(head_dim));
}

namespace {
void require(bool ok, const std::string& architecture, const std::string& what) {
  if (!ok) throw InvalidArgument("model spec (" + architecture + "): " + what);
}
std::string str(long long v) { return std::to_string(v); }
}  // namespace

void ModelSpec::validate() const {
  const std::string& a = architecture;
  require(vocab_size > 0, a, "vocab_size is " + str(vocab_size) + "; it must be positive");
  require(hidden_size > 0, a, "hidden_size is " + str(hidden_size) + "; it must be positive");
  require(num_layers > 0, a, "num_layers is " + str(num_layers) + "; it must be positive");
  require(num_heads > 0 && head_dim > 0, a,
          "num_heads (" + str(num_heads) + ") and head_dim (" + str(head_dim) + ") must be positive");
  require(num_kv_heads > 0 && num_heads % num_kv_heads == 0, a,
          "num_heads (" + str(num_heads) + ") must be a multiple of num_kv_heads (" +
              str(num_kv_heads) + ")");
  require(intermediate_size > 0, a,
          "intermediate_size is " + str(intermediate_size) + "; it must be positive");
  if (positions == PositionKind::kRotary) {
    const int rot = rotary_dim();
    require(rot > 0 && rot <= head_dim && rot % 2 == 0, a,
            "rotary_dim is " + str(rot) + "; it must be even and at most head_dim (" +
                str(head_dim) + ")");
    require(rope.theta > 0.0f, a, "rope theta must be positive");
  }
  if (positions == PositionKind::kLearned) {
    require(max_position_embeddings > 0, a,
            "learned positions need max_position_embeddings > 0");
  }
  require(sliding_window.empty() || int(sliding_window.size()) == num_layers, a,
          "sliding_window lists " + str(sliding_window.size()) + " layers; the model has " +
              str(num_layers));
  require(norm_eps > 0.0f, a, "norm_eps must be positive");
  require(num_kv_heads_per_layer.empty() || int(num_kv_heads_per_layer.size()) == num_layers, a,
          "num_kv_heads_per_layer lists " + str(num_kv_heads_per_layer.size()) +
              " layers; the model has " + str(num_layers));
  for (size_t l = 0; l < num_kv_heads_per_layer.size(); ++l) {
    const int heads = num_kv_heads_per_layer[l];
    require(heads > 0 && num_heads % heads == 0, a,
            "layer " + str(l) + " has " + str(heads) + " kv heads; num_heads (" + str(num_heads) +
                ") must be a multiple of it");
  }
  require(std::isfinite(alibi_slope_scale) && alibi_slope_scale > 0.0f, a,
          "alibi_slope_scale must be positive and finite");
  require(!sandwich_norms || residual == ResidualKind::kSequential, a,
          "sandwich_norms needs the sequential residual");
}

}  // namespace octavo
