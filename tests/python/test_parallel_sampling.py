"""n > 1: the prompt is prefilled once, the other sequences fork from it and share its KV blocks,
diverging through copy-on-write."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from octavo import LLM, SamplingParams  # noqa: E402
from octavo.engine_core import EngineArgs, create_engine, to_cpp_sampling_params  # noqa: E402


def test_greedy_forks_equal_the_single_sequence(llama_dir):
    # Block size 8 and a 13-token prompt: the last prompt block is partly filled and shared, so
    # every fork's first write goes through copy-on-write; wrong copies would change the tokens.
    llm = LLM(model=llama_dir, dtype="float32", block_size=8, enable_prefix_caching=False)
    prompt = list(range(20, 33))
    single = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    (alone,) = llm.generate([prompt], single, use_tqdm=False)
    parallel = SamplingParams(n=3, temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    (out,) = llm.generate([prompt, list(range(40, 50))], parallel, use_tqdm=False)[:1]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for completion in out.outputs:
        assert completion.token_ids == alone.outputs[0].token_ids
        assert completion.cumulative_logprob == pytest.approx(alone.outputs[0].cumulative_logprob,
                                                              abs=1e-4)
        assert completion.finish_reason == "length"
    assert llm.engine.stats().num_free_kv_blocks == llm.engine.stats().num_kv_blocks


def test_sampled_forks_differ_and_repeat_with_the_seed(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    (first,) = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)
    (second,) = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)
    sequences = [tuple(c.token_ids) for c in first.outputs]
    assert len(set(sequences)) > 1
    assert sequences == [tuple(c.token_ids) for c in second.outputs]


def test_forks_share_the_prompt_blocks(llama_dir):
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32", block_size=16,
                                            enable_prefix_caching=False))
    total = engine.stats().num_kv_blocks
    params = to_cpp_sampling_params(SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=8,
                                                   ignore_eos=True))
    engine.add_request(list(range(3, 63)), params)  # 60 tokens: 3 full blocks + 12 in a 4th
    engine.step()  # prefill, 4 first tokens, 3 forks sharing all 4 blocks
    assert total - engine.stats().num_free_kv_blocks == 4
    engine.step()  # each sequence writes position 60: 3 copy the shared last block, 1 keeps it
    assert total - engine.stats().num_free_kv_blocks == 4 + 3
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().num_free_kv_blocks == total


def test_abort_ends_every_sequence_and_n_is_capped(llama_dir):
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32", max_num_seqs=8))
    params = to_cpp_sampling_params(SamplingParams(n=3, temperature=1.0, max_tokens=30,
                                                   ignore_eos=True))
    group = engine.add_request([5, 6, 7], params)
    engine.step()
    engine.step()
    engine.abort(group)
    aborted = [o for o in engine.step() if o.finish_reason == "abort"]
    assert sorted(o.index for o in aborted) == [0, 1, 2]
    assert all(o.group_id == group for o in aborted)
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="n is 9; max_num_seqs is 8"):
        engine.add_request([5], to_cpp_sampling_params(SamplingParams(n=9)))


def test_best_of_returns_the_most_likely_candidates(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    prompt = [5, 6, 7, 8]
    candidates = SamplingParams(n=5, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True,
                                logprobs=0)
    (all_five,) = llm.generate([prompt], candidates, use_tqdm=False)
    best = SamplingParams(n=2, best_of=5, temperature=1.0, seed=11, max_tokens=10,
                          ignore_eos=True, logprobs=0)
    (out,) = llm.generate([prompt], best, use_tqdm=False)
    ranked = sorted(all_five.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in out.outputs] == [0, 1]
