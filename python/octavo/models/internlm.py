"""InternLM (InternLMForCausalLM, the first InternLM; its code ships with the checkpoint):
Llama's tensors and math with biases on q, k, v and o (config "bias", default true).

The rotary settings live in config "rotary": {"base": theta, "type": "origin" | "dynamic",
"scaling_factor": f}. Its dynamic NTK changes the base only past max_position_embeddings, which
octavo never reaches (see _llama_layout.remote_code_rope), so both types are the plain rotary.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import (
    WeightPlan, architecture_of, decoder_spec, head_dim_of, pick_architecture, rope_from_config)
from octavo.models._llama_layout import llama_layout_plan

ARCHITECTURES = ("InternLMForCausalLM",)
MODEL_TYPES = ("internlm",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an InternLM config."""
    rotary = dict(config.get("rotary") or {"base": 10000, "type": "dynamic"})
    if rotary.get("type", "origin") not in ("origin", "dynamic"):
        raise ValueError(
            f"rotary type {rotary.get('type')!r} of {architecture_of(config)} is not supported; "
            f"supported: origin, dynamic")
    theta = rotary.get("base", config.get("rope_theta", 10000))
    rope = rope_from_config({**config, "rope_theta": theta, "rope_scaling": None,
                             "rope_parameters": None}, head_dim_of(config))
    bias = bool(config.get("bias", True))
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES), rope=rope,
                        qkv_bias=bias, o_bias=bias)


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Llama's tensor names (model.layers.L.self_attn.q_proj, ...)."""
    return llama_layout_plan(names, spec)
