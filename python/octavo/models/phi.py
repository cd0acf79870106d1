"""Phi-1, Phi-1.5 and Phi-2 (PhiForCausalLM): attention and MLP in parallel from one LayerNorm,
partial NeoX rotary (partial_rotary_factor, 0.5 by default), a tanh-GELU MLP, biases everywhere
including the LM head.

HF tensors -> canonical, per layer L (prefix "model."):
    layers.L.input_layernorm                 -> layers.L.input_norm (the only norm of the layer)
    layers.L.self_attn.{q,k,v}_proj          -> layers.L.qkv (q | k | v rows)
    layers.L.self_attn.dense                 -> layers.L.o
    layers.L.mlp.fc1, layers.L.mlp.fc2       -> layers.L.up, layers.L.down
and embed_tokens, final_layernorm, lm_head.{weight,bias} -> embed_tokens, final_norm,
lm_head.{weight,bias}.

The first Phi-2 uploads (model_type "phi-msft", Wqkv / mixer tensors) were converted on the hub to
this layout; they are refused with that advice. qk_layernorm (a LayerNorm with bias over each
head) has no ModelSpec equivalent and is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, add_separate_qkv, make_spec, pick_architecture, require)
from octavo.models._gpt_common import (
    activation, add_head, add_linear, add_norm, find_prefix, head_dim, rope, unsupported)

ARCHITECTURES = ("PhiForCausalLM",)
MODEL_TYPES = ("phi",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Phi config."""
    if config.get("model_type") == "phi-msft":
        raise unsupported(
            config, "the original phi-msft layout (download the current revision of the hub "
                    "repository, which has the transformers PhiForCausalLM layout)")
    if config.get("qk_layernorm"):
        raise unsupported(config, "qk_layernorm (a LayerNorm with bias on each head)")
    hidden = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    size = head_dim(hidden, heads, config)
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=size,
        intermediate_size=int(require(config, "intermediate_size")),
        max_position_embeddings=int(require(config, "max_position_embeddings")),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        activation=activation(config, "hidden_act", "gelu_new"),
        rope=rope(config, size, partial_rotary_factor=0.5),
        residual="parallel_one_norm",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        lm_head_bias=True,
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a Phi checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "embed_tokens.weight", ("model.",), "Phi")
    hidden, inter, size = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    q_rows, kv_rows = spec["num_heads"] * size, spec["num_kv_heads"] * size
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "embed_tokens.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}layers.{layer}.", f"layers.{layer}."
        attn = hf + "self_attn."
        add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
        add_separate_qkv(plan, ours, attn, q_rows, kv_rows, hidden, True)
        add_linear(plan, ours + "o", attn + "dense", hidden, q_rows, True)
        add_linear(plan, ours + "up", hf + "mlp.fc1", inter, hidden, True)
        add_linear(plan, ours + "down", hf + "mlp.fc2", hidden, inter, True)
    add_head(plan, spec, prefix + "final_layernorm")
    return plan
