"""BLOOM (BloomForCausalLM): a LayerNorm right after the token embedding, ALiBi, a tanh-GELU
MLP, biases everywhere, the LM head tied to the embedding.

HF tensors -> canonical, per layer L (prefix "transformer." or none: the hub's bloom checkpoints
were saved from the bare BloomModel):
    h.L.input_layernorm                    -> layers.L.input_norm
    h.L.self_attention.query_key_value     -> layers.L.qkv: rows stored per head as [q, k, v],
                                              regrouped to q | k | v
    h.L.self_attention.dense               -> layers.L.o
    h.L.post_attention_layernorm           -> layers.L.post_attn_norm
    h.L.mlp.dense_h_to_4h, dense_4h_to_h   -> layers.L.up, layers.L.down
and word_embeddings, word_embeddings_layernorm, ln_f -> embed_tokens, embed_norm, final_norm.

transformers rounds each ALiBi bias (slope x key position) to bfloat16 whatever the model's
dtype; octavo keeps it in fp32. The two agree exactly where slope x position is representable
(power-of-two slopes, as with up to 8 heads, and positions below 256); past that, real BLOOM
models differ from transformers by that rounding only.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, make_spec, pick_architecture, require
from octavo.models._gpt_common import (
    add_head, add_linear, add_norm, config_int, find_prefix, head_dim, per_head_qkv, unsupported)

ARCHITECTURES = ("BloomForCausalLM",)
MODEL_TYPES = ("bloom",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a BLOOM config (n_embed or hidden_size, n_head, n_layer)."""
    if config.get("apply_residual_connection_post_layernorm"):
        raise unsupported(config, "apply_residual_connection_post_layernorm=true")
    hidden = config_int(config, "hidden_size", "n_embed")
    heads = config_int(config, "n_head", "num_attention_heads")
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=config_int(config, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim(hidden, heads, config),
        intermediate_size=4 * hidden,
        # ALiBi has no table to bound the length: BLOOM was trained on 2048-token sequences.
        max_position_embeddings=int(config.get("seq_length") or 2048),
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        activation="gelu_tanh",
        positions="alibi",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        embedding_norm=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a BLOOM checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "word_embeddings.weight", ("transformer.", ""), "BLOOM")
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight",
             (prefix + "word_embeddings.weight", (spec["vocab_size"], hidden)))
    add_norm(plan, spec, "embed_norm", prefix + "word_embeddings_layernorm")
    regroup = per_head_qkv(spec["num_heads"], spec["head_dim"])
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}h.{layer}.", f"layers.{layer}."
        add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
        add_linear(plan, ours + "qkv", hf + "self_attention.query_key_value", 3 * hidden,
                   hidden, True, regroup)
        add_linear(plan, ours + "o", hf + "self_attention.dense", hidden, hidden, True)
        add_norm(plan, spec, ours + "post_attn_norm", hf + "post_attention_layernorm")
        add_linear(plan, ours + "up", hf + "mlp.dense_h_to_4h", inter, hidden, True)
        add_linear(plan, ours + "down", hf + "mlp.dense_4h_to_h", hidden, inter, True)
    add_head(plan, spec, prefix + "ln_f")
    return plan
