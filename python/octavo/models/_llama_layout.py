"""Llama's tensor layout under the names and variations that other families use.

Many families are Llama's decoder with a twist in the checkpoint: a fused q|k|v tensor
(Baichuan's W_pack), biases on the attention (InternLM), LayerNorm with a bias in place of RMSNorm
(Orion), other names for the two norms (Yi's ln1 / ln2; Gemma 2's pre_feedforward_layernorm),
norms around the attention and MLP outputs (Gemma 2), or a KV head count per layer (DeciLM).
`llama_layout_plan` reads all of them.

Families whose modeling code lives outside transformers (InternLM, InternLM2, DeciLM, Aquila, Yi,
Orion: loaded there with trust_remote_code) are read from their published config keys and tensor
names; octavo never runs their code. `remote_code_rope` reads their rotary settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from octavo.models._common import WeightPlan, add_norm, add_separate_qkv, rope_from_config


def kv_heads_of(spec: dict, layer: int) -> int:
    """The layer's KV head count: its num_kv_heads_per_layer entry, else num_kv_heads."""
    per_layer = spec.get("num_kv_heads_per_layer") or []
    return int(per_layer[layer]) if per_layer else int(spec["num_kv_heads"])


def llama_layout_plan(names: Iterable[str], spec: dict, *, fused_qkv: str | None = None,
                      input_norm: str = "input_layernorm",
                      post_attn_norm: str | None = "post_attention_layernorm",
                      sandwich_norms: tuple[str, str] | None = None,
                      lm_head_transform: Callable[[np.ndarray], np.ndarray] | None = None
                      ) -> WeightPlan:
    """Where each canonical tensor of a checkpoint in Llama's layout comes from:

        model.embed_tokens.weight, model.norm.{weight,bias}, lm_head.weight (absent when tied)
        model.layers.L.{input_norm}.{weight,bias}       -> layers.L.input_norm
        model.layers.L.self_attn.{q,k,v}_proj.{w,b}     -> layers.L.qkv (q|k|v rows)
            or model.layers.L.self_attn.{fused_qkv}.{w,b}, already q|k|v rows
        model.layers.L.self_attn.o_proj.{w,b}           -> layers.L.o
        model.layers.L.{post_attn_norm}.{weight,bias}   -> layers.L.post_attn_norm (pre-MLP norm;
                                                           None: a parallel block has none)
        model.layers.L.{sandwich_norms[0|1]}            -> layers.L.{attn_out,mlp_out}_norm
        model.layers.L.mlp.{gate,up}_proj.{w,b}         -> layers.L.gate_up (gate|up rows)
        model.layers.L.mlp.down_proj.{w,b}              -> layers.L.down

    Biases follow the spec's qkv_bias / o_bias / mlp_bias / norm_bias; k and v rows follow each
    layer's KV head count. `lm_head_transform` is applied to lm_head.weight. Raises ValueError
    naming the first HF tensor that `names` lacks.
    """
    hidden, head_dim, inter = spec["hidden_size"], spec["head_dim"], spec["intermediate_size"]
    q_rows = spec["num_heads"] * head_dim
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", ("model.embed_tokens.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"model.layers.{layer}.", f"layers.{layer}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        kv_rows = kv_heads_of(spec, layer) * head_dim
        qkv_rows = q_rows + 2 * kv_rows
        add_norm(plan, spec, ours + "input_norm", hf + input_norm)
        if fused_qkv is not None:
            plan.add(ours + "qkv.weight", (attn + fused_qkv + ".weight", (qkv_rows, hidden)))
            if spec["qkv_bias"]:
                plan.add(ours + "qkv.bias", (attn + fused_qkv + ".bias", (qkv_rows,)))
        else:
            add_separate_qkv(plan, ours, attn, q_rows, kv_rows, hidden, spec["qkv_bias"])
        plan.add(ours + "o.weight", (attn + "o_proj.weight", (hidden, q_rows)))
        if spec["o_bias"]:
            plan.add(ours + "o.bias", (attn + "o_proj.bias", (hidden,)))
        if sandwich_norms is not None:
            add_norm(plan, spec, ours + "attn_out_norm", hf + sandwich_norms[0])
        if post_attn_norm is not None:
            add_norm(plan, spec, ours + "post_attn_norm", hf + post_attn_norm)
        plan.add(ours + "gate_up.weight", (mlp + "gate_proj.weight", (inter, hidden)),
                 (mlp + "up_proj.weight", (inter, hidden)))
        if spec["mlp_bias"]:
            plan.add(ours + "gate_up.bias", (mlp + "gate_proj.bias", (inter,)),
                     (mlp + "up_proj.bias", (inter,)))
        plan.add(ours + "down.weight", (mlp + "down_proj.weight", (hidden, inter)))
        if spec["mlp_bias"]:
            plan.add(ours + "down.bias", (mlp + "down_proj.bias", (hidden,)))
        if sandwich_norms is not None:
            add_norm(plan, spec, ours + "mlp_out_norm", hf + sandwich_norms[1])
    add_norm(plan, spec, "final_norm", "model.norm")
    if not spec["tied_embeddings"]:
        # A tied checkpoint may still store lm_head.weight (a copy of the embedding): unused.
        plan.add("lm_head.weight", ("lm_head.weight", (spec["vocab_size"], hidden)),
                 transform=lm_head_transform)
    return plan


def remote_code_rope(config: dict, head_dim: int) -> dict:
    """The rope dict of a family whose code ships with the checkpoint, from rope_theta and
    rope_scaling ({"type": "linear" | "dynamic", "factor": f}).

    Their dynamic NTK scaling (each copies transformers' LlamaDynamicNTKScalingRotaryEmbedding)
    recomputes the rotary base only for a sequence longer than max_position_embeddings. octavo
    caps max_model_len at max_position_embeddings, where dynamic NTK is exactly the unscaled
    rotary, so it maps to no scaling.
    """
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key) or {}
        if isinstance(params, dict) and params.get("rope_type", params.get("type")) == "dynamic":
            theta = params.get("rope_theta", config.get("rope_theta"))
            config = {**config, key: None}
            if theta is not None:
                config["rope_theta"] = theta
    return rope_from_config(config, head_dim)
