"""OLMo (OlmoForCausalLM, the first OLMo in the transformers layout: OLMo-1B-hf, OLMo-7B-hf):
Llama's tensors with non-parametric LayerNorms (no weight, no bias, eps 1e-5), so the checkpoint
holds no norm tensors at all; biases on q, k, v and o when attention_bias.

OLMo-2 (Olmo2ForCausalLM) is not this family: it normalises after attention and MLP instead of
before, and its q/k norms span all heads at once; ModelSpec expresses neither. clip_qkv (q, k and
v clamped to +-clip_qkv, OLMo-1.7) has no ModelSpec equivalent either; both are refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, add_separate_qkv, decoder_spec, pick_architecture)
from octavo.models._gpt_common import add_head, add_linear, find_prefix, unsupported

ARCHITECTURES = ("OlmoForCausalLM",)
MODEL_TYPES = ("olmo",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an OLMo config."""
    if config.get("clip_qkv") is not None:
        raise unsupported(config, f"clip_qkv {config['clip_qkv']} (q, k and v clamped)")
    bias = bool(config.get("attention_bias", False))
    spec = decoder_spec(
        config, architecture=pick_architecture(config, ARCHITECTURES),
        norm="layer_norm_no_weight", norm_eps=1e-5, qkv_bias=bias, o_bias=bias)
    spec.update(lm_head_bias=False, embedding_norm=False, sandwich_norms=False,
                num_kv_heads_per_layer=[])
    return spec


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of an OLMo checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "embed_tokens.weight", ("model.",), "OLMo")
    hidden, inter, size = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    q_rows, kv_rows = spec["num_heads"] * size, spec["num_kv_heads"] * size
    bias = spec["qkv_bias"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "embed_tokens.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}layers.{layer}.", f"layers.{layer}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        add_separate_qkv(plan, ours, attn, q_rows, kv_rows, hidden, bias)
        add_linear(plan, ours + "o", attn + "o_proj", hidden, q_rows, bias)
        plan.add(ours + "gate_up.weight", (mlp + "gate_proj.weight", (inter, hidden)),
                 (mlp + "up_proj.weight", (inter, hidden)))
        add_linear(plan, ours + "down", mlp + "down_proj", hidden, inter, False)
    add_head(plan, spec, None)
    return plan
