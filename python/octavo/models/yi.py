"""Yi in its first release (YiForCausalLM, model_type "Yi"; the code shipped with the
checkpoint): Llama with the layer norms named ln1 (before attention) and ln2 (before the MLP).
Later Yi checkpoints are plain LlamaForCausalLM and load through llama.py. Dynamic NTK rope
scaling is the plain rotary within max_position_embeddings (see _llama_layout.remote_code_rope).
"""

from __future__ import annotations

from collections.abc import Iterable

from octavo.models._common import WeightPlan, decoder_spec, head_dim_of, pick_architecture
from octavo.models._llama_layout import llama_layout_plan, remote_code_rope

ARCHITECTURES = ("YiForCausalLM",)
MODEL_TYPES = ("Yi", "yi")


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Yi config (Llama's keys)."""
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        rope=remote_code_rope(config, head_dim_of(config)))


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Llama's tensor names with model.layers.L.ln1 / ln2 for the two norms."""
    return llama_layout_plan(names, spec, input_norm="ln1", post_attn_norm="ln2")
