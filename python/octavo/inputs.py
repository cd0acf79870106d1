"""Prompts as users give them: text, token ids, or vLLM's dicts ({"prompt": ...} or
{"prompt_token_ids": [...]})."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

PromptType = Union[str, dict, Sequence[int]]


def parse_prompt(prompt: PromptType, tokenizer) -> tuple[Optional[str], list[int]]:
    """(text or None, token ids) of a prompt; text is tokenized with `tokenizer`."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return prompt["prompt"], tokenizer.encode(prompt["prompt"])
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return None, [int(t) for t in prompt]
    raise TypeError(
        f"a prompt is a str, a list of token ids or a dict; got {type(prompt).__name__}")
