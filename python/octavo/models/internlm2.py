"""InternLM2 and InternLM2.5 (InternLM2ForCausalLM; the code ships with the checkpoint).

Llama's math under other names, with q, k and v in one tensor grouped by KV head:

    model.tok_embeddings.weight                 -> embed_tokens.weight
    model.layers.L.attention_norm.weight        -> layers.L.input_norm.weight
    model.layers.L.attention.wqkv.{weight,bias} -> layers.L.qkv.* (rows regrouped, below)
    model.layers.L.attention.wo.{weight,bias}   -> layers.L.o.*
    model.layers.L.ffn_norm.weight              -> layers.L.post_attn_norm.weight
    model.layers.L.feed_forward.w1 | w3 | w2    -> gate | up (layers.L.gate_up), down
    model.norm.weight, output.weight            -> final_norm.weight, lm_head.weight

wqkv's rows are, for each KV head h, the q rows of the num_heads / num_kv_heads query heads that
share it, then h's k rows, then its v rows (InternLM2's "q (h gs d)" split); octavo wants all q
rows, then all k rows, then all v rows. Config "bias" (InternLM2Config's default: true) puts
biases on wqkv and wo. Dynamic NTK rope scaling is the plain rotary within max_position_embeddings
(see _llama_layout.remote_code_rope).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from octavo.models._common import WeightPlan, decoder_spec, head_dim_of, pick_architecture
from octavo.models._llama_layout import remote_code_rope

ARCHITECTURES = ("InternLM2ForCausalLM",)
MODEL_TYPES = ("internlm2",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an InternLM2 config."""
    bias = bool(config.get("bias", True))
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        rope=remote_code_rope(config, head_dim_of(config)),
                        qkv_bias=bias, o_bias=bias)


def ungroup_qkv(num_kv_heads: int, group: int, head_dim: int
                ) -> Callable[[np.ndarray], np.ndarray]:
    """Rows [kv head][q of its `group` query heads, k, v][head_dim] -> all q | all k | all v.
    Works on weights ([rows, hidden]) and biases ([rows]) alike: only rows move."""

    def transform(rows: np.ndarray) -> np.ndarray:
        tail = rows.shape[1:]
        grouped = rows.reshape(num_kv_heads, group + 2, head_dim, *tail)
        q = grouped[:, :group].reshape(num_kv_heads * group * head_dim, *tail)
        k = grouped[:, group].reshape(num_kv_heads * head_dim, *tail)
        v = grouped[:, group + 1].reshape(num_kv_heads * head_dim, *tail)
        return np.concatenate([q, k, v], axis=0)

    return transform


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of an InternLM2 checkpoint comes from; raises ValueError naming
    the first HF tensor that `names` lacks."""
    hidden, head_dim, inter = spec["hidden_size"], spec["head_dim"], spec["intermediate_size"]
    heads, kv_heads = spec["num_heads"], spec["num_kv_heads"]
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    regroup = ungroup_qkv(kv_heads, heads // kv_heads, head_dim)
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight", ("model.tok_embeddings.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"model.layers.{layer}.", f"layers.{layer}."
        plan.add(ours + "input_norm.weight", (hf + "attention_norm.weight", (hidden,)))
        plan.add(ours + "qkv.weight", (hf + "attention.wqkv.weight", (qkv_rows, hidden)),
                 transform=regroup)
        if spec["qkv_bias"]:
            plan.add(ours + "qkv.bias", (hf + "attention.wqkv.bias", (qkv_rows,)),
                     transform=regroup)
        plan.add(ours + "o.weight", (hf + "attention.wo.weight", (hidden, heads * head_dim)))
        if spec["o_bias"]:
            plan.add(ours + "o.bias", (hf + "attention.wo.bias", (hidden,)))
        plan.add(ours + "post_attn_norm.weight", (hf + "ffn_norm.weight", (hidden,)))
        plan.add(ours + "gate_up.weight", (hf + "feed_forward.w1.weight", (inter, hidden)),
                 (hf + "feed_forward.w3.weight", (inter, hidden)))
        plan.add(ours + "down.weight", (hf + "feed_forward.w2.weight", (hidden, inter)))
    plan.add("final_norm.weight", ("model.norm.weight", (hidden,)))
    if not spec["tied_embeddings"]:
        plan.add("lm_head.weight", ("output.weight", (spec["vocab_size"], hidden)))
    return plan
