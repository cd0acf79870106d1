"""Sampling parameters for text generation, with vLLM's names, defaults and meanings.

Every field that vLLM users pass is accepted and implemented; invalid values and combinations
raise ValueError naming the field and its range. BeamSearchParams configures LLM.beam_search.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

# Below this temperature sampling is greedy (argmax), as in vLLM.
_SAMPLING_EPS = 1e-5

# vLLM's default --max-logprobs: the most top-N logprobs a request may ask for.
MAX_LOGPROBS = 20


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample the output tokens of one request.

    Attributes:
        n: outputs to return for the prompt, >= 1. Default 1. The prompt is prefilled once and
            the sequences fork from it, sharing its KV blocks (copy-on-write).
        best_of: candidates to generate from the prompt (all forked from one prefill),
            returning the ``n`` with the highest cumulative logprob. Default None (= n).
        presence_penalty: subtracted from the logit of every token already generated (positive
            values favour new tokens). Default 0.0, range [-2, 2].
        frequency_penalty: subtracted from a token's logit once per time it was generated.
            Default 0.0, range [-2, 2].
        repetition_penalty: divides positive logits (multiplies negative ones) of tokens in the
            prompt or output; > 1 discourages repetition. Default 1.0 (off), > 0.
            The three apply after logit_bias and before temperature, as in vLLM.
        temperature: divides the logits before sampling. Default 1.0, >= 0; 0 (any value below
            1e-5) means greedy, which also resets top_p, top_k and min_p to their neutral values.
        top_p: sample from the smallest set of tokens whose probabilities sum to at least top_p.
            Default 1.0 (off), range (0, 1].
        top_k: sample from the k most likely tokens. Default 0 (off); -1 is accepted as off and
            stored as 0; otherwise >= 1.
        min_p: drop tokens whose probability is below min_p times the most likely token's.
            Default 0.0 (off), range [0, 1].
        seed: seeds this request's own random generator, making its samples reproducible
            whatever else runs in the batch. Default None (the engine's generator); -1 also
            means None.
        stop: strings that end the output, matched on the detokenized text (also across token
            boundaries); the text is cut before the match. Not checked before min_tokens
            tokens. Default None (stored as []).
        stop_token_ids: token ids that end the output, besides EOS. Default None (stored as [],
            duplicates dropped, order kept).
        ignore_eos: keep generating after the EOS token. Default False.
        max_tokens: the most tokens to generate. Default 16, >= 1; None means up to
            max_model_len.
        min_tokens: EOS and stop_token_ids cannot end the output before this many tokens.
            Default 0, range [0, max_tokens].
        logprobs: return the log probability of each sampled token and of the ``logprobs`` most
            likely tokens at each step. Default None (none); range [0, 20]; True means 1. They
            are computed from the logits after logit_bias and the penalties, before temperature
            and the top-k/p filters.
        prompt_logprobs: return the log probability of every prompt token (given the tokens
            before it) and the ``prompt_logprobs`` most likely tokens at that position, from the
            model's raw logits. Default None; range [0, 20]. The first prompt token has none
            (None in RequestOutput.prompt_logprobs). Such a request skips the prefix-cache
            lookup: every position needs its logits.
        detokenize: produce output text (False: token ids only). Default True.
        skip_special_tokens: leave special tokens out of the output text. Default True.
        spaces_between_special_tokens: put spaces between special tokens in the output text
            (slow tokenizers only, as in Hugging Face). Default True.
        include_stop_str_in_output: keep the matched stop string in the text. Default False.
        logit_bias: token id -> bias added to its logit before sampling, clamped to
            [-100, 100] as OpenAI does (keys may be strings of digits, as in JSON). Default None.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))

        self._verify_args()
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                     "top_p", "min_p"):
            setattr(self, name, float(getattr(self, name)))

        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters cannot change the argmax, so they are reset to keep the
            # sampler on its fast path.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0

    def _verify_args(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise ValueError(f"best_of must be None or an int >= n={self.n}, got {self.best_of!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:  # NaN fails too
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if (not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0.0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if (not _is_number(self.temperature) or not math.isfinite(self.temperature)
                or self.temperature < 0.0):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (off) or an int >= 1, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are matched on the output text: they need "
                             "detokenize=True")
        if self.logit_bias:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got "
                                 f"{type(self.logit_bias).__name__}")
            normalised = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
                if token < 0 or not _is_number(value) or not math.isfinite(value):
                    raise ValueError(f"logit_bias entry {key!r}: {value!r} must map a token id "
                                     f">= 0 to a finite number")
                normalised[token] = min(100.0, max(-100.0, float(value)))
            self.logit_bias = normalised
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must contain only non-negative ints, got {self.stop_token_ids!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                f"max_tokens must be an int >= 1, or None for up to max_model_len; "
                f"got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(
                    f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {value!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature below 1e-5)."""
        return self.temperature < _SAMPLING_EPS

    def clone(self) -> SamplingParams:
        """A deep copy, so that per-request changes (e.g. adding EOS to stop_token_ids) never reach
        the caller's object."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != _DEFAULTS[f.name]
        ]
        return f"SamplingParams({', '.join(changed)})"


# Defaults after normalisation (stop and stop_token_ids become []), for the short __repr__.
_DEFAULTS = {
    f.name: ([] if f.name in ("stop", "stop_token_ids") else f.default)
    for f in dataclasses.fields(SamplingParams)
}


@dataclass(kw_only=True)
class BeamSearchParams:
    """How LLM.beam_search decodes, with vLLM's names, defaults and meanings.

    Every step each live beam proposes its 2 * beam_width most likely next tokens. Candidates that
    end in EOS (unless ignore_eos) are set aside as finished; the best beam_width of the others
    live on, ranked by cumulative logprob / (prompt + output length) ** length_penalty (an ending
    EOS not counted). After max_tokens steps, the best beam_width of the finished and the live
    beams are returned. Beams share their common prefix's KV blocks (copy-on-write).

    Attributes:
        beam_width: beams kept per step, in [1, 10].
        max_tokens: output tokens per beam, >= 1 (capped at max_model_len).
        ignore_eos: keep extending beams past EOS. Default False.
        temperature: accepted for vLLM compatibility; as in vLLM, candidates are ranked by the
            model's own log-probabilities (temperature does not change them). Default 0.0, >= 0.
        length_penalty: the exponent of the length normaliser; 0 ranks by the plain cumulative
            logprob, larger values favour longer beams. Default 1.0.
        include_stop_str_in_output: accepted for vLLM compatibility (beam search has no stop
            strings). Default False.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= 10:
            raise ValueError(f"beam_width must be an int in [1, 10], got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if (not _is_number(self.temperature) or not math.isfinite(self.temperature)
                or self.temperature < 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        self.length_penalty = float(self.length_penalty)
