"""ChatGLM2, ChatGLM3 and GLM-4 in their original layout (ChatGLMModel /
ChatGLMForConditionalGeneration, model_type "chatglm"; the code ships with the checkpoint).

The math is Llama's except for the rotary: only the first half of each head rotates (rotary_dim
= kv_channels / 2), in GPT-J's pairing of neighbours (2i, 2i + 1), with base 10000 * rope_ratio.
Multi-query groups (multi_query_group_num) are grouped-query KV heads; q, k and v carry a bias
(add_qkv_bias); add_bias_linear puts biases on the output projection and the MLP.

    transformer.embedding.word_embeddings.weight                -> embed_tokens.weight
    transformer.encoder.layers.L.input_layernorm.weight         -> layers.L.input_norm.weight
    transformer.encoder.layers.L.self_attention.query_key_value -> layers.L.qkv (q|k|v rows)
    transformer.encoder.layers.L.self_attention.dense           -> layers.L.o
    transformer.encoder.layers.L.post_attention_layernorm       -> layers.L.post_attn_norm
    transformer.encoder.layers.L.mlp.dense_h_to_4h              -> layers.L.gate_up (gate|up rows)
    transformer.encoder.layers.L.mlp.dense_4h_to_h              -> layers.L.down
    transformer.encoder.final_layernorm.weight                  -> final_norm.weight
    transformer.output_layer.weight                             -> lm_head.weight

Without multi_query_attention, query_key_value's rows are per head [q, k, v] and are regrouped.
The first ChatGLM-6B (2D positions, position_encoding_2d) is a different model and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from octavo.models._common import WeightPlan, add_norm, decoder_spec, pick_architecture, require

ARCHITECTURES = ("ChatGLMModel", "ChatGLMForConditionalGeneration")
MODEL_TYPES = ("chatglm",)


def _refuse(config: dict, key: str, value, why: str) -> None:
    if config.get(key, value) != value:
        raise ValueError(f"ChatGLM with {key}={config.get(key)!r} is not supported ({why})")


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a ChatGLM2 / ChatGLM3 / GLM-4 (original layout) config."""
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        raise ValueError(
            "the first ChatGLM-6B (2D position encoding) is not supported; ChatGLM2, ChatGLM3 and "
            "GLM-4 are")
    _refuse(config, "apply_residual_connection_post_layernorm", False,
            "the residual would be the normed input")
    _refuse(config, "post_layer_norm", True, "octavo's decoder always ends with a norm")
    _refuse(config, "original_rope", True, "only the original rotary is published")
    if config.get("quantization_bit"):
        raise ValueError(f"ChatGLM quantized to {config['quantization_bit']} bits is not supported")
    heads = int(require(config, "num_attention_heads"))
    hidden = int(require(config, "hidden_size"))
    head_dim = int(config.get("kv_channels") or hidden // heads)
    kv_heads = heads
    if config.get("multi_query_attention"):
        kv_heads = int(require(config, "multi_query_group_num"))
        if kv_heads == heads:
            # The plan tells the per-head [q, k, v] layout (no groups) by kv_heads == heads.
            raise ValueError(
                f"ChatGLM with multi_query_attention and multi_query_group_num equal to "
                f"num_attention_heads ({heads}) is not supported (no published checkpoint has "
                f"it)")
    rms = bool(config.get("rmsnorm", True))
    bias_linear = bool(config.get("add_bias_linear", False))
    llama_keys = {
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "vocab_size": config.get("padded_vocab_size") or require(config, "vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": require(config, "num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": require(config, "ffn_hidden_size"),
        "max_position_embeddings": require(config, "seq_length"),
        "hidden_act": "silu",
        "rope_theta": 10000.0 * float(config.get("rope_ratio", 1.0)),
        "tie_word_embeddings": False,
    }
    spec = decoder_spec(
        llama_keys,
        architecture=pick_architecture(config, ARCHITECTURES),
        norm="rms_norm" if rms else "layer_norm",
        norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
        norm_bias=not rms,
        qkv_bias=bias_linear or bool(config.get("add_qkv_bias", False)),
        o_bias=bias_linear,
        mlp_bias=bias_linear,
    )
    spec["rope"].update(pairing="gptj", rotary_dim=head_dim // 2)
    return spec


def split_per_head_qkv(num_heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """Rows [head][q, k, v][head_dim] -> all q | all k | all v (weights and biases alike)."""

    def transform(rows: np.ndarray) -> np.ndarray:
        tail = rows.shape[1:]
        per_head = rows.reshape(num_heads, 3, head_dim, *tail)
        return np.concatenate(
            [per_head[:, i].reshape(num_heads * head_dim, *tail) for i in range(3)], axis=0)

    return transform


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a ChatGLM checkpoint comes from; raises ValueError naming
    the first HF tensor that `names` lacks."""
    hidden, head_dim, inter = spec["hidden_size"], spec["head_dim"], spec["intermediate_size"]
    heads, kv_heads = spec["num_heads"], spec["num_kv_heads"]
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    # Without multi-query groups every head has its own k and v, stored beside its q.
    regroup = split_per_head_qkv(heads, head_dim) if kv_heads == heads else None
    plan = WeightPlan(names)
    plan.add("embed_tokens.weight",
             ("transformer.embedding.word_embeddings.weight", (spec["vocab_size"], hidden)))
    for layer in range(spec["num_layers"]):
        hf, ours = f"transformer.encoder.layers.{layer}.", f"layers.{layer}."
        attn, mlp = hf + "self_attention.", hf + "mlp."
        add_norm(plan, spec, ours + "input_norm", hf + "input_layernorm")
        plan.add(ours + "qkv.weight", (attn + "query_key_value.weight", (qkv_rows, hidden)),
                 transform=regroup)
        if spec["qkv_bias"]:
            plan.add(ours + "qkv.bias", (attn + "query_key_value.bias", (qkv_rows,)),
                     transform=regroup)
        plan.add(ours + "o.weight", (attn + "dense.weight", (hidden, heads * head_dim)))
        if spec["o_bias"]:
            plan.add(ours + "o.bias", (attn + "dense.bias", (hidden,)))
        add_norm(plan, spec, ours + "post_attn_norm", hf + "post_attention_layernorm")
        plan.add(ours + "gate_up.weight", (mlp + "dense_h_to_4h.weight", (2 * inter, hidden)))
        if spec["mlp_bias"]:
            plan.add(ours + "gate_up.bias", (mlp + "dense_h_to_4h.bias", (2 * inter,)))
        plan.add(ours + "down.weight", (mlp + "dense_4h_to_h.weight", (hidden, inter)))
        if spec["mlp_bias"]:
            plan.add(ours + "down.bias", (mlp + "dense_4h_to_h.bias", (hidden,)))
    add_norm(plan, spec, "final_norm", "transformer.encoder.final_layernorm")
    plan.add("lm_head.weight", ("transformer.output_layer.weight", (spec["vocab_size"], hidden)))
    return plan
