"""Aquila and Aquila2 (AquilaForCausalLM, AquilaModel; the code ships with the checkpoint): a
copy of Llama, tensor names and config keys included. Dynamic NTK rope scaling is the plain
rotary within max_position_embeddings (see _llama_layout.remote_code_rope).
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, decoder_spec, head_dim_of, pick_architecture
from octavo.models._llama_layout import llama_layout_plan, remote_code_rope

ARCHITECTURES = ("AquilaForCausalLM", "AquilaModel")
MODEL_TYPES = ("aquila",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of an Aquila config."""
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        rope=remote_code_rope(config, head_dim_of(config)))


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Llama's tensor names (model.layers.L.self_attn.q_proj, ...)."""
    return llama_layout_plan(names, spec)
