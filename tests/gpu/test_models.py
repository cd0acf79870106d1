"""Whole models on the GPU against transformers.

The reference is transformers in float32 on the same (half-precision) weights, on the GPU. octavo
computes in bf16/fp16, so its logprobs move away from the fp32 ones; the tolerance is measured,
not guessed: transformers itself is run in the same half precision on the same token sequence
(teacher forcing), and octavo's largest logprob deviation from fp32 must stay within
HALF_NOISE_FACTOR times transformers' own (plus a small floor). Greedy tokens must equal the fp32
reference's; for the real-size shape a divergence is allowed only at a step where the fp32
top-2 margin is below transformers' own half-precision noise (a coin flip for any half-precision
implementation).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from checkpoints import ARCHITECTURES, build_checkpoint, build_tokenizer  # noqa: E402

from octavo import LLM, SamplingParams  # noqa: E402

NEW_TOKENS = 32
HALF_NOISE_FACTOR = 4.0
NOISE_FLOOR = 0.01

# The GPU kernels compile head dims 64, 80, 96, 128 and 256: the tiny shapes use 64. A wider
# init than the CPU tests' peaks the logits (std ~5) so that greedy choices are not near-ties
# that fp16 rounding could flip.
GPU_TINY = dict(hidden_size=384, head_dim=64, intermediate_size=512, initializer_range=0.25)
# Engines of earlier tests may still hold memory: a fixed, small KV pool keeps tests independent.
TINY_POOL = dict(num_gpu_blocks_override=512)


def hf_greedy(model, prompt, new_tokens=NEW_TOKENS, device="cpu", with_margins=False):
    """transformers' greedy tokens, their logprobs, and (optionally) the gap between the best and
    second-best logprob at each step (small gaps are near-ties that rounding may flip)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=2)
    tokens = out.sequences[0, len(prompt):].tolist()
    steps = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
    logprobs = [lp[t].item() for lp, t in zip(steps, tokens)]
    if not with_margins:
        return tokens, logprobs
    margins = [(lambda top: (top[0] - top[1]).item())(lp.topk(2).values) for lp in steps]
    return tokens, logprobs, margins

def forced_logprobs(model, prompt, tokens):
    """Log-softmax over the vocabulary at each of `tokens`' steps, in one forward pass over
    prompt + tokens (teacher forcing): [len(tokens), vocab], fp32."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1)


def half_noise(model32, model_half, prompt, tokens):
    """How far transformers itself moves in half precision from fp32 on one sequence: the largest
    change of a chosen token's logprob, and of the fp32 top-2 margin (what a greedy choice hangs
    on)."""
    ref = forced_logprobs(model32, prompt, tokens)
    half = forced_logprobs(model_half, prompt, tokens)
    chosen = torch.tensor(tokens, device=ref.device)[:, None]
    logprob_change = (half.gather(1, chosen) - ref.gather(1, chosen)).abs().max().item()
    top2 = ref.topk(2).indices
    margin = lambda lp: lp.gather(1, top2[:, :1]) - lp.gather(1, top2[:, 1:])  # noqa: E731
    margin_change = (margin(half) - margin(ref)).abs().max().item()
    return logprob_change, margin_change


def prompts_for(vocab):
    rng = np.random.default_rng(99)
    return [rng.integers(3, vocab, size=n).tolist() for n in (1, 7, 33, 90)]

def check_greedy_against_reference(outputs, prompts, reference, noise, label):
    """Tokens equal the fp32 reference's up to the first step whose fp32 top-2 margin is within
    HALF_NOISE_FACTOR x transformers' own half-precision change of that margin (a coin flip at
    this precision), and logprobs over the agreed steps stay within HALF_NOISE_FACTOR x
    transformers' own logprob change. `noise` = (logprob change, margin change).
    Returns (steps compared, steps agreed, worst logprob difference)."""
    logprob_noise, margin_noise = noise
    compared = agreed = 0
    worst = 0.0
    for out in outputs:
        tokens, logprobs, margins = reference[prompts.index(out.prompt_token_ids)]
        got = out.outputs[0].token_ids
        ours = [e[t].logprob for e, t in zip(out.outputs[0].logprobs, got)]
        same = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), len(tokens))
        compared += len(tokens)
        agreed += same
        if same < len(tokens):
            assert margins[same] < HALF_NOISE_FACTOR * margin_noise, (
                f"{label}, prompt of {len(out.prompt_token_ids)}: greedy tokens diverge at step "
                f"{same}, where the fp32 margin {margins[same]:.3f} is clear of transformers' own "
                f"half-precision margin change {margin_noise:.3f}")
        if same:
            worst = max(worst, float(np.max(np.abs(np.array(ours[:same]) - np.array(logprobs[:same])))))
    assert worst <= max(HALF_NOISE_FACTOR * logprob_noise, NOISE_FLOOR), (
        f"{label}: logprobs deviate from fp32 by {worst:.4f}; transformers' own half-precision "
        f"deviation is {logprob_noise:.4f}")
    return compared, agreed, worst


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tiny_models_match_transformers(architecture, tmp_path):
    import copy

    model_half = build_checkpoint(str(tmp_path), architecture, seed=3, dtype=torch.float16,
                                  **GPU_TINY).cuda()
    model32 = copy.deepcopy(model_half).float()
    prompts = prompts_for(model32.config.vocab_size)
    reference = [hf_greedy(model32, p, device="cuda", with_margins=True) for p in prompts]
    changes = [half_noise(model32, model_half, p, r[0]) for p, r in zip(prompts, reference)]
    noise = (max(c[0] for c in changes), max(c[1] for c in changes))
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", **TINY_POOL)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    for batch in ([[p] for p in prompts] + [prompts]):
        outputs = llm.generate(batch, params, use_tqdm=False)
        compared, agreed, worst = check_greedy_against_reference(
            outputs, prompts, reference, noise, architecture)
    print(f"{architecture}: {agreed}/{compared} greedy tokens equal the fp32 reference's; "
          f"max |logprob - fp32| octavo fp16 {worst:.4f}, transformers fp16 {noise[0]:.4f}; "
          f"transformers fp16 margin change {noise[1]:.4f}")


# Under an 8-token budget decode rows share steps with prompt chunks and run through the prefill
# kernel (probabilities rounded to fp16, another summation order), and small steps' projections
# take gemv rather than cuBLAS: chosen logprobs measured up to 0.03 apart from an unconstrained run
# (H100, 2026-11-27), and a greedy choice whose top-2 margin is below that can flip (one did, at a
# margin of 0.006, when group tile 4 moved to tensor cores).
CHUNKED_LOGPROB_TOL = 0.05


def test_chunked_prefill_and_preemption_on_gpu(tmp_path):
    """Chunking (8-token budget) and preemption (a 16-block pool) give the greedy tokens of one
    unconstrained run, and its logprobs within CHUNKED_LOGPROB_TOL; tokens may part only at a
    step where the unconstrained run's top-2 margin is within that tolerance."""
    build_checkpoint(str(tmp_path), "LlamaForCausalLM", seed=4, dtype=torch.float16, **GPU_TINY)
    prompts = prompts_for(320)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    free = LLM(model=str(tmp_path), device="cuda", dtype="float16", **TINY_POOL)
    expected = [o.outputs[0] for o in free.generate(prompts, params, use_tqdm=False)]
    del free
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", max_num_batched_tokens=8,
              max_num_seqs=4, block_size=8, num_gpu_blocks_override=16, max_model_len=128)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.stats().num_preemptions > 0
    compared = 0
    for i, (want, got) in enumerate(zip(expected, outs)):
        assert len(got.token_ids) == NEW_TOKENS
        for step, (token, want_lp, got_lp) in enumerate(
                zip(want.token_ids, want.logprobs, got.logprobs)):
            if got.token_ids[step] != token:
                top2 = sorted((lp.logprob for lp in want_lp.values()), reverse=True)[:2]
                assert top2[0] - top2[1] < CHUNKED_LOGPROB_TOL, (
                    f"prompt {i} step {step}: chunked run chose {got.token_ids[step]}, the "
                    f"unconstrained run {token} by a margin of {top2[0] - top2[1]:.4f}")
                break
            assert abs(got_lp[token].logprob - want_lp[token].logprob) < CHUNKED_LOGPROB_TOL, (
                f"prompt {i} step {step}: logprob {got_lp[token].logprob:.4f} chunked, "
                f"{want_lp[token].logprob:.4f} unconstrained")
            compared += 1
    # A near-tie ends one prompt's comparison; most steps must still have been compared.
    assert compared >= 0.75 * NEW_TOKENS * len(prompts)


def test_qwen3_0_6b_shape_matches_transformers_in_bf16(tmp_path):
    """Qwen3-0.6B's shape with random bf16 weights. The reference is transformers in fp32 on the
    same weights (bf16 logits would tie often and break ties differently). Greedy choices whose
    fp32 margin exceeds transformers' own bf16 noise must agree (module docstring)."""
    import gc

    import transformers

    config = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
        tie_word_embeddings=True, initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model_half = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model_half.save_pretrained(tmp_path)
    build_tokenizer(str(tmp_path))
    model_half = model_half.cuda().eval()
    model32 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32).cuda().eval()
    prompt = list(range(1000, 1100))
    tokens, logprobs, margins = hf_greedy(model32, prompt, device="cuda", with_margins=True)
    noise = half_noise(model32, model_half, prompt, tokens)
    del model32, model_half
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(model=str(tmp_path), device="cuda", gpu_memory_utilization=0.5, max_model_len=4096)
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                    ignore_eos=True, logprobs=0), use_tqdm=False)
    compared, agreed, worst = check_greedy_against_reference(
        [out], [prompt], [(tokens, logprobs, margins)], noise, "qwen3-0.6b shape")
    print(f"qwen3-0.6b shape: {agreed}/{compared} greedy tokens equal the fp32 reference's; "
          f"max |logprob - fp32| octavo bf16 {worst:.3f}, transformers bf16 {noise[0]:.3f}; "
          f"transformers bf16 margin change {noise[1]:.3f}")


def test_parallel_sampling_forks_copy_on_write_on_gpu(tmp_path):
    """n = 3 greedy: the forks share the prompt's blocks and copy the partly filled last one on
    the GPU (copy_blocks kernel) before writing; every fork must equal the single sequence."""
    build_checkpoint(str(tmp_path), "Qwen3ForCausalLM", seed=5, dtype=torch.float16, **GPU_TINY)
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", block_size=16,
              enable_prefix_caching=False, **TINY_POOL)
    prompt = list(range(20, 45))  # 25 tokens: the second block is shared and partly filled
    single = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    (alone,) = llm.generate([prompt], single, use_tqdm=False)
    (out,) = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=NEW_TOKENS,
                                                   ignore_eos=True), use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [alone.outputs[0].token_ids] * 3
    stats = llm.engine.stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
