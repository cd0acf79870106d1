"""Tokenizer loading and incremental detokenization.

The engine works in token ids; text is made here, one step at a time, for streaming and for stop
strings. Decoding the whole output at every step would cost O(length) per token, so
IncrementalDetokenizer decodes only a short window of recent tokens (vLLM's prefix_offset /
read_offset algorithm).
"""

from __future__ import annotations

from collections.abc import Sequence

# Prompt tokens decoded together with the first output tokens, so that the first output token is
# decoded as it is inside the sequence (a sentencepiece "▁word" keeps its space, which decoding it
# alone would strip). vLLM uses the same 5.
_PROMPT_CONTEXT_TOKENS = 5

# What a decoder yields for bytes that are not (yet) valid UTF-8.
_REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The Hugging Face tokenizer stored in the model directory `path` (tokenizer.json /
    tokenizer_config.json), through transformers.AutoTokenizer. Nothing is downloaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {path!r}: {e} (the directory needs the model's "
            f"tokenizer files, e.g. tokenizer.json and tokenizer_config.json; pass "
            f"trust_remote_code=True for tokenizers defined by the model's own code)") from e


class IncrementalDetokenizer:
    """Turns a request's output tokens into text, a delta per call.

    `add(new_token_ids)` returns the text those tokens complete. The concatenation of all deltas
    followed by `flush()` equals
    ``tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``
    when the prompt is empty, and the continuation of the prompt's text otherwise (a first output
    token "▁Hi" after a prompt yields " Hi", as in vLLM, where decoding it alone yields "Hi").

    Text that ends in U+FFFD (an incomplete UTF-8 character: a byte-level or byte-fallback token
    holding only the first bytes of a character) is held back until a later token completes it.
    One case differs from a full decode: sentencepiece's ByteFallback decodes a run of <0xHH>
    tokens as one group and turns all of it into U+FFFD when any of it is invalid, so invalid
    bytes after a complete character rewrite text this class has already returned.

    How: ids[prefix_offset:read_offset] is the window already turned into text and
    ids[read_offset:] the tokens not yet turned into text. Each step decodes ids[prefix_offset:]
    and returns what it adds to the decoding of ids[prefix_offset:read_offset]; starting the
    window a few tokens back keeps the decoder's context (leading spaces, multi-byte characters).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        # Fast (Rust) tokenizers are called directly: tokenizer.decode adds Python-side argument
        # handling to each of the two small decodes per step.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if getattr(tokenizer, "is_fast", False) else None

        self._token_ids = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self.output_text = ""
        """All text produced so far (the concatenation of the deltas)."""

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        kwargs = {"skip_special_tokens": self.skip_special_tokens,
                  "clean_up_tokenization_spaces": False}
        if not self.spaces_between_special_tokens:
            kwargs["spaces_between_special_tokens"] = False
        return self.tokenizer.decode(token_ids, **kwargs)

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Appends the new output tokens; returns the text they complete (possibly "")."""
        self._token_ids.extend(int(t) for t in new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns the text still held back (an incomplete character at the end of the output, as
        U+FFFD); call once when the request finishes."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._token_ids):
            return ""
        window = self._token_ids[self._prefix_offset:]
        prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(window)
        if not final and (len(new_text) <= len(prefix_text)
                          or new_text.endswith(_REPLACEMENT_CHAR)):
            # Nothing printable yet (a skipped special token), or a character still incomplete.
            return ""
        delta = new_text[len(prefix_text):]
        # The text up to the end is final: the next window starts at the old read offset.
        del self._token_ids[:self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self.output_text += delta
        return delta
