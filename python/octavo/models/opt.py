"""OPT (OPTForCausalLM): pre-LayerNorm decoder with ReLU MLP, biases, and learned positions
whose table keeps 2 extra rows in front (position p reads row p + 2).

HF tensors -> canonical, per layer L (prefix "model.decoder." or "decoder."):
    layers.L.self_attn_layer_norm       -> layers.L.input_norm
    layers.L.self_attn.{q,k,v}_proj     -> layers.L.qkv (q | k | v rows)
    layers.L.self_attn.out_proj         -> layers.L.o
    layers.L.final_layer_norm           -> layers.L.post_attn_norm
    layers.L.fc1, layers.L.fc2          -> layers.L.up, layers.L.down
and embed_tokens, embed_positions, final_layer_norm -> embed_tokens, embed_positions, final_norm.

OPT-350m's layout (post-LayerNorm, a 512-wide embedding projected in and out) is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, add_separate_qkv, make_spec, pick_architecture, require)
from octavo.models._gpt_common import (
    activation, add_head, add_linear, add_norm, find_prefix, head_dim, unsupported)

ARCHITECTURES = ("OPTForCausalLM",)
MODEL_TYPES = ("opt",)

# OPTLearnedPositionalEmbedding: rows 0 and 1 precede position 0 (a fairseq padding legacy).
POSITION_OFFSET = 2


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an OPT config."""
    hidden = int(require(config, "hidden_size"))
    if not config.get("do_layer_norm_before", True):
        raise unsupported(config, "do_layer_norm_before=false (post-LayerNorm, OPT-350m)")
    if config.get("word_embed_proj_dim") not in (None, hidden):
        raise unsupported(
            config, f"word_embed_proj_dim {config['word_embed_proj_dim']} != hidden_size "
                    f"{hidden} (projected embeddings, OPT-350m)")
    if config.get("_remove_final_layer_norm"):
        raise unsupported(config, "_remove_final_layer_norm")
    heads = int(require(config, "num_attention_heads"))
    affine = config.get("layer_norm_elementwise_affine", True)
    bias = bool(config.get("enable_bias", True))
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim(hidden, heads, config),
        intermediate_size=int(require(config, "ffn_dim")),
        max_position_embeddings=int(require(config, "max_position_embeddings")),
        norm="layer_norm" if affine else "layer_norm_no_weight",
        norm_eps=1e-5,  # nn.LayerNorm's default; OPT's config has no key for it
        norm_bias=bool(affine),
        activation=activation(config, "activation_function", "relu"),
        positions="learned",
        position_offset=POSITION_OFFSET,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of an OPT checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "embed_tokens.weight", ("model.decoder.", "decoder."), "OPT")
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    bias = spec["qkv_bias"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "embed_tokens.weight", (spec["vocab_size"], hidden)))
    plan.add("embed_positions.weight",
             (prefix + "embed_positions.weight",
              (spec["max_position_embeddings"] + POSITION_OFFSET, hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}layers.{layer}.", f"layers.{layer}."
        attn = hf + "self_attn."
        add_norm(plan, spec, ours + "input_norm", hf + "self_attn_layer_norm")
        add_separate_qkv(plan, ours, attn, hidden, hidden, hidden, bias)
        add_linear(plan, ours + "o", attn + "out_proj", hidden, hidden, bias)
        add_norm(plan, spec, ours + "post_attn_norm", hf + "final_layer_norm")
        add_linear(plan, ours + "up", hf + "fc1", inter, hidden, bias)
        add_linear(plan, ours + "down", hf + "fc2", hidden, inter, bias)
    add_head(plan, spec, prefix + "final_layer_norm")
    return plan
