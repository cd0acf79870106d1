"""StableLM (StableLmForCausalLM; StableLMEpochForCausalLM, the name of StableLM-3B-4E1T's first
upload): LayerNorm with bias, partial NeoX rotary (0.25 of each head by default), a SiLU-gated
MLP without biases, q/k/v biases when use_qkv_bias, attention and MLP in sequence or, with
use_parallel_residual, in parallel from one norm.

HF tensors -> canonical: Llama's names (model.layers.L.self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm, lm_head), the
norms with biases. StableLM-2-12B's qk_layernorm (a separate LayerNorm per head) has no ModelSpec
equivalent and is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, add_separate_qkv, glu_activation, make_spec, pick_architecture, require)
from octavo.models._gpt_common import (
    add_head, add_linear, add_norm, find_prefix, head_dim, rope, unsupported)

ARCHITECTURES = ("StableLmForCausalLM", "StableLMEpochForCausalLM")
MODEL_TYPES = ("stablelm", "stablelm_epoch")


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a StableLM config (rope_pct and norm_eps of StableLM-Epoch configs
    read too)."""
    if config.get("qk_layernorm"):
        raise unsupported(config, "qk_layernorm (a LayerNorm of its own for every head)")
    hidden = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    size = head_dim(hidden, heads, config)
    qkv_bias = bool(config.get("use_qkv_bias", False))
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
        norm_eps=float(config.get("layer_norm_eps", config.get("norm_eps", 1e-5))),
        activation=glu_activation(config),
        rope=rope(config, size, partial_rotary_factor=float(config.get("rope_pct", 0.25))),
        residual=("parallel_one_norm" if config.get("use_parallel_residual") else "sequential"),
        qkv_bias=qkv_bias,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a StableLM checkpoint comes from."""
    names = set(names)
    prefix = find_prefix(names, "embed_tokens.weight", ("model.",), "StableLM")
    hidden, inter, size = spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]
    q_rows, kv_rows = spec["num_heads"] * size, spec["num_kv_heads"] * size
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", (prefix + "embed_tokens.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"{prefix}layers.{layer}.", f"layers.{layer}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
        add_separate_qkv(plan, ours, attn, q_rows, kv_rows, hidden, spec["qkv_bias"])
        add_linear(plan, ours + "o", attn + "o_proj", hidden, q_rows, False)
        if spec["residual"] == "sequential":
            add_norm(plan, spec, ours + "post_attn_norm", hf + "post_attention_layernorm")
        plan.add(ours + "gate_up.weight", (mlp + "gate_proj.weight", (inter, hidden)),
                 (mlp + "up_proj.weight", (inter, hidden)))
        add_linear(plan, ours + "down", mlp + "down_proj", hidden, inter, False)
    add_head(plan, spec, prefix + "norm")
    return plan
