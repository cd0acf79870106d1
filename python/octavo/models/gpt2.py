"""GPT-2 (GPT2LMHeadModel): LayerNorm with bias, learned absolute positions, a tanh-GELU MLP,
biases everywhere, the LM head tied to the embedding.

HF tensors -> canonical, per layer L (prefix "transformer." or none: the hub's gpt2 checkpoints
were saved from the bare GPT2Model):
    h.L.ln_1.{weight,bias}           -> layers.L.input_norm.{weight,bias}
    h.L.attn.c_attn.{weight,bias}    -> layers.L.qkv.{weight,bias}   (Conv1D [in, out]: transposed)
    h.L.attn.c_proj.{weight,bias}    -> layers.L.o.{weight,bias}     (transposed)
    h.L.ln_2.{weight,bias}           -> layers.L.post_attn_norm.{weight,bias}
    h.L.mlp.c_fc.{weight,bias}       -> layers.L.up.{weight,bias}    (transposed)
    h.L.mlp.c_proj.{weight,bias}     -> layers.L.down.{weight,bias}  (transposed)
and wte, wpe, ln_f -> embed_tokens, embed_positions, final_norm. The causal-mask buffers old
checkpoints store (h.L.attn.bias, h.L.attn.masked_bias) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, make_spec, pick_architecture, require
from octavo.models._gpt_common import (
    activation, add_conv1d, add_head, add_norm, config_int, find_prefix, head_dim, unsupported)

ARCHITECTURES = ("GPT2LMHeadModel",)
MODEL_TYPES = ("gpt2",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a GPT-2 config (n_embd, n_layer, n_head, n_inner, n_positions)."""
    if config.get("scale_attn_by_inverse_layer_idx"):
        raise unsupported(config, "scale_attn_by_inverse_layer_idx (a per-layer softmax scale)")
    if config.get("add_cross_attention"):
        raise unsupported(config, "add_cross_attention (an encoder-decoder model)")
    hidden = config_int(config, "n_embd", "hidden_size")
    heads = config_int(config, "n_head", "num_attention_heads")
    num_layers = config_int(config, "n_layer", "num_hidden_layers")
    size = head_dim(hidden, heads, config)
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=size,
        intermediate_size=int(config.get("n_inner") or 4 * hidden),
        max_position_embeddings=config_int(config, "n_positions", "max_position_embeddings"),
        norm="layer_norm",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        norm_bias=True,
        activation=activation(config, "activation_function", "gelu_new"),
        positions="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        # scale_attn_weights false: raw dot products.
        attention_scale=0.0 if config.get("scale_attn_weights", True) else 1.0,
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a GPT-2 checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "wte.weight", ("transformer.", ""), "GPT-2")
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "wte.weight", (spec["vocab_size"], hidden)))
    plan.add("embed_positions.weight",
             (prefix + "wpe.weight", (spec["max_position_embeddings"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}h.{layer}.", f"layers.{layer}."
        add_norm(plan, spec, ours + "input_norm", hf + "ln_1")
        add_conv1d(plan, ours + "qkv", hf + "attn.c_attn", 3 * hidden, hidden, bias=True)
        add_conv1d(plan, ours + "o", hf + "attn.c_proj", hidden, hidden, bias=True)
        add_norm(plan, spec, ours + "post_attn_norm", hf + "ln_2")
        add_conv1d(plan, ours + "up", hf + "mlp.c_fc", inter, hidden, bias=True)
        add_conv1d(plan, ours + "down", hf + "mlp.c_proj", hidden, inter, bias=True)
    add_head(plan, spec, prefix + "ln_f")
    return plan
