"""Qwen, the first one (QWenLMHeadModel, model_type "qwen"; the code ships with the checkpoint):
Qwen2's math in GPT-2-style names.

    transformer.wte.weight                    -> embed_tokens.weight
    transformer.h.L.ln_1.weight               -> layers.L.input_norm.weight
    transformer.h.L.attn.c_attn.{weight,bias} -> layers.L.qkv.* (q|k|v rows; always a bias)
    transformer.h.L.attn.c_proj.weight        -> layers.L.o.weight
    transformer.h.L.ln_2.weight               -> layers.L.post_attn_norm.weight
    transformer.h.L.mlp.w2 | w1               -> gate | up (layers.L.gate_up): Qwen computes
                                                 w1(x) * silu(w2(x))
    transformer.h.L.mlp.c_proj.weight         -> layers.L.down.weight
    transformer.ln_f.weight, lm_head.weight   -> final_norm.weight, lm_head.weight

config.intermediate_size counts both w1 and w2 (each has half); kv_channels is the head size;
rotary_pct of it rotates, with base rotary_emb_base. no_bias=false would add biases to c_proj and
the MLP.

Qwen's use_dynamic_ntk and use_logn_attn (on in the published configs) change the rotary base and
scale queries only for sequences longer than seq_length; below it both are exactly off. With
either on, octavo caps the context at seq_length (its max_position_embeddings), so its output is
Qwen's own.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, decoder_spec, pick_architecture, require

ARCHITECTURES = ("QWenLMHeadModel",)
MODEL_TYPES = ("qwen",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a (first) Qwen config."""
    heads = int(require(config, "num_attention_heads"))
    hidden = int(require(config, "hidden_size"))
    head_dim = int(config.get("kv_channels") or hidden // heads)
    if heads * head_dim != hidden:
        raise ValueError(f"Qwen's kv_channels {head_dim} x num_attention_heads {heads} must equal "
                         f"hidden_size {hidden}")
    max_positions = int(require(config, "max_position_embeddings"))
    if config.get("use_dynamic_ntk", True) or config.get("use_logn_attn", True):
        max_positions = min(max_positions, int(config.get("seq_length") or max_positions))
    bias = not bool(config.get("no_bias", True))
    llama_keys = {
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "vocab_size": require(config, "vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": require(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "intermediate_size": int(require(config, "intermediate_size")) // 2,
        "max_position_embeddings": max_positions,
        "hidden_act": "silu",
        "rope_theta": float(config.get("rotary_emb_base", 10000.0)),
        "partial_rotary_factor": float(config.get("rotary_pct", 1.0)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    return decoder_spec(llama_keys, architecture=pick_architecture(config, ARCHITECTURES),
                        norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
                        qkv_bias=True, o_bias=bias, mlp_bias=bias)


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a Qwen checkpoint comes from; raises ValueError naming the
    first HF tensor that `names` lacks."""
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    qkv_rows = 3 * spec["num_heads"] * spec["head_dim"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", ("transformer.wte.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"transformer.h.{layer}.", f"layers.{layer}."
        plan.add(ours + "input_norm.weight", (hf + "ln_1.weight", (hidden,)))
        plan.add(ours + "qkv.weight", (hf + "attn.c_attn.weight", (qkv_rows, hidden)))
        plan.add(ours + "qkv.bias", (hf + "attn.c_attn.bias", (qkv_rows,)))
        plan.add(ours + "o.weight", (hf + "attn.c_proj.weight", (hidden, hidden)))
        if spec["o_bias"]:
            plan.add(ours + "o.bias", (hf + "attn.c_proj.bias", (hidden,)))
        plan.add(ours + "post_attn_norm.weight", (hf + "ln_2.weight", (hidden,)))
        plan.add(ours + "gate_up.weight", (hf + "mlp.w2.weight", (inter, hidden)),
                 (hf + "mlp.w1.weight", (inter, hidden)))
        if spec["mlp_bias"]:
            plan.add(ours + "gate_up.bias", (hf + "mlp.w2.bias", (inter,)),
                     (hf + "mlp.w1.bias", (inter,)))
        plan.add(ours + "down.weight", (hf + "mlp.c_proj.weight", (hidden, inter)))
        if spec["mlp_bias"]:
            plan.add(ours + "down.bias", (hf + "mlp.c_proj.bias", (hidden,)))
    plan.add("final_norm.weight", ("transformer.ln_f.weight", (hidden,)))
    if not spec["tied_embeddings"]:
        plan.add("lm_head.weight", ("lm_head.weight", (spec["vocab_size"], hidden)))
    return plan
