"""Jais (JAISLMHeadModel: jais-13b, jais-30b, jais-family; code published with the checkpoints,
not in transformers, so read here from its layout and config keys). GPT-2's tensors and block
with three changes: a SwiGLU MLP (c_fc2 is the gated branch: c_fc(x) * silu(c_fc2(x))), ALiBi
instead of learned positions (position_embedding_type "alibi"), and muP scales:
    embeddings_scale (mup_embeddings_scale)   multiplies the input embedding (token + position)
    width_scale (mup_output_alpha * mup_width_scale)  multiplies the logits
    scale_qk_dot_by_d (mup_scale_qk_dot_by_d) softmax scale 1/head_dim instead of 1/sqrt(head_dim)

HF tensors -> canonical, per layer L (prefix "transformer." or none):
    h.L.ln_1, h.L.ln_2                -> layers.L.input_norm, layers.L.post_attn_norm
    h.L.attn.c_attn (Conv1D)          -> layers.L.qkv (transposed; q | k | v rows)
    h.L.attn.c_proj (Conv1D)          -> layers.L.o
    h.L.mlp.c_fc2, h.L.mlp.c_fc       -> layers.L.gate_up (gate rows from c_fc2, up rows from
                                         c_fc; both transposed)
    h.L.mlp.c_proj (Conv1D)           -> layers.L.down
and wte, wpe (learned positions only), ln_f -> embed_tokens, embed_positions, final_norm.

The logit scale is folded into ln_f (weight and bias times width_scale: the LM head is a bias-free
linear map, tied to the embedding, so scaling its input scales the logits); with learned
positions the embedding scale is folded into wpe, since the engine scales the token row only.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import numpy as np

from octavo.models._common import WeightPlan, make_spec, pick_architecture, require
from octavo.models._gpt_common import (
    ACTIVATIONS, add_conv1d, config_int, find_prefix, head_dim, scale_values, unsupported)

ARCHITECTURES = ("JAISLMHeadModel",)
MODEL_TYPES = ("jais",)
# weight_plan folds the muP scales of the config into ln_f and wpe.
WEIGHTS_USE_CONFIG = True


def _scales(config: dict) -> tuple[float, float, bool]:
    """(embeddings scale, logits scale, scale q.k by 1/d) under either generation of key names."""
    embeddings = config.get("embeddings_scale", config.get("mup_embeddings_scale", 1.0))
    if config.get("width_scale") is not None:
        logits = config["width_scale"]
    else:
        logits = (config.get("mup_output_alpha", 1.0) or 1.0) * (
            config.get("mup_width_scale", 1.0) or 1.0)
    by_d = config.get("scale_qk_dot_by_d", config.get("mup_scale_qk_dot_by_d", False))
    return float(embeddings or 1.0), float(logits), bool(by_d)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Jais config."""
    if config.get("scale_attn_by_inverse_layer_idx"):
        raise unsupported(config, "scale_attn_by_inverse_layer_idx (a per-layer softmax scale)")
    if config.get("add_cross_attention"):
        raise unsupported(config, "add_cross_attention (an encoder-decoder model)")
    if config.get("alibi_scaling"):
        raise unsupported(config, f"alibi_scaling {config['alibi_scaling']!r}")
    position_type = config.get("position_embedding_type", "learned")
    if position_type not in ("alibi", "learned"):
        raise unsupported(config, f"position_embedding_type {position_type!r}")
    act = config.get("activation_function", "gelu_new")
    if act != "swiglu" and act not in ACTIVATIONS:
        raise ValueError(
            f"JAISLMHeadModel: activation_function {act!r} is not supported; supported: swiglu, "
            f"{', '.join(sorted(ACTIVATIONS))}")
    hidden = config_int(config, "n_embd", "hidden_size")
    heads = config_int(config, "n_head", "num_attention_heads")
    size = head_dim(hidden, heads, config)
    embeddings_scale, _, by_d = _scales(config)
    if not config.get("scale_attn_weights", True):
        attention_scale = 1.0
    else:
        attention_scale = 1.0 / size if by_d else 0.0
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=config_int(config, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=size,
        intermediate_size=int(config.get("n_inner") or 4 * hidden),
        max_position_embeddings=config_int(config, "n_positions", "max_position_embeddings"),
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        activation="silu_glu" if act == "swiglu" else ACTIVATIONS[act],
        positions=position_type,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        embedding_scale=embeddings_scale,
        attention_scale=attention_scale,
    )


def weight_plan(names: Iterable[str], spec: dict, config: dict) -> WeightPlan:
    """Where each canonical tensor of a Jais checkpoint comes from; `config` gives the muP scales
    folded into ln_f (and wpe)."""
    names = set(names)
    prefix = find_prefix(names, "wte.weight", ("transformer.", ""), "Jais")
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    embeddings_scale, logits_scale, _ = _scales(config)
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "wte.weight", (spec["vocab_size"], hidden)))
    if spec["positions"] == "learned":
        plan.add("embed_positions.weight",
                 (prefix + "wpe.weight", (spec["max_position_embeddings"], hidden)),
                 transform=partial(scale_values, factor=embeddings_scale))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}h.{layer}.", f"layers.{layer}."
        for norm, hf_norm in (("input_norm", "ln_1"), ("post_attn_norm", "ln_2")):
            plan.add(f"{ours}{norm}.weight", (f"{hf}{hf_norm}.weight", (hidden,)))
            plan.add(f"{ours}{norm}.bias", (f"{hf}{hf_norm}.bias", (hidden,)))
        add_conv1d(plan, ours + "qkv", hf + "attn.c_attn", 3 * hidden, hidden, bias=True)
        add_conv1d(plan, ours + "o", hf + "attn.c_proj", hidden, hidden, bias=True)
        if spec["activation"] == "silu_glu":
            # Both Conv1D weights are [hidden, inter]: stacked, then each transposed.
            plan.add(ours + "gate_up.weight", (hf + "mlp.c_fc2.weight", (hidden, inter)),
                     (hf + "mlp.c_fc.weight", (hidden, inter)),
                     transform=partial(_transpose_halves, rows=hidden))
            plan.add(ours + "gate_up.bias", (hf + "mlp.c_fc2.bias", (inter,)),
                     (hf + "mlp.c_fc.bias", (inter,)))
        else:
            add_conv1d(plan, ours + "up", hf + "mlp.c_fc", inter, hidden, bias=True)
        add_conv1d(plan, ours + "down", hf + "mlp.c_proj", hidden, inter, bias=True)
    scale = partial(scale_values, factor=logits_scale)
    plan.add("final_norm.weight", (prefix + "ln_f.weight", (hidden,)), transform=scale)
    plan.add("final_norm.bias", (prefix + "ln_f.bias", (hidden,)), transform=scale)
    if not spec["tied_embeddings"]:
        plan.add("lm_head.weight", ("lm_head.weight", (spec["vocab_size"], hidden)))
    return plan


def _transpose_halves(array: np.ndarray, rows: int) -> np.ndarray:
    """Two Conv1D weights stacked by rows ([2 * in, out]) -> the two Linear weights stacked."""
    return np.concatenate([array[:rows].T, array[rows:].T])
