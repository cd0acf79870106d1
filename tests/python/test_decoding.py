"""Penalties, prompt logprobs and beam search through a tiny model, against transformers on the
same weights (the math of each is held to references.py), and the memory block sharing saves."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from octavo import LLM, BeamSearchParams, SamplingParams  # noqa: E402
from octavo.engine_core import EngineArgs, create_engine, to_cpp_sampling_params  # noqa: E402

import references  # noqa: E402
from checkpoints import build_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    directory, model = tiny_checkpoints["LlamaForCausalLM"]
    return directory, model


def hf_next_logprobs(model):
    def next_logprobs(tokens):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1].double()
        return torch.log_softmax(logits, -1).numpy()
    return next_logprobs


# ---- penalties --------------------------------------------------------------------------------

PENALTIES = [
    dict(repetition_penalty=1.6),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(repetition_penalty=0.6, frequency_penalty=-0.5, presence_penalty=0.7),
]


def hf_greedy_with_penalties(model, prompt, new_tokens, repetition_penalty=1.0,
                             frequency_penalty=0.0, presence_penalty=0.0):
    tokens = list(prompt)
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1].numpy()
        logits = references.apply_penalties(logits, prompt, tokens[len(prompt):],
                                            repetition_penalty, frequency_penalty,
                                            presence_penalty)
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


@pytest.mark.parametrize("penalties", PENALTIES)
def test_penalties_match_transformers_greedy(llama, penalties):
    directory, model = llama
    llm = LLM(model=directory, dtype="float32")
    prompts = [[5, 6, 7, 8, 9, 5, 6], [40, 41, 40, 41, 40, 41, 40, 41, 42, 43, 44, 45, 46, 47]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **penalties)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)
    for prompt, out, unpenalised in zip(prompts, outputs, plain):
        expected = hf_greedy_with_penalties(model, prompt, 24, **penalties)
        assert out.outputs[0].token_ids == expected
    # The penalties change the outputs (otherwise this test could not fail).
    assert any(o.outputs[0].token_ids != u.outputs[0].token_ids for o, u in zip(outputs, plain))


def test_penalties_survive_preemption_forks_and_mixed_batches(llama):
    directory, model = llama
    penalties = dict(repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.3)
    prompt = list(range(10, 30))
    expected = hf_greedy_with_penalties(model, prompt, 40, **penalties)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, **penalties)
    others = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # A pool of 12 blocks of 8 tokens cannot hold six 60-token sequences: preemption frees and
    # rebuilds the penalty slots; n=2 forks build their own from the shared prompt.
    llm = LLM(model=directory, dtype="float32", block_size=8, num_gpu_blocks_override=12,
              max_model_len=96)
    batch = [prompt, list(range(50, 70)), prompt, list(range(70, 90))]
    outputs = llm.generate(batch, [params, others, SamplingParams(n=2, **vars_of(params)), others],
                           use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0
    assert outputs[0].outputs[0].token_ids == expected
    assert [c.token_ids for c in outputs[2].outputs] == [expected, expected]


def vars_of(params: SamplingParams) -> dict:
    return {k: getattr(params, k) for k in ("temperature", "max_tokens", "ignore_eos",
                                            "repetition_penalty", "frequency_penalty",
                                            "presence_penalty")}


def test_seeded_sampling_with_penalties_is_independent_of_the_batch(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True,
                            frequency_penalty=0.8, repetition_penalty=1.2)
    (alone,) = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    mixed = llm.generate([[9, 9, 9, 9], [5, 6, 7], [11, 12]],
                         [SamplingParams(temperature=1.0, max_tokens=30), params,
                          SamplingParams(temperature=0, max_tokens=5, presence_penalty=1.0)],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone.outputs[0].token_ids


# ---- prompt logprobs --------------------------------------------------------------------------

def hf_prompt_logprobs(model, prompt):
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def check_prompt_logprobs(out, model, prompt, num_top):
    reference = hf_prompt_logprobs(model, prompt)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = out.prompt_logprobs[position]
        row = reference[position - 1]
        token = prompt[position]
        assert token in entry
        assert entry[token].logprob == pytest.approx(row[token], abs=2e-4)
        assert entry[token].rank == int((row > row[token] + 1e-9).sum()) + 1
        top = np.argsort(-row, kind="stable")[:num_top].tolist()
        ranked = [t for t, lp in entry.items() if lp.rank is not None and lp.rank <= num_top]
        assert sorted(ranked, key=lambda t: entry[t].rank) == top or num_top == 0


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_prompt_logprobs_match_transformers(llama, num_top):
    directory, model = llama
    llm = LLM(model=directory, dtype="float32")
    prompts = [list(range(3, 40)), [7, 8], [100, 3, 100, 3, 250, 17, 4, 4, 4]]
    outputs = llm.generate(prompts, SamplingParams(prompt_logprobs=num_top, max_tokens=2),
                           use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        check_prompt_logprobs(out, model, prompt, num_top)


def test_prompt_logprobs_with_chunks_prefix_cache_and_preemption(llama):
    directory, model = llama
    prefix = list(range(3, 67))  # four full blocks of 16: cacheable
    first, second = prefix + [200, 201, 202], prefix + [210, 211]
    # An 8-token budget chunks every prompt; the first request caches the shared prefix, and the
    # second must still report a logprob for every one of its prompt tokens.
    llm = LLM(model=directory, dtype="float32", max_num_batched_tokens=8, max_num_seqs=4)
    (out_first,) = llm.generate([first], SamplingParams(max_tokens=1), use_tqdm=False)
    hits = llm.engine.stats().prefix_cache_hits
    (out_second,) = llm.generate([second], SamplingParams(prompt_logprobs=2, max_tokens=3),
                                 use_tqdm=False)
    check_prompt_logprobs(out_second, model, second, 2)
    assert llm.engine.stats().prefix_cache_hits == hits  # the lookup was skipped
    # A small pool forces preemption mid-prompt: positions are reported once each.
    small = LLM(model=directory, dtype="float32", block_size=8, num_gpu_blocks_override=12,
                max_num_batched_tokens=16, max_num_seqs=4, max_model_len=96)
    batch = [list(range(5, 60)), list(range(60, 110)), list(range(110, 160))]
    outputs = small.generate(batch, SamplingParams(prompt_logprobs=1, max_tokens=30,
                                                   ignore_eos=True), use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0
    for prompt, out in zip(batch, outputs):
        check_prompt_logprobs(out, model, prompt, 1)


# ---- beam search ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_with_likely_eos(llama, tmp_path_factory):
    """The tiny Llama with its EOS moved to a token the beams often propose, so that finished
    beams and their ranking are exercised."""
    directory, model = llama
    next_logprobs = hf_next_logprobs(model)
    prompt = [5, 6, 7, 8, 9]
    tokens = references.beam_search(next_logprobs, prompt, 2, 3, eos_token_id=-1)[0][0]
    eos = int(np.argsort(-next_logprobs(prompt + tokens[:1]))[2])  # third most likely at step 2
    copy = str(tmp_path_factory.mktemp("llama_eos"))
    for name in os.listdir(directory):
        shutil.copy(os.path.join(directory, name), copy)
    with open(os.path.join(copy, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos}, f)
    return copy, model, eos


@pytest.mark.parametrize("beam_width, max_tokens, length_penalty, ignore_eos", [
    (1, 6, 1.0, False), (2, 6, 1.0, False), (4, 8, 1.0, False), (4, 5, 0.0, False),
    (3, 7, 2.0, False), (4, 6, 1.0, True),
])
def test_beam_search_equals_the_brute_force_reference(llama_with_likely_eos, beam_width,
                                                      max_tokens, length_penalty, ignore_eos):
    directory, model, eos = llama_with_likely_eos
    llm = LLM(model=directory, dtype="float32", block_size=4)
    prompts = [[5, 6, 7, 8, 9], [30, 31, 32], list(range(60, 80))]
    params = BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens,
                              length_penalty=length_penalty, ignore_eos=ignore_eos)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    finished_early = 0
    for prompt, out in zip(prompts, outputs):
        expected = references.beam_search(hf_next_logprobs(model), prompt, beam_width, max_tokens,
                                          eos, ignore_eos, length_penalty)
        assert [s.tokens[len(prompt):] for s in out.sequences] == [t for t, _ in expected]
        for sequence, (tokens, cumulative) in zip(out.sequences, expected):
            assert sequence.tokens[:len(prompt)] == prompt
            assert sequence.cum_logprob == pytest.approx(cumulative, abs=1e-3)
            assert sum(next(iter(d.values())).logprob for d in sequence.logprobs) == \
                pytest.approx(cumulative, abs=1e-3)
            ends_in_eos = tokens[-1] == eos and not ignore_eos
            assert sequence.finish_reason == ("stop" if ends_in_eos else "length")
            finished_early += ends_in_eos and len(tokens) < max_tokens
            assert isinstance(sequence.text, str)
    if beam_width > 1 and not ignore_eos and length_penalty == 1.0:
        assert finished_early > 0  # the EOS path was exercised
    assert llm.engine.stats().num_free_kv_blocks == llm.engine.stats().num_kv_blocks


def test_beam_search_with_text_prompts_and_errors(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32", max_num_seqs=4)
    (out,) = llm.beam_search(["Paris is"], BeamSearchParams(beam_width=2, max_tokens=4))
    assert len(out.sequences) == 2 and out.sequences[0].text.startswith("Paris is")
    with pytest.raises(ValueError, match="beam_width is 5; max_num_seqs is 4"):
        llm.beam_search(["Paris"], BeamSearchParams(beam_width=5, max_tokens=4))
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(["Paris"], SamplingParams())
    assert llm.engine.num_unfinished() == 0


def test_beam_search_shares_blocks_and_survives_preemption(llama, capsys):
    """Width 4 over a 100-token prompt: the beams share the prompt's blocks and their common
    output prefix; the pool only ever holds what the live beams need."""
    directory, model = llama
    block = 16
    engine, _, _ = create_engine(EngineArgs(model=directory, dtype="float32", block_size=block,
                                            enable_prefix_caching=False))
    total = engine.stats().num_kv_blocks
    cpp = to_cpp_sampling_params(SamplingParams())
    cpp.beam_width, cpp.max_tokens, cpp.ignore_eos = 4, 40, True
    prompt = list(range(3, 103))
    group = engine.add_request(prompt, cpp)
    peak, peak_unshared, results = 0, 0, []
    step = 0
    while engine.has_unfinished():
        results += [o for o in engine.step() if o.group_id == group]
        step += 1
        used = total - engine.stats().num_free_kv_blocks
        # Without sharing each of the 4 beams would hold all its blocks: prompt + output so far.
        unshared = 4 * -(-(len(prompt) + step) // block)
        peak, peak_unshared = max(peak, used), max(peak_unshared, unshared)
        prompt_blocks = -(-len(prompt) // block)
        # What live beams need at most: the shared prompt blocks, and per beam its own output
        # blocks plus one partly filled block copied on write.
        assert used <= prompt_blocks + 4 * (-(-step // block) + 1)
    assert engine.stats().num_free_kv_blocks == total
    expected = references.beam_search(hf_next_logprobs(model), prompt, 4, 40, -1, True)
    assert [list(o.new_token_ids) for o in sorted(results, key=lambda o: o.index)] == \
        [t for t, _ in expected]
    with capsys.disabled():
        print(f"\n[beam search width 4, prompt 100, 40 tokens, block 16] peak KV blocks "
              f"{peak} vs {peak_unshared} without sharing ({1 - peak / peak_unshared:.0%} saved)")

    # A pool too small for every beam at once: the beams are preempted and recomputed (waiting
    # beams make room for their siblings) and the result is the same.
    small_engine, _, _ = create_engine(EngineArgs(model=directory, dtype="float32", block_size=8,
                                                  enable_prefix_caching=False,
                                                  num_gpu_blocks_override=13,
                                                  max_model_len=96))
    small_engine.add_request(prompt[:40], cpp)
    small_results = []
    while small_engine.has_unfinished():
        small_results += [o for o in small_engine.step() if o.finished]
    assert small_engine.stats().num_preemptions > 0
    expected = references.beam_search(hf_next_logprobs(model), prompt[:40], 4, 40, -1, True)
    assert [list(o.new_token_ids) for o in sorted(small_results, key=lambda o: o.index)] == \
        [t for t, _ in expected]


def test_beam_search_abort_frees_everything(llama_dir):
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32"))
    total = engine.stats().num_kv_blocks
    cpp = to_cpp_sampling_params(SamplingParams())
    cpp.beam_width, cpp.max_tokens = 3, 30
    group = engine.add_request(list(range(5, 45)), cpp)
    for _ in range(5):
        engine.step()
    engine.abort(group)
    aborted = engine.step()
    assert [(o.group_id, o.finish_reason) for o in aborted] == [(group, "abort")]
    assert not engine.has_unfinished()
    assert engine.stats().num_free_kv_blocks == total


# ---- memory: n = 8 over a 1,000-token prompt --------------------------------------------------

def test_parallel_sampling_stores_the_prompt_once(tmp_path, capsys):
    directory = str(tmp_path / "long")
    build_checkpoint(directory, "LlamaForCausalLM", max_position_embeddings=2048)
    block = 16
    engine, _, _ = create_engine(EngineArgs(model=directory, dtype="float32", block_size=block,
                                            enable_prefix_caching=False))
    total = engine.stats().num_kv_blocks
    params = to_cpp_sampling_params(SamplingParams(n=8, temperature=1.0, seed=5, max_tokens=32,
                                                   ignore_eos=True))
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 300, size=1000)]
    engine.add_request(prompt, params)
    prompt_blocks = -(-len(prompt) // block)  # 63: 62 full, one with 8 tokens
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, total - engine.stats().num_free_kv_blocks)
    unshared = 8 * -(-(len(prompt) + 32) // block)
    # The prompt's blocks once; each sequence copies the shared partial block on its first write
    # and adds blocks for its own 32 tokens.
    assert peak <= prompt_blocks + 8 * (1 + -(-32 // block))
    assert engine.stats().num_free_kv_blocks == total
    with capsys.disabled():
        print(f"\n[n=8, prompt 1000, 32 tokens, block 16] peak KV blocks {peak} vs {unshared} "
              f"without sharing ({1 - peak / unshared:.0%} saved)")


def test_detokenize_false_returns_ids_only(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    base = dict(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    (with_text, ids_only) = llm.generate([[5, 6, 7], [5, 6, 7]],
                                         [SamplingParams(**base),
                                          SamplingParams(detokenize=False, **base)],
                                         use_tqdm=False)
    assert ids_only.outputs[0].token_ids == with_text.outputs[0].token_ids
    assert ids_only.outputs[0].text == "" and with_text.outputs[0].text != ""
    assert all(lp.decoded_token is None for entry in ids_only.outputs[0].logprobs
               for lp in entry.values())
    with pytest.raises(ValueError, match="need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)
