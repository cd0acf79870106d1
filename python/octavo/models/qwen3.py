"""Qwen3 (Qwen3ForCausalLM): Llama's tensors plus a per-head RMSNorm of q and k before rotary
(self_attn.{q,k}_norm.weight, [head_dim]); attention_bias puts biases on q, k, v and o. Sliding
windows as in Qwen2.
"""

from __future__ import annotations

from octavo.models._common import decoder_spec, pick_architecture
from octavo.models.llama import weight_plan  # noqa: F401  (same tensors)
from octavo.models.qwen2 import qwen_sliding_windows

ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPES = ("qwen3",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Qwen3 config."""
    attention_bias = bool(config.get("attention_bias", False))
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True,
                        sliding_window=qwen_sliding_windows(config))
