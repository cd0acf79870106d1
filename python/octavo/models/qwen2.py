"""Qwen2 (Qwen2ForCausalLM): Llama's tensors plus biases on q, k and v (never on o).

Sliding windows follow transformers' Qwen2Config: `layer_types` when the config lists them,
else layers from max_window_layers on slide when use_sliding_window is true; a "sliding" layer
uses sliding_window only while use_sliding_window is true.
"""

from __future__ import annotations

from octavo.models._common import decoder_spec, pick_architecture, windows_from_layer_types
from octavo.models.llama import weight_plan  # noqa: F401  (same tensors)

ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = ("qwen2",)


def qwen_sliding_windows(config: dict) -> list[int]:
    """Per-layer windows (0 = full) as transformers' Qwen2/Qwen3 configs define them."""
    num_layers = int(config.get("num_hidden_layers") or 0)
    window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
    from_types = windows_from_layer_types(config, num_layers, window)
    if from_types is not None:
        return from_types
    first_sliding = int(config.get("max_window_layers", 28))
    return [int(window) if window and layer >= first_sliding else 0
            for layer in range(num_layers)]


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Qwen2 config."""
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        qkv_bias=True, sliding_window=qwen_sliding_windows(config))
