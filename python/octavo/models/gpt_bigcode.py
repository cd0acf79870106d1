"""GPT BigCode (GPTBigCodeForCausalLM: StarCoder, SantaCoder): GPT-2's block with nn.Linear
weights and, usually, multi-query attention (one key/value head).

HF tensors -> canonical, per layer L (prefix "transformer."):
    h.L.ln_1, h.L.ln_2                -> layers.L.input_norm, layers.L.post_attn_norm
    h.L.attn.c_attn.{weight,bias}     -> layers.L.qkv.{weight,bias}
        multi_query: rows q | k | v already; otherwise per head [q, k, v] rows, regrouped
    h.L.attn.c_proj                   -> layers.L.o
    h.L.mlp.c_fc, h.L.mlp.c_proj      -> layers.L.up, layers.L.down
and wte, wpe, ln_f -> embed_tokens, embed_positions, final_norm; lm_head tied unless the config
says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, make_spec, pick_architecture, require
from octavo.models._gpt_common import (
    activation, add_head, add_linear, add_norm, config_int, find_prefix, head_dim, per_head_qkv,
    unsupported)

ARCHITECTURES = ("GPTBigCodeForCausalLM",)
MODEL_TYPES = ("gpt_bigcode",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a GPT BigCode config; multi_query (default true) means one KV head."""
    if config.get("add_cross_attention"):
        raise unsupported(config, "add_cross_attention (an encoder-decoder model)")
    hidden = config_int(config, "n_embd", "hidden_size")
    heads = config_int(config, "n_head", "num_attention_heads")
    return make_spec(
        architecture=pick_architecture(config, ARCHITECTURES),
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=config_int(config, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=1 if config.get("multi_query", True) else heads,
        head_dim=head_dim(hidden, heads, config),
        intermediate_size=int(config.get("n_inner") or 4 * hidden),
        max_position_embeddings=config_int(config, "n_positions", "max_position_embeddings"),
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        activation=activation(config, "activation_function", "gelu_pytorch_tanh"),
        positions="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_scale=0.0 if config.get("scale_attn_weights", True) else 1.0,
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a GPT BigCode checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "wte.weight", ("transformer.", ""), "GPT BigCode")
    hidden, inter, size = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    heads, kv_heads = spec["num_heads"], spec["num_kv_heads"]
    qkv_rows = (heads + 2 * kv_heads) * size
    # Multi-head checkpoints view c_attn's output as [heads, 3 * head_dim].
    regroup = None if kv_heads == 1 else per_head_qkv(heads, size)
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "wte.weight", (spec["vocab_size"], hidden)))
    plan.add("embed_positions.weight",
             (prefix + "wpe.weight", (spec["max_position_embeddings"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}h.{layer}.", f"layers.{layer}."
        add_norm(plan, spec, ours + "input_norm", hf + "ln_1")
        add_linear(plan, ours + "qkv", hf + "attn.c_attn", qkv_rows, hidden, True, regroup)
        add_linear(plan, ours + "o", hf + "attn.c_proj", hidden, hidden, True)
        add_norm(plan, spec, ours + "post_attn_norm", hf + "ln_2")
        add_linear(plan, ours + "up", hf + "mlp.c_fc", inter, hidden, True)
        add_linear(plan, ours + "down", hf + "mlp.c_proj", hidden, inter, True)
    add_head(plan, spec, prefix + "ln_f")
    return plan
