"""Starcoder2 (Starcoder2ForCausalLM): LayerNorm with bias, grouped-query attention with NeoX
rotary, a tanh-GELU MLP, biases on every projection when use_bias (the default), a sliding window
on every layer when config.sliding_window is set, the LM head tied by default.

HF tensors -> canonical, per layer L (prefix "model."):
    layers.L.self_attn.{q,k,v}_proj          -> layers.L.qkv (q | k | v rows)
    layers.L.self_attn.o_proj                -> layers.L.o
    layers.L.mlp.c_fc, layers.L.mlp.c_proj   -> layers.L.up, layers.L.down
    layers.L.input_layernorm, post_attention_layernorm -> layers.L.input_norm, post_attn_norm
and embed_tokens, norm, lm_head -> embed_tokens, final_norm, lm_head.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, add_separate_qkv, head_dim_of, make_spec, pick_architecture, require)
from octavo.models._gpt_common import activation, add_head, add_linear, add_norm, find_prefix, rope

ARCHITECTURES = ("Starcoder2ForCausalLM",)
MODEL_TYPES = ("starcoder2",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Starcoder2 config."""
    heads = int(require(config, "num_attention_heads"))
    size = head_dim_of(config)
    num_layers = int(require(config, "num_hidden_layers"))
    bias = bool(config.get("use_bias", True))
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=int(require(config, "hidden_size")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=size,
        intermediate_size=int(require(config, "intermediate_size")),
        max_position_embeddings=int(require(config, "max_position_embeddings")),
        norm_eps=float(config.get("norm_epsilon", 1e-5)),
        activation=activation(config, "hidden_act", "gelu_pytorch_tanh"),
        rope=rope(config, size),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        sliding_window=[int(config.get("sliding_window") or 0)] * num_layers,
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a Starcoder2 checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "embed_tokens.weight", ("model.",), "Starcoder2")
    hidden, inter, size = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    q_rows, kv_rows = spec["num_heads"] * size, spec["num_kv_heads"] * size
    bias = spec["qkv_bias"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "embed_tokens.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}layers.{layer}.", f"layers.{layer}."
        attn = hf + "self_attn."
        add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
        add_separate_qkv(plan, ours, attn, q_rows, kv_rows, hidden, bias)
        add_linear(plan, ours + "o", attn + "o_proj", hidden, q_rows, bias)
        add_norm(plan, spec, ours + "post_attn_norm", hf + "post_attention_layernorm")
        add_linear(plan, ours + "up", hf + "mlp.c_fc", inter, hidden, bias)
        add_linear(plan, ours + "down", hf + "mlp.c_proj", hidden, inter, bias)
    add_head(plan, spec, prefix + "norm")
    return plan
