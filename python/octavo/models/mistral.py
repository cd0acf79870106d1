"""Mistral (MistralForCausalLM): Llama's layout and tensors, with a sliding window on every
layer when config.sliding_window is set.

transformers' Mistral ignores `layer_types` (it warns and points to Ministral), so this does too.
"""

from __future__ import annotations

from octavo.models._common import decoder_spec, pick_architecture
from octavo.models.llama import weight_plan  # noqa: F401  (same tensors)

ARCHITECTURES = ("MistralForCausalLM",)
MODEL_TYPES = ("mistral",)


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Mistral config: no biases; every layer attends to the last
    sliding_window positions (0 = full attention when sliding_window is null)."""
    num_layers = int(config.get("num_hidden_layers") or 0)
    window = int(config.get("sliding_window") or 0)
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        sliding_window=[window] * num_layers)
