"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's block with fused projections, qkv_proj (q | k | v
rows) and gate_up_proj (gate | up rows), both already canonical; a sliding window on every
layer when config.sliding_window is set.

HF tensors -> canonical, per layer L (prefix "model."):
    layers.L.self_attn.qkv_proj.weight       -> layers.L.qkv.weight
    layers.L.self_attn.o_proj.weight         -> layers.L.o.weight
    layers.L.mlp.gate_up_proj.weight         -> layers.L.gate_up.weight
    layers.L.mlp.down_proj.weight            -> layers.L.down.weight
    layers.L.input_layernorm, post_attention_layernorm -> layers.L.input_norm, post_attn_norm
and embed_tokens, norm, lm_head -> embed_tokens, final_norm, lm_head.

Long-context Phi-3 models use LongRoPE (rope type "longrope", written "su" or "yarn" in older
configs: in Phi-3 both mean LongRoPE), which ModelSpec cannot express; they are refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, decoder_spec, pick_architecture, require)
from octavo.models._gpt_common import add_head, add_linear, add_norm, find_prefix, unsupported

ARCHITECTURES = ("Phi3ForCausalLM",)
MODEL_TYPES = ("phi3",)

_LONGROPE = ("longrope", "su", "yarn")


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Phi-3 config."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type in _LONGROPE:
        raise unsupported(config, f"rope type {rope_type!r} (LongRoPE, the 128k-context Phi-3 "
                                  f"variants)")
    num_layers = int(require(config, "num_hidden_layers"))
    window = int(config.get("sliding_window") or 0)
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                        sliding_window=[window] * num_layers)


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a Phi-3 checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "embed_tokens.weight", ("model.",), "Phi-3")
    hidden, inter, size = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    q_rows, kv_rows = spec["num_heads"] * size, spec["num_kv_heads"] * size
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "embed_tokens.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}layers.{layer}.", f"layers.{layer}."
        add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
        add_linear(plan, ours + "qkv", hf + "self_attn.qkv_proj", q_rows + 2 * kv_rows, hidden,
                   False)
        add_linear(plan, ours + "o", hf + "self_attn.o_proj", hidden, q_rows, False)
        add_norm(plan, spec, ours + "post_attn_norm", hf + "post_attention_layernorm")
        add_linear(plan, ours + "gate_up", hf + "mlp.gate_up_proj", 2 * inter, hidden, False)
        add_linear(plan, ours + "down", hf + "mlp.down_proj", hidden, inter, False)
    add_head(plan, spec, prefix + "norm")
    return plan
