"""Gemma (GemmaForCausalLM): Llama's tensors with Gemma's math.

- RMSNorm scales by (1 + w): the checkpoint stores w, the engine's rms_norm_plus_one adds the 1.
- The token embedding is multiplied by sqrt(hidden_size).
- The MLP gate is GELU with the tanh approximation. Gemma's first configs say hidden_act "gelu"
  while the models were trained with the tanh form; transformers reads it as gelu_pytorch_tanh
  (and hidden_activation, when given, wins), and so does this.
- Embeddings are tied unless the config says otherwise (GemmaConfig's default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from octavo.models._common import WeightPlan, decoder_spec, pick_architecture
from octavo.models._llama_layout import llama_layout_plan

ARCHITECTURES = ("GemmaForCausalLM",)
MODEL_TYPES = ("gemma",)


def gemma_activation(config: dict) -> str:
    """hidden_activation, else hidden_act, with Gemma's legacy "gelu" meaning the tanh form."""
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


def gemma_spec(config: dict, architectures: tuple[str, ...], **overrides) -> dict:
    """The ModelSpec fields Gemma and Gemma 2 share."""
    attention_bias = bool(config.get("attention_bias", False))
    hidden = int(config.get("hidden_size") or 0)
    return decoder_spec(
        {**config, "hidden_act": gemma_activation(config)},
        architecture=pick_architecture(config, architectures),
        norm="rms_norm_plus_one",
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        embedding_scale=math.sqrt(hidden),
        **overrides,
    )


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Gemma config."""
    return gemma_spec(config, ARCHITECTURES)


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Llama's tensor names (model.layers.L.self_attn.q_proj, ...)."""
    return llama_layout_plan(names, spec)
