"""Gemma 2 (Gemma2ForCausalLM): Gemma plus

- sandwich norms: post_attention_layernorm normalises the attention output and
  post_feedforward_layernorm the MLP output before each residual add, while
  pre_feedforward_layernorm is the usual pre-MLP norm (so it maps to post_attn_norm);
- soft-capping: attention scores by attn_logit_softcapping, LM-head logits by
  final_logit_softcapping (cap * tanh(x / cap); null: none);
- a softmax scale of query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- sliding-window attention on alternate layers: `layer_types` when the config lists them, else
  transformers' default (layers 0, 2, 4, ... slide over sliding_window positions, 4096 when the
  config has no sliding_window).
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, require, windows_from_layer_types
from octavo.models._llama_layout import llama_layout_plan
from octavo.models.gemma import gemma_spec

ARCHITECTURES = ("Gemma2ForCausalLM",)
MODEL_TYPES = ("gemma2",)


def gemma2_windows(config: dict) -> list[int]:
    num_layers = int(require(config, "num_hidden_layers"))
    window = int(config.get("sliding_window", 4096) or 0)
    from_types = windows_from_layer_types(config, num_layers, window)
    if from_types is not None:
        return from_types
    return [window if layer % 2 == 0 else 0 for layer in range(num_layers)]


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Gemma 2 config."""
    if config.get("use_bidirectional_attention"):
        raise ValueError("Gemma 2 with use_bidirectional_attention (an encoder) is not a "
                         "decoder octavo can serve")
    # Absent keys take Gemma2Config's defaults; null caps mean none.
    scalar = float(config.get("query_pre_attn_scalar") or 256)
    spec = gemma_spec(
        config, ARCHITECTURES,
        attention_scale=scalar ** -0.5,
        attn_logit_softcap=float(config.get("attn_logit_softcapping", 50.0) or 0.0),
        final_logit_softcap=float(config.get("final_logit_softcapping", 30.0) or 0.0),
        sliding_window=gemma2_windows(config),
    )
    spec["sandwich_norms"] = True
    return spec


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    return llama_layout_plan(
        names, spec, post_attn_norm="pre_feedforward_layernorm",
        sandwich_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
