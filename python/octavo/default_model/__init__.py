"""octavo's default model: a 12.9 M-parameter Llama trained on the Python documentation's prose,
shipped inside the package so that `LLM()`, `octavo generate` and `octavo serve` work with no
download. README.md beside this file is its model card (corpus, licence, training, validation
loss); tools/train_default_model.py made it.

This directory is a plain Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a ChatML chat template), so `transformers` loads it too."""

from __future__ import annotations

import os

def path() -> str:
    """The checkpoint directory of the default model."""
    return os.path.dirname(os.path.abspath(__file__))
