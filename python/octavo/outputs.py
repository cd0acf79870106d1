"""What generation returns: RequestOutput holds one CompletionOutput per sampled sequence.

Names and meanings follow vLLM's vllm/outputs.py and vllm/logprobs.py, so code written against
vLLM reads these objects unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Logprob:
    """The log probability of one token at one position.

    Attributes:
        logprob: natural log of the token's probability.
        rank: 1-based rank of the token among the vocabulary at that position (1 = most likely);
            None when not computed.
        decoded_token: the token's text, None until detokenized.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated (or prompt) position: token id -> Logprob. It holds the sampled token and
# the `logprobs` most likely tokens, so up to logprobs + 1 entries.
SampleLogprobs = list[dict[int, Logprob]]
# The first prompt token has no logprob: its entry is None.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    Attributes:
        index: the sequence's index among the request's n outputs.
        text: the generated text (cumulative, or the new text only for delta outputs).
        token_ids: the generated token ids.
        cumulative_logprob: the sum of the sampled tokens' logprobs; None unless logprobs was
            requested.
        logprobs: per generated token, token id -> Logprob; None unless requested.
        finish_reason: None while running; "stop" (EOS, a stop token or a stop string),
            "length" (max_tokens or max_model_len) or "abort".
        stop_reason: the stop token id or stop string that ended the output; None for EOS and
            every other reason.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={list(self.token_ids)}, cumulative_logprob={self.cumulative_logprob}, "
            f"logprobs={self.logprobs}, finish_reason={self.finish_reason}, "
            f"stop_reason={self.stop_reason})"
        )


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its outputs so far.

    Attributes:
        request_id: the request's id.
        prompt: the prompt text; None when the request was given token ids.
        prompt_token_ids: the prompt's token ids.
        prompt_logprobs: per prompt token, token id -> Logprob (None for the first token); None
            unless requested.
        outputs: one CompletionOutput per sequence (n of them).
        finished: True once every output has finished.
        metrics: timings of the request (arrival, first token, finish), when recorded.
        num_cached_tokens: prompt tokens whose KV came from the prefix cache.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any | None = None
    num_cached_tokens: int | None = None

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Merge a later output of the same request into this one: with `aggregate`, append the
        new text, ids and logprobs (delta outputs); otherwise replace each output by index."""
        self.finished |= next_output.finished
        for new in next_output.outputs:
            for i, old in enumerate(self.outputs):
                if old.index != new.index:
                    continue
                if aggregate:
                    old.text += new.text
                    old.token_ids = list(old.token_ids) + list(new.token_ids)
                    if new.logprobs:
                        old.logprobs = (old.logprobs or []) + new.logprobs
                    old.cumulative_logprob = new.cumulative_logprob
                    old.finish_reason = new.finish_reason
                    old.stop_reason = new.stop_reason
                else:
                    self.outputs[i] = new
                break
            else:
                self.outputs.append(new)

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"prompt_logprobs={self.prompt_logprobs}, outputs={self.outputs}, "
            f"finished={self.finished}, metrics={self.metrics}, "
            f"num_cached_tokens={self.num_cached_tokens})"
        )


@dataclass
class BeamSearchSequence:
    """One beam returned by LLM.beam_search (vLLM's vllm.beam_search.BeamSearchSequence).

    Attributes:
        tokens: the prompt's token ids followed by the beam's output (as in vLLM).
        logprobs: per output token, {token id: Logprob} of the chosen token.
        cum_logprob: the sum of the output tokens' logprobs.
        text: the decoded tokens, prompt included (as in vLLM).
        finish_reason: "stop" when the beam ended in EOS, else "length".
        stop_reason: None (EOS ends beams; there are no stop strings or stop tokens).
    """

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The result of one prompt's beam search: its best beams, best first."""

    sequences: list[BeamSearchSequence]
