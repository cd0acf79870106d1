"""DeciLM (DeciLMForCausalLM, model_type "deci"; the code ships with the checkpoint): Llama with
a KV head count per layer (config num_key_value_heads_per_layer, "variable GQA"): layer L's
k_proj and v_proj have num_key_value_heads_per_layer[L] * head_dim rows. Dynamic NTK rope scaling
is the plain rotary within max_position_embeddings (see _llama_layout.remote_code_rope).

Nemotron-NAS checkpoints reuse the architecture name with per-layer block_configs (layers
without attention, varying MLP widths); those are refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, decoder_spec, head_dim_of, pick_architecture, require)
from octavo.models._llama_layout import llama_layout_plan, remote_code_rope

ARCHITECTURES = ("DeciLMForCausalLM",)
MODEL_TYPES = ("deci",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a DeciLM config."""
    if config.get("block_configs") is not None:
        raise ValueError(
            "DeciLMForCausalLM with block_configs (Nemotron-NAS: layers without attention, MLP "
            "widths per layer) is not supported; DeciLM's num_key_value_heads_per_layer is")
    num_layers = int(require(config, "num_hidden_layers"))
    heads = int(require(config, "num_attention_heads"))
    per_layer = [int(n) for n in config.get("num_key_value_heads_per_layer") or []]
    if per_layer and len(per_layer) != num_layers:
        raise ValueError(f"num_key_value_heads_per_layer lists {len(per_layer)} layers; "
                         f"num_hidden_layers is {num_layers}")
    for layer, count in enumerate(per_layer):
        if count <= 0 or heads % count:
            raise ValueError(f"num_key_value_heads_per_layer[{layer}] is {count}; it must divide "
                             f"num_attention_heads ({heads})")
    # With a count per layer, num_kv_heads is only a summary: the largest.
    kv_heads = max(per_layer) if per_layer else config.get("num_key_value_heads") or heads
    spec = decoder_spec({**config, "num_key_value_heads": kv_heads},
                        architecture=pick_architecture(config, ARCHITECTURES),
                        rope=remote_code_rope(config, head_dim_of(config)))
    spec["num_kv_heads_per_layer"] = per_layer
    return spec


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Llama's tensor names; k_proj / v_proj rows follow each layer's KV head count."""
    return llama_layout_plan(names, spec)
