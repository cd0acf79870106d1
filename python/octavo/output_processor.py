"""Turns the engine's per-step outputs into vLLM's RequestOutput objects.

Shared by `LLM` (offline) and the server: each request's sequences are detokenized incrementally,
checked for stop strings (the engine knows only stop token ids), and ranked for best_of.
"""

from __future__ import annotations

import logging
from typing import Optional

from octavo.outputs import CompletionOutput, Logprob, RequestOutput
from octavo.sampling_params import SamplingParams
from octavo.tokenizer import IncrementalDetokenizer

logger = logging.getLogger("octavo")


def _logprob_dict(token: int, lp, tokenizer) -> dict[int, Logprob]:
    """vLLM's per-position logprobs: the top-N tokens by rank, plus the token itself. No
    tokenizer: decoded_token stays None (detokenize=False)."""
    decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None else (lambda t: None)
    entry = {
        token_id: Logprob(logprob, rank=rank + 1, decoded_token=decode(token_id))
        for rank, (token_id, logprob) in enumerate(zip(lp.top_ids, lp.top_logprobs))
    }
    if token not in entry:
        entry[token] = Logprob(lp.logprob, rank=lp.rank or None, decoded_token=decode(token))
    return entry


class SequenceState:
    """Python-side state of one sequence of a request: its tokens, text and logprobs."""

    def __init__(self, index: int, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer):
        self.index = index
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[dict[int, Logprob]]] = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[int] = None
        self.tokenizer = tokenizer
        # detokenize=False: token ids only (no text, no stop strings, no decoded logprob tokens).
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        ) if params.detokenize else None
        self.text = ""

    def absorb(self, out) -> bool:
        """Takes one engine output. Returns True when a stop string finished the request here
        (the engine does not know: the caller aborts it there)."""
        self.token_ids.extend(out.new_token_ids)
        delta = ""
        if self.detokenizer is not None:
            delta = self.detokenizer.add(out.new_token_ids)
            self.text = self.detokenizer.output_text
        self.cumulative_logprob = out.cumulative_logprob
        if self.logprobs is not None:
            tokenizer = self.tokenizer if self.detokenizer is not None else None
            for token, lp in zip(out.new_token_ids, out.new_logprobs):
                self.logprobs.append(_logprob_dict(token, lp, tokenizer))
        if out.error:
            logger.warning("request %s failed: %s", self.request_id, out.error)
        if self.params.stop and len(self.token_ids) >= self.params.min_tokens and delta:
            if self._match_stop_string(len(delta)):
                return True
        if out.finished:
            if self.detokenizer is not None:
                self.detokenizer.flush()
                self.text = self.detokenizer.output_text
            self.finish_reason = out.finish_reason
            if out.stop_token_id >= 0:
                self.stop_reason = out.stop_token_id
        return False

    def _match_stop_string(self, new_chars: int) -> bool:
        """Looks for a stop string that ends in the newest text (it may have started in earlier
        text: a stop string split across tokens); cuts the text there."""
        for stop in self.params.stop:
            # Only matches that end inside the new text are new.
            start = max(0, len(self.text) - new_chars - len(stop) + 1)
            index = self.text.find(stop, start)
            if index < 0:
                continue
            end = index + len(stop) if self.params.include_stop_str_in_output else index
            self.text = self.text[:end]
            self.finish_reason = "stop"
            self.stop_reason = stop
            return True
        return False

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class RequestState:
    """Python-side state of one request (its n sequences) while the engine runs it."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.n = params.n
        self.tokenizer = tokenizer
        self.sequences = [SequenceState(i, request_id, prompt_token_ids, params, tokenizer)
                          for i in range(params.best_of or params.n)]
        # vLLM's shape: None for the first prompt token, then one dict per prompt token.
        self.prompt_logprobs: Optional[list] = (
            [None] if params.prompt_logprobs is not None else None)

    def absorb(self, out) -> bool:
        """Takes one engine output of this request (any of its sequences). Returns True when a
        stop string ended that sequence here: the caller then aborts sequence `out.id` alone
        (engine.abort(out.id, whole_group=False)); the engine's abort echo is ignored later."""
        if self.done:
            return False
        if out.new_prompt_logprobs:
            self._absorb_prompt_logprobs(out.new_prompt_logprobs)
        if not out.new_token_ids and not out.finished:
            return False  # a prompt chunk that brought prompt logprobs only
        sequence = self.sequences[out.index]
        if sequence.finish_reason is not None:
            return False  # ended by a stop string; this is the engine's abort echo
        return sequence.absorb(out)

    def _absorb_prompt_logprobs(self, entries) -> None:
        for entry in entries:
            token = self.prompt_token_ids[len(self.prompt_logprobs)]
            self.prompt_logprobs.append(_logprob_dict(token, entry, self.tokenizer))

    @property
    def done(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.sequences)

    def to_output(self) -> RequestOutput:
        outputs = [seq.to_output() for seq in self.sequences]
        if len(outputs) > self.n:
            # best_of: the n candidates with the highest cumulative logprob, as vLLM ranks them.
            ranked = sorted(self.sequences, key=lambda seq: seq.cumulative_logprob, reverse=True)
            outputs = [seq.to_output() for seq in ranked[:self.n]]
            for index, completion in enumerate(outputs):
                completion.index = index
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=outputs,
            finished=self.done,
        )
