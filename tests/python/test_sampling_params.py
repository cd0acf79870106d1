"""SamplingParams: vLLM defaults, normalisation, validation and the not-yet-supported fields."""

import pytest

from octavo.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and p.skip_special_tokens and p.spaces_between_special_tokens
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.prompt_logprobs is None and p.logit_bias is None and p.detokenize
    assert not p.include_stop_str_in_output
    assert not p.greedy


def test_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(1)


def test_normalisation():
    p = SamplingParams(top_k=-1, seed=-1, logprobs=True, stop_token_ids=[5, 3, 5], stop=None)
    assert p.top_k == 0 and p.seed is None and p.logprobs == 1
    assert p.stop_token_ids == [5, 3]
    assert SamplingParams(stop=[]).stop == []
    assert isinstance(SamplingParams(temperature=1).temperature, float)


def test_greedy_resets_filters():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=10, min_p=0.2)
    assert p.greedy
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    # sampling keeps them
    p = SamplingParams(temperature=0.7, top_p=0.5, top_k=10, min_p=0.2, seed=3)
    assert (p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 10, 0.2, 3)


@pytest.mark.parametrize("kwargs, field, allowed", [
    ({"temperature": -0.1}, "temperature", ">= 0"),
    ({"temperature": float("nan")}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_k": -2}, "top_k", ">= 1"),
    ({"top_k": 2.5}, "top_k", ">= 1"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"min_p": 1.1}, "min_p", "[0, 1]"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": 2.0}, "max_tokens", ">= 1"),
    ({"min_tokens": -1}, "min_tokens", ">= 0"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "<= max_tokens=4"),
    ({"logprobs": -1}, "logprobs", f"[0, {MAX_LOGPROBS}]"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", f"[0, {MAX_LOGPROBS}]"),
    ({"seed": 1.5}, "seed", "int"),
    ({"seed": "1"}, "seed", "int"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids", "non-negative"),
    ({"n": 0}, "n", ">= 1"),
    ({"presence_penalty": 3.0}, "presence_penalty", "[-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"stop": [""]}, "stop", "empty"),
])
def test_invalid_values_name_field_and_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(field) and allowed in str(e.value)


def test_boundary_values_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, max_tokens=1, min_tokens=1,
                   logprobs=0)
    SamplingParams(max_tokens=None, min_tokens=100, logprobs=MAX_LOGPROBS, seed=0)
    SamplingParams(n=1, best_of=1, presence_penalty=0.0, frequency_penalty=0,
                   repetition_penalty=1.0, stop=[], prompt_logprobs=None, logit_bias={})


def test_penalties_and_prompt_logprobs_accepted():
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1.3,
                       prompt_logprobs=True)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (-2.0, 2.0, 1.3)
    assert p.prompt_logprobs == 1


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_penalty_and_prompt_logprob_ranges(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
    ({"beam_width": 11, "max_tokens": 4}, "beam_width"),
    ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
    ({"beam_width": 2, "max_tokens": 4, "temperature": -1}, "temperature"),
    ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty"),
])
def test_beam_search_params_ranges(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def test_clone_is_deep():
    p = SamplingParams(stop_token_ids=[7], temperature=0.5)
    q = p.clone()
    assert q == p and q is not p
    q.stop_token_ids.append(8)
    assert p.stop_token_ids == [7]


def test_repr_shows_changed_fields_only():
    assert repr(SamplingParams()) == "SamplingParams()"
    r = repr(SamplingParams(temperature=0.5, max_tokens=32, stop_token_ids=[2]))
    assert r == "SamplingParams(temperature=0.5, stop_token_ids=[2], max_tokens=32)"
