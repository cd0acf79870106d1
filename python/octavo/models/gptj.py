"""GPT-J (GPTJForCausalLM): attention and MLP in parallel from one LayerNorm, GPT-J-paired
rotary (neighbouring elements rotate together) on the first rotary_dim elements of each head,
no attention biases, and an LM head with a bias.

HF tensors -> canonical, per layer L (prefix "transformer."):
    h.L.ln_1                          -> layers.L.input_norm (the only norm of the layer)
    h.L.attn.{q,k,v}_proj.weight      -> layers.L.qkv.weight (q | k | v rows)
    h.L.attn.out_proj.weight          -> layers.L.o.weight
    h.L.mlp.fc_in, h.L.mlp.fc_out     -> layers.L.up, layers.L.down (with biases)
and wte, ln_f, lm_head.{weight,bias} -> embed_tokens, final_norm, lm_head.{weight,bias}.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, add_separate_qkv, make_spec, pick_architecture, require)
from octavo.models._gpt_common import (
    activation, add_head, add_linear, add_norm, config_int, find_prefix, head_dim, plain_rope)

ARCHITECTURES = ("GPTJForCausalLM",)
MODEL_TYPES = ("gptj",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a GPT-J config (n_embd, n_layer, n_head, n_inner, n_positions,
    rotary_dim)."""
    hidden = config_int(config, "n_embd", "hidden_size")
    heads = config_int(config, "n_head", "num_attention_heads")
    size = head_dim(hidden, heads, config)
    # transformers' GPT-J needs rotary_dim: without it its tables do not fit the heads.
    rotary = plain_rope(size, int(require(config, "rotary_dim")), pairing="gptj")
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
        activation=activation(config, "activation_function", "gelu_new"),
        positions="rotary",
        rope=rotary,
        residual="parallel_one_norm",
        mlp_bias=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        lm_head_bias=True,
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a GPT-J checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "wte.weight", ("transformer.", ""), "GPT-J")
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "wte.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}h.{layer}.", f"layers.{layer}."
        add_norm(plan, spec, ours + "input_norm", hf + "ln_1")
        add_separate_qkv(plan, ours, hf + "attn.", hidden, hidden, hidden, False)
        add_linear(plan, ours + "o", hf + "attn.out_proj", hidden, hidden, False)
        add_linear(plan, ours + "up", hf + "mlp.fc_in", inter, hidden, True)
        add_linear(plan, ours + "down", hf + "mlp.fc_out", hidden, inter, True)
    add_head(plan, spec, prefix + "ln_f")
    return plan
