"""Llama (LlamaForCausalLM): the reference layout that Mistral and Qwen reuse.

HF tensors -> canonical (model_spec.h), per layer L:
    model.layers.L.self_attn.{q,k,v}_proj.{weight,bias}  -> layers.L.qkv.{weight,bias} (q|k|v rows)
    model.layers.L.self_attn.o_proj.{weight,bias}        -> layers.L.o.{weight,bias}
    model.layers.L.self_attn.{q,k}_norm.weight           -> layers.L.{q,k}_norm.weight
    model.layers.L.mlp.{gate,up}_proj.{weight,bias}      -> layers.L.gate_up.{weight,bias}
    model.layers.L.mlp.down_proj.{weight,bias}           -> layers.L.down.{weight,bias}
    model.layers.L.input_layernorm.weight                -> layers.L.input_norm.weight
    model.layers.L.post_attention_layernorm.weight       -> layers.L.post_attn_norm.weight
and model.embed_tokens.weight, model.norm.weight, lm_head.weight -> embed_tokens.weight,
final_norm.weight, lm_head.weight (not emitted when the embeddings are tied). Other tensors
(rotary_emb.inv_freq of old checkpoints) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, add_separate_qkv, decoder_spec, pick_architecture)

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = ("llama",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Llama config. attention_bias puts biases on q, k, v and o;
    mlp_bias on gate, up and down."""
    attention_bias = bool(config.get("attention_bias", False))
    return decoder_spec(
        config,
        architecture=pick_architecture(config, ARCHITECTURES),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
    )


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a Llama-style checkpoint comes from; raises ValueError
    naming the first HF tensor that `names` lacks."""
    hidden, head_dim = spec["hidden_size"], spec["head_dim"]
    q_rows, kv_rows = spec["num_heads"] * head_dim, spec["num_kv_heads"] * head_dim
    inter = spec["intermediate_size"]
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", ("model.embed_tokens.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"model.layers.{layer}.", f"layers.{layer}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        plan.add(ours + "input_norm.weight", (hf + "input_layernorm.weight", (hidden,)))
        add_separate_qkv(plan, ours, attn, q_rows, kv_rows, hidden, spec["qkv_bias"])
        if spec["qk_norm"]:
            plan.add(ours + "q_norm.weight", (attn + "q_norm.weight", (head_dim,)))
            plan.add(ours + "k_norm.weight", (attn + "k_norm.weight", (head_dim,)))
        plan.add(ours + "o.weight", (attn + "o_proj.weight", (hidden, q_rows)))
        if spec["o_bias"]:
            plan.add(ours + "o.bias", (attn + "o_proj.bias", (hidden,)))
        plan.add(ours + "post_attn_norm.weight",
                 (hf + "post_attention_layernorm.weight", (hidden,)))
        plan.add(ours + "gate_up.weight", (mlp + "gate_proj.weight", (inter, hidden)),
                 (mlp + "up_proj.weight", (inter, hidden)))
        if spec["mlp_bias"]:
            plan.add(ours + "gate_up.bias", (mlp + "gate_proj.bias", (inter,)),
                     (mlp + "up_proj.bias", (inter,)))
        plan.add(ours + "down.weight", (mlp + "down_proj.weight", (hidden, inter)))
        if spec["mlp_bias"]:
            plan.add(ours + "down.bias", (mlp + "down_proj.bias", (hidden,)))
    plan.add("final_norm.weight", ("model.norm.weight", (hidden,)))
    if not spec["tied_embeddings"]:
        # A tied checkpoint may still store lm_head.weight (a copy of the embedding): unused.
        plan.add("lm_head.weight", ("lm_head.weight", (spec["vocab_size"], hidden)))
    return plan
