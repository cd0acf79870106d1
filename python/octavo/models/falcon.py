"""Falcon (FalconForCausalLM, and the RWForCausalLM name of the first releases): LayerNorm with
bias, NeoX rotary over the whole head, a GELU MLP, biases only when config.bias.

Three attention layouts share query_key_value, all [KV head][its query heads, k, v] rows,
regrouped to canonical q | k | v rows:
  - new_decoder_architecture (Falcon-40B/180B, Falcon-11B): grouped KV; rows per KV head as
    [its query heads, k, v]; attention and MLP in parallel from two norms (ln_attn, ln_mlp) or,
    with num_ln_in_parallel_attn 1, from one (input_layernorm);
  - multi_query (Falcon-7B): one KV head; rows q | k | v already; parallel from one norm;
  - neither (Falcon-RW): per head [q, k, v]; parallel or sequential (post_attention_layernorm).

HF tensors -> canonical, per layer L (prefix "transformer."):
    h.L.self_attention.query_key_value -> layers.L.qkv
    h.L.self_attention.dense           -> layers.L.o
    h.L.mlp.dense_h_to_4h, dense_4h_to_h -> layers.L.up, layers.L.down
    h.L.ln_attn | h.L.input_layernorm  -> layers.L.input_norm
    h.L.ln_mlp | h.L.post_attention_layernorm -> layers.L.post_attn_norm
and word_embeddings, ln_f, lm_head -> embed_tokens, final_norm, lm_head (tied by default).

Falcon's ALiBi variant (alibi=true, Falcon-RW-1B/7B) has no rotary. transformers adds the ALiBi
bias before the 1/sqrt(head_dim) softmax scale, so its slopes are BLOOM's times 1/sqrt(head_dim)
(alibi_slope_scale). As for BLOOM, transformers rounds each bias to bfloat16 first; octavo keeps
it in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from octavo.models._common import WeightPlan, make_spec, pick_architecture, require
from octavo.models._gpt_common import (
    activation, add_head, add_linear, add_norm, config_int, find_prefix, grouped_qkv, head_dim,
    rope)

ARCHITECTURES = ("FalconForCausalLM", "RWForCausalLM")
# RefinedWeb is the 40B-style layout, RefinedWebModel the 7B-style one (as transformers converts
# them).
MODEL_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")


def _layout(config: dict) -> tuple[bool, bool, bool]:
    """(new_decoder_architecture, multi_query, parallel_attn), legacy RW configs included."""
    new_arch = config.get("new_decoder_architecture")
    if new_arch is None:
        new_arch = config.get("model_type") == "RefinedWeb"
    multi_query = config.get("multi_query", True)
    parallel = config.get("parallel_attn", True)
    return bool(new_arch), bool(multi_query), bool(parallel)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Falcon config (n_embed, n_head, n_layer, n_head_kv of RW configs
    read too)."""
    new_arch, multi_query, parallel = _layout(config)
    hidden = config_int(config, "hidden_size", "n_embed")
    heads = config_int(config, "num_attention_heads", "n_head")
    size = head_dim(hidden, heads, config)
    if new_arch:
        kv_heads = int(config.get("num_kv_heads") or config.get("n_head_kv") or heads)
        two_norms = (config.get("num_ln_in_parallel_attn") or 2) == 2
        # transformers builds ln_attn/ln_mlp only for parallel layers, and the new layout is
        # always run in parallel (its parallel_attn flag is ignored).
        residual = "parallel_two_norms" if two_norms else "parallel_one_norm"
    else:
        kv_heads = 1 if multi_query else heads
        residual = "parallel_one_norm" if parallel else "sequential"
    bias = bool(config.get("bias", False))
    if config.get("alibi"):
        positions = {"positions": "alibi", "alibi_slope_scale": 1.0 / math.sqrt(size)}
    else:
        positions = {"rope": rope(config, size)}
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=config_int(config, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=size,
        intermediate_size=int(config.get("ffn_hidden_size") or 4 * hidden),
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        norm_eps=float(config.get("layer_norm_epsilon") or 1e-5),
        activation=activation(config, "activation", "gelu"),
        residual=residual,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        **positions,
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a Falcon checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "word_embeddings.weight", ("transformer.", ""), "Falcon")
    hidden, inter, size = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    heads, kv_heads = spec["num_heads"], spec["num_kv_heads"]
    bias = spec["qkv_bias"]
    # All three layouts are [kv head][its query heads, k, v]: Falcon-RW's per-head [q, k, v] is
    # the case of one query head per KV head, Falcon-7B's q | k | v that of one KV head.
    regroup = None if kv_heads == 1 else grouped_qkv(kv_heads, heads // kv_heads, size)
    qkv_rows = (heads + 2 * kv_heads) * size
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight",
             (prefix + "word_embeddings.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}h.{layer}.", f"layers.{layer}."
        if spec["residual"] == "parallel_two_norms":
            add_norm(plan, spec, ours + "input_norm", hf + "ln_attn")
            add_norm(plan, spec, ours + "post_attn_norm", hf + "ln_mlp")
        else:
            add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
            if spec["residual"] == "sequential":
                add_norm(plan, spec, ours + "post_attn_norm", hf + "post_attention_layernorm")
        add_linear(plan, ours + "qkv", hf + "self_attention.query_key_value", qkv_rows, hidden,
                   bias, regroup)
        add_linear(plan, ours + "o", hf + "self_attention.dense", hidden, hidden, bias)
        add_linear(plan, ours + "up", hf + "mlp.dense_h_to_4h", inter, hidden, bias)
        add_linear(plan, ours + "down", hf + "mlp.dense_4h_to_h", hidden, inter, bias)
    add_head(plan, spec, prefix + "ln_f")
    return plan
