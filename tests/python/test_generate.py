"""octavo's generation against transformers on the same tiny random checkpoints (fp32, CPU).

Greedy tokens must be identical for 32 new tokens, and each sampled token's logprob must agree
within 2e-4: both sides compute in fp32 over 3 layers with O(1) logits, where summation order alone
moves a logprob by ~1e-6; 2e-4 still catches any real error (a wrong mask, position or scale moves
logprobs by 1e-2 or more).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from octavo import LLM, SamplingParams  # noqa: E402

from checkpoints import ARCHITECTURES, build_checkpoint  # noqa: E402

NEW_TOKENS = 32
LOGPROB_TOLERANCE = 2e-4


def prompts_for(vocab: int):
    rng = np.random.default_rng(1234)
    return [rng.integers(3, vocab, size=n).tolist() for n in (1, 5, 17, 40, 70)]


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS):
    """transformers' greedy continuation and the logprob of each chosen token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
            eos_token_id=None, pad_token_id=2)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoints):
    """architecture -> list of (prompt, tokens, logprobs) from transformers."""
    reference = {}
    for architecture, (_, model) in tiny_checkpoints.items():
        reference[architecture] = [
            (prompt, *hf_greedy(model, prompt)) for prompt in prompts_for(model.config.vocab_size)]
    return reference


def check_against_reference(outputs, reference):
    for out, (prompt, tokens, logprobs) in zip(outputs, reference):
        assert out.prompt_token_ids == prompt
        got = out.outputs[0].token_ids
        assert got == tokens, f"prompt of {len(prompt)} tokens: {got} != {tokens}"
        ours = [entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, got)]
        np.testing.assert_allclose(ours, logprobs, atol=LOGPROB_TOLERANCE, rtol=0)
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_matches_transformers(architecture, tiny_checkpoints, hf_reference):
    directory, _ = tiny_checkpoints[architecture]
    llm = LLM(model=directory, device="cpu", dtype="float32")
    reference = hf_reference[architecture]
    # One request at a time, then all together: batching must not change a token.
    for item in reference:
        check_against_reference(llm.generate([item[0]], GREEDY, use_tqdm=False), [item])
    check_against_reference(llm.generate([r[0] for r in reference], GREEDY, use_tqdm=False),
                            reference)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_chunked_prefill_gives_same_tokens(architecture, tiny_checkpoints, hf_reference):
    directory, _ = tiny_checkpoints[architecture]
    llm = LLM(model=directory, dtype="float32", max_num_batched_tokens=8, max_num_seqs=4)
    reference = hf_reference[architecture]
    check_against_reference(llm.generate([r[0] for r in reference], GREEDY, use_tqdm=False),
                            reference)


def test_prefix_cache_hits_give_same_tokens(tiny_checkpoints):
    directory, model = tiny_checkpoints["LlamaForCausalLM"]
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 320, size=48).tolist()
    prompts = [shared + rng.integers(3, 320, size=n).tolist() for n in (1, 9, 20)]
    reference = [(p, *hf_greedy(model, p, 16)) for p in prompts]
    llm = LLM(model=directory, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    check_against_reference(llm.generate(prompts[:1], params, use_tqdm=False), reference[:1])
    before = llm.engine.stats()
    check_against_reference(llm.generate(prompts, params, use_tqdm=False), reference)
    after = llm.engine.stats()
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert hits >= 3 * 48 - 3 * 16, f"only {hits} prompt tokens came from the prefix cache"


def test_stats_split_the_execute_time(tiny_checkpoints):
    """The executor's share of a step splits into the wait for the device and host work; the CPU
    backend has no graphs to capture."""
    directory, _ = tiny_checkpoints["LlamaForCausalLM"]
    llm = LLM(model=directory, dtype="float32")
    llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_steps == NEW_TOKENS
    assert 0 <= stats.device_wait_seconds <= stats.execute_seconds
    assert stats.graph_captures == 0 and stats.graph_capture_seconds == 0


def test_prefix_caching_off_still_matches(tiny_checkpoints, hf_reference):
    directory, _ = tiny_checkpoints["Qwen2ForCausalLM"]
    llm = LLM(model=directory, dtype="float32", enable_prefix_caching=False)
    reference = hf_reference["Qwen2ForCausalLM"]
    check_against_reference(llm.generate([r[0] for r in reference], GREEDY, use_tqdm=False),
                            reference)
    assert llm.engine.stats().prefix_cache_hits == 0


def test_preemption_gives_same_tokens(tiny_checkpoints, hf_reference):
    directory, _ = tiny_checkpoints["LlamaForCausalLM"]
    # 16 blocks of 8 tokens: one 112-token sequence fits, five of them running together do not.
    llm = LLM(model=directory, dtype="float32", block_size=8, num_gpu_blocks_override=16,
              max_model_len=128)
    reference = hf_reference["LlamaForCausalLM"]
    check_against_reference(llm.generate([r[0] for r in reference], GREEDY, use_tqdm=False),
                            reference)
    assert llm.engine.stats().num_preemptions > 0


def test_text_prompts_and_detokenized_text(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (out,) = llm.generate("Paris is a", params, use_tqdm=False)
    assert out.prompt == "Paris is a"
    assert out.prompt_token_ids == tokenizer.encode("Paris is a")
    completion = out.outputs[0]
    assert len(completion.token_ids) == 12
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert completion.logprobs is None and completion.cumulative_logprob is None


def test_seeded_sampling_is_independent_of_the_batch(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    prompt = [5, 6, 7, 8]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=20,
                            ignore_eos=True)
    (alone,) = llm.generate([prompt], params, use_tqdm=False)
    other = SamplingParams(temperature=0.7, seed=1, max_tokens=30, ignore_eos=True)
    outs = llm.generate([[9, 10] * 7, prompt, [3] * 30], [other, params, other], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids
    different = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=43, max_tokens=20,
                               ignore_eos=True)
    (reseeded,) = llm.generate([prompt], different, use_tqdm=False)
    assert reseeded.outputs[0].token_ids != alone.outputs[0].token_ids


def test_top_logprobs_are_sorted_and_include_the_sampled_token(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=5, ignore_eos=True)
    (out,) = llm.generate([[4, 5, 6]], params, use_tqdm=False)
    completion = out.outputs[0]
    assert len(completion.logprobs) == 6
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= 5),
                        key=lambda lp: lp.rank)
        values = [lp.logprob for lp in ranked]
        assert values == sorted(values, reverse=True) and len(ranked) == 5
        total += entry[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_stop_token_ids_and_eos_finish_with_stop(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    (free_run,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10,
                                                             ignore_eos=True), use_tqdm=False)
    stop_at = free_run.outputs[0].token_ids[3]
    first = free_run.outputs[0].token_ids.index(stop_at)
    (stopped,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10,
                                                            stop_token_ids=[stop_at]), use_tqdm=False)
    completion = stopped.outputs[0]
    assert completion.token_ids == free_run.outputs[0].token_ids[:first + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at
    # min_tokens suppresses the stop token until enough tokens are out.
    (late,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, min_tokens=8,
                                                         stop_token_ids=[stop_at]), use_tqdm=False)
    assert stop_at not in late.outputs[0].token_ids[:8]


def test_chat_uses_the_template(llama_dir):
    llm = LLM(model=llama_dir, dtype="float32")
    messages = [{"role": "user", "content": "Paris is"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                      use_tqdm=False)
    expected = llm.get_tokenizer().encode("<|user|>Paris is</s><|assistant|>", add_special_tokens=False)
    assert out.prompt_token_ids == expected
    assert len(out.outputs[0].token_ids) == 5


def test_bfloat16_storage_runs_and_stays_close(tiny_checkpoints, hf_reference):
    directory, _ = tiny_checkpoints["LlamaForCausalLM"]
    llm = LLM(model=directory, dtype="bfloat16")
    reference = hf_reference["LlamaForCausalLM"]
    outs = llm.generate([r[0] for r in reference], GREEDY, use_tqdm=False)
    # bf16 weights and KV shift logits by ~1e-2: the first tokens still agree.
    for out, (_, tokens, _) in zip(outs, reference):
        assert out.outputs[0].token_ids[:2] == tokens[:2]


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM"])
def test_bf16_checkpoint_loads(architecture, tmp_path):
    model = build_checkpoint(str(tmp_path), architecture, seed=5, dtype=torch.bfloat16)
    llm = LLM(model=str(tmp_path))  # dtype auto: bfloat16 storage
    assert llm.engine.config.dtype == "bfloat16"
    (out,) = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4,
                                                           ignore_eos=True), use_tqdm=False)
    tokens, _ = hf_greedy(model.float(), [5, 6, 7, 8], 1)
    assert out.outputs[0].token_ids[0] == tokens[0]
