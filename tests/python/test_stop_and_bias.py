"""Stop strings (matched on the detokenized text, also across token boundaries) and logit_bias."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from octavo import LLM, SamplingParams  # noqa: E402

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def ascii_only(llm):
    """A logit_bias that bans every token whose text is not plain printable ASCII, so that the
    random model writes clean text whose characters map to token boundaries one to one."""
    tokenizer = llm.get_tokenizer()
    vocab = llm.model_spec["vocab_size"]
    banned = {}
    for token in range(vocab):
        text = tokenizer.decode([token]) if token < len(tokenizer) else ""
        if not text or not text.isascii() or not text.isprintable() or token in tokenizer.all_special_ids:
            banned[token] = -100.0
    return banned


def stop_params(ascii_only, **kwargs):
    return SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logit_bias=ascii_only,
                          **kwargs)


@pytest.fixture(scope="module")
def free_run(llm, ascii_only):
    (out,) = llm.generate([PROMPT], stop_params(ascii_only), use_tqdm=False)
    return out.outputs[0]


def split_stop_string(llm, completion):
    """A 2-character stop string that straddles a token boundary and first occurs there."""
    tokenizer = llm.get_tokenizer()
    text = completion.text
    for j in range(2, len(completion.token_ids)):
        boundary = len(tokenizer.decode(completion.token_ids[:j], skip_special_tokens=True))
        candidate = text[boundary - 1:boundary + 1]
        clean_prefix = ("\ufffd" not in text[:boundary + 1]
                        and tokenizer.decode(completion.token_ids[:j + 1],
                                             skip_special_tokens=True).startswith(text[:boundary + 1]))
        if (0 < boundary < len(text) and len(candidate) == 2 and clean_prefix
                and text.find(candidate) == boundary - 1):
            return candidate, boundary - 1, j
    raise AssertionError(f"no 2-character stop string across a token boundary in {text!r}")


def test_stop_string_across_tokens_cuts_the_text(llm, free_run, ascii_only):
    stop, index, boundary_token = split_stop_string(llm, free_run)
    params = stop_params(ascii_only, stop=[stop])
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    completion = out.outputs[0]
    assert completion.text == free_run.text[:index]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    # Generation stopped at the token that completed the match, not later.
    assert completion.token_ids == free_run.token_ids[:len(completion.token_ids)]
    assert len(completion.token_ids) <= boundary_token + 1
    assert llm.engine.num_unfinished() == 0
    assert llm.engine.stats().num_running == 0

    kept = stop_params(ascii_only, stop=[stop], include_stop_str_in_output=True)
    (out,) = llm.generate([PROMPT], kept, use_tqdm=False)
    assert out.outputs[0].text == free_run.text[:index + len(stop)]


def test_stop_strings_wait_for_min_tokens(llm, free_run, ascii_only):
    stop, index, boundary_token = split_stop_string(llm, free_run)
    late = stop_params(ascii_only, stop=[stop], min_tokens=boundary_token + 2)
    (out,) = llm.generate([PROMPT], late, use_tqdm=False)
    assert len(out.outputs[0].token_ids) >= boundary_token + 2


def test_stop_string_in_a_batch_leaves_others_running(llm, free_run, ascii_only):
    stop, index, _ = split_stop_string(llm, free_run)
    stopping = stop_params(ascii_only, stop=[stop])
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate([PROMPT, [11, 12, 13]], [stopping, plain], use_tqdm=False)
    assert outs[0].outputs[0].text == free_run.text[:index]
    assert len(outs[1].outputs[0].token_ids) == 40


def test_logit_bias_forces_and_forbids_tokens(llm, free_run):
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={"42": 100})
    (out,) = llm.generate([PROMPT], forced, use_tqdm=False)
    assert out.outputs[0].token_ids == [42] * 6
    first = free_run.token_ids[0]
    banned = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={first: -100})
    (out,) = llm.generate([PROMPT], banned, use_tqdm=False)
    assert out.outputs[0].token_ids[0] != first


def test_bad_logit_bias_is_rejected(llm):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: float("nan")})
    assert SamplingParams(logit_bias={3: 500}).logit_bias == {3: 100.0}
    with pytest.raises(ValueError, match="logit_bias token id 100000 is outside the vocabulary"):
        llm.generate([PROMPT], SamplingParams(logit_bias={100000: 1.0}), use_tqdm=False)
