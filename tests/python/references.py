"""Plain reference implementations of vLLM's decoding definitions, for the tests to hold octavo to:
penalties on one row of logits, and beam search over any next-token log-probability function
(a transformers model in the tests)."""

from __future__ import annotations

import numpy as np


def apply_penalties(logits, prompt, output, repetition=1.0, frequency=0.0, presence=0.0):
    """vLLM's order and meanings: repetition on tokens of the prompt or the output, then
    frequency * count and presence once on tokens of the output. fp32, as the engine computes."""
    out = np.asarray(logits, dtype=np.float32).copy()
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=len(out))
    seen = counts > 0
    seen[np.asarray(prompt, dtype=np.int64)] = True
    out[seen] = np.where(out[seen] > 0, out[seen] / np.float32(repetition),
                         out[seen] * np.float32(repetition))
    out -= (np.float32(frequency) * counts + np.float32(presence) * (counts > 0)).astype(np.float32)
    return out


def beam_search(next_logprobs, prompt, beam_width, max_tokens, eos_token_id, ignore_eos=False,
                length_penalty=1.0):
    """vLLM's LLM.beam_search, written out: returns [(output tokens, cumulative logprob)], best
    first. next_logprobs(tokens) gives the log-probabilities (1-D numpy) of the next token."""

    def score(tokens, cumulative):
        length = len(tokens)
        if tokens[-1] == eos_token_id:
            length -= 1
        return cumulative / (length ** length_penalty)

    beams = [(list(prompt), 0.0)]
    finished = []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cumulative in beams:
            logprobs = next_logprobs(tokens)
            # Most likely first, ties to the lower id.
            top = np.lexsort((np.arange(len(logprobs)), -logprobs))[:2 * beam_width]
            for token in top.tolist():
                beam = (tokens + [token], cumulative + float(logprobs[token]))
                if token == eos_token_id and not ignore_eos:
                    finished.append(beam)
                else:
                    candidates.append(beam)
        candidates.sort(key=lambda b: score(*b), reverse=True)
        beams = candidates[:beam_width]
        if not beams:
            break
    finished.extend(beams)
    finished.sort(key=lambda b: score(*b), reverse=True)
    return [(tokens[len(prompt):], cumulative) for tokens, cumulative in finished[:beam_width]]
