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

from octavo.models._common import WeightPlan, glu_activation, make_spec, pick_architecture, require
from octavo.models._gpt_common import head_dim, rope, unsupported
from octavo.models._llama_layout import llama_layout_plan

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
    """Where each canonical tensor of a StableLM checkpoint comes from: Llama's layout, without
    the pre-MLP norm in parallel blocks."""
    sequential = spec["residual"] == "sequential"
    return llama_layout_plan(names, spec,
                             post_attn_norm="post_attention_layernorm" if sequential else None)
