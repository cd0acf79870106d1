"""MPT (MptForCausalLM): LayerNorm without bias, ALiBi, no biases anywhere, a GELU MLP, the LM
head tied to the embedding.

HF tensors -> canonical, per layer L (prefix "transformer."):
    blocks.L.norm_1.weight                   -> layers.L.input_norm.weight
    blocks.L.attn.Wqkv.weight                -> layers.L.qkv.weight (q | k | v rows)
    blocks.L.attn.out_proj.weight            -> layers.L.o.weight
    blocks.L.norm_2.weight                   -> layers.L.post_attn_norm.weight
    blocks.L.ffn.up_proj, ffn.down_proj      -> layers.L.up, layers.L.down
and wte, norm_f -> embed_tokens, final_norm.

Options transformers' MptForCausalLM does not run either (MosaicML's own code did) are refused by
name: learned positions (instead of or besides ALiBi), alibi_bias_max other than 8, clip_qkv,
qk_ln, multi-query or grouped attention, biases (no_bias=false), RMSNorm and logit_scale.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, make_spec, pick_architecture, require
from octavo.models._gpt_common import (
    add_head, add_linear, add_norm, config_int, find_prefix, head_dim, unsupported)

ARCHITECTURES = ("MptForCausalLM", "MPTForCausalLM")
MODEL_TYPES = ("mpt",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an MPT config (d_model, n_heads, n_layers, expansion_ratio,
    max_seq_len, attn_config)."""
    attn = dict(config.get("attn_config") or {})
    if not attn.get("alibi", True):
        raise unsupported(config, "attn_config.alibi=false (learned positions)")
    if attn.get("alibi_bias_max", 8) != 8:
        raise unsupported(config, f"attn_config.alibi_bias_max {attn['alibi_bias_max']} (only "
                                  f"8, the standard ALiBi slopes)")
    for key in ("clip_qkv", "qk_ln", "prefix_lm"):
        if attn.get(key):
            raise unsupported(config, f"attn_config.{key}")
    if attn.get("attn_type", "multihead_attention") != "multihead_attention":
        raise unsupported(config, f"attn_config.attn_type {attn['attn_type']!r}")
    if not config.get("no_bias", True):
        raise unsupported(config, "no_bias=false (biased layers)")
    if config.get("norm_type", "low_precision_layernorm") not in ("low_precision_layernorm",
                                                                  "layernorm"):
        raise unsupported(config, f"norm_type {config['norm_type']!r}")
    if config.get("logit_scale") not in (None, 1, 1.0):
        raise unsupported(config, f"logit_scale {config['logit_scale']!r}")
    hidden = config_int(config, "d_model", "hidden_size")
    heads = config_int(config, "n_heads", "num_attention_heads")
    softmax_scale = attn.get("softmax_scale")
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=config_int(config, "n_layers", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim(hidden, heads, config),
        intermediate_size=int(config.get("expansion_ratio", 4) * hidden),
        max_position_embeddings=int(config.get("max_seq_len") or 2048),
        norm="layer_norm",
        norm_eps=float(config.get("layer_norm_epsilon") or 1e-5),
        norm_bias=False,
        activation="gelu",
        positions="alibi",
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_scale=float(softmax_scale) if softmax_scale else 0.0,
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of an MPT checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "wte.weight", ("transformer.", ""), "MPT")
    if prefix + "wpe.weight" in names:
        # MosaicML's code adds it to the embedding; transformers' MPT has no such table.
        raise ValueError(
            f"MPT checkpoint has a learned position table ({prefix}wpe.weight) besides ALiBi; "
            f"octavo runs MPT as transformers does, with ALiBi only")
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "wte.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}blocks.{layer}.", f"layers.{layer}."
        add_norm(plan, spec, ours + "input_norm", hf + "norm_1")
        add_linear(plan, ours + "qkv", hf + "attn.Wqkv", 3 * hidden, hidden, False)
        add_linear(plan, ours + "o", hf + "attn.out_proj", hidden, hidden, False)
        add_norm(plan, spec, ours + "post_attn_norm", hf + "norm_2")
        add_linear(plan, ours + "up", hf + "ffn.up_proj", inter, hidden, False)
        add_linear(plan, ours + "down", hf + "ffn.down_proj", hidden, inter, False)
    add_head(plan, spec, prefix + "norm_f")
    return plan
