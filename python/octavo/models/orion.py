"""Orion (OrionForCausalLM; the code ships with the checkpoint): Llama's tensor names and
layout, with LayerNorm (weight and bias) in place of RMSNorm for the two norms of each layer and
the final one; its epsilon is config rms_norm_eps. attention_bias puts biases on q, k, v and o.
Dynamic NTK rope scaling is the plain rotary within max_position_embeddings (see
_llama_layout.remote_code_rope).
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, decoder_spec, head_dim_of, pick_architecture
from octavo.models._llama_layout import llama_layout_plan, remote_code_rope

ARCHITECTURES = ("OrionForCausalLM",)
MODEL_TYPES = ("orion",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an Orion config."""
    attention_bias = bool(config.get("attention_bias", False))
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        norm="layer_norm", norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                        norm_bias=True, rope=remote_code_rope(config, head_dim_of(config)),
                        qkv_bias=attention_bias, o_bias=attention_bias)


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Llama's tensor names, norms with .weight and .bias."""
    return llama_layout_plan(names, spec)
