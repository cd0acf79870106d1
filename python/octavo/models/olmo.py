"""OLMo (OlmoForCausalLM, the first OLMo in the transformers layout: OLMo-1B-hf, OLMo-7B-hf):
Llama's tensors with non-parametric LayerNorms (no weight, no bias, eps 1e-5), so the checkpoint
holds no norm tensors at all; biases on q, k, v and o when attention_bias.

OLMo-2 (Olmo2ForCausalLM) is not this family: it normalises after attention and MLP instead of
before, and its q/k norms span all heads at once; ModelSpec expresses neither. clip_qkv (q, k and
v clamped to +-clip_qkv, OLMo-1.7) has no ModelSpec equivalent either; both are refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, decoder_spec, pick_architecture
from octavo.models._gpt_common import unsupported
from octavo.models._llama_layout import llama_layout_plan

ARCHITECTURES = ("OlmoForCausalLM",)
MODEL_TYPES = ("olmo",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an OLMo config."""
    if config.get("clip_qkv") is not None:
        raise unsupported(config, f"clip_qkv {config['clip_qkv']} (q, k and v clamped)")
    bias = bool(config.get("attention_bias", False))
    return decoder_spec(
        config, architecture=pick_architecture(config, ARCHITECTURES),
        norm="layer_norm_no_weight", norm_eps=1e-5, qkv_bias=bias, o_bias=bias)


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of an OLMo checkpoint comes from: Llama's layout, whose norms
    have no tensors here."""
    return llama_layout_plan(names, spec)
