"""GPT-NeoX (GPTNeoXForCausalLM: Pythia, GPT-NeoX-20B): LayerNorm, partial NeoX rotary
(rotary_pct of each head, 0.25 by default), attention and MLP in parallel from two norms
(use_parallel_residual, the default) or in sequence, biases everywhere.

HF tensors -> canonical, per layer L (prefix "gpt_neox."):
    layers.L.input_layernorm                       -> layers.L.input_norm
    layers.L.post_attention_layernorm              -> layers.L.post_attn_norm (the MLP's norm)
    layers.L.attention.query_key_value             -> layers.L.qkv: rows stored per head as
                                                      [q, k, v], regrouped to q | k | v
    layers.L.attention.dense                       -> layers.L.o
    layers.L.mlp.dense_h_to_4h, dense_4h_to_h      -> layers.L.up, layers.L.down
and embed_in, final_layer_norm -> embed_tokens, final_norm; the LM head is embed_out (hub
checkpoints) or lm_head (what transformers 5 saves).
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, make_spec, pick_architecture, require
from octavo.models._gpt_common import (
    activation, add_head, add_linear, add_norm, find_prefix, head_dim, per_head_qkv, rope)

ARCHITECTURES = ("GPTNeoXForCausalLM",)
MODEL_TYPES = ("gpt_neox",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a GPT-NeoX config (rotary_pct and rotary_emb_base in hub configs,
    rope_parameters in what transformers 5 saves)."""
    hidden = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    size = head_dim(hidden, heads, config)
    bias = bool(config.get("attention_bias", True))
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=size,
        intermediate_size=int(require(config, "intermediate_size")),
        max_position_embeddings=int(require(config, "max_position_embeddings")),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        activation=activation(config, "hidden_act", "gelu"),
        rope=rope(config, size, theta=float(config.get("rotary_emb_base", 10000.0)),
                  partial_rotary_factor=float(config.get("rotary_pct", 0.25))),
        residual=("parallel_two_norms" if config.get("use_parallel_residual", True)
                  else "sequential"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a GPT-NeoX checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "embed_in.weight", ("gpt_neox.", ""), "GPT-NeoX")
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "embed_in.weight", (spec["vocab_size"], hidden)))
    regroup = per_head_qkv(spec["num_heads"], spec["head_dim"])
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}layers.{layer}.", f"layers.{layer}."
        add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
        add_linear(plan, ours + "qkv", hf + "attention.query_key_value", 3 * hidden, hidden,
                   spec["qkv_bias"], regroup)
        add_linear(plan, ours + "o", hf + "attention.dense", hidden, hidden, spec["o_bias"])
        add_norm(plan, spec, ours + "post_attn_norm", hf + "post_attention_layernorm")
        add_linear(plan, ours + "up", hf + "mlp.dense_h_to_4h", inter, hidden, True)
        add_linear(plan, ours + "down", hf + "mlp.dense_4h_to_h", hidden, inter, True)
    lm_head = "embed_out" if "embed_out.weight" in names else "lm_head"
    add_head(plan, spec, prefix + "final_layer_norm", lm_head)
    return plan
