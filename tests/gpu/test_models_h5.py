"""h5's families (tests/python/test_models_h5.py) on the GPU against transformers.

Same method and bounds as test_models.py: octavo in fp16 against transformers in fp32 on the same
fp16 weights; greedy tokens equal up to a step whose fp32 top-2 margin is within transformers' own
half-precision noise, logprobs within a multiple of that noise. Shapes are GPU-sized (head dim
64, which the kernels compile) but keep each family's quirks: Gemma's (1 + w) norms and scaled
embedding, Gemma 2's soft-caps, sandwich norms and alternating sliding windows, llama3 rope
scaling, ChatGLM's half rotary in GPT-J pairs, Orion's LayerNorm with bias, DeciLM's per-layer KV
heads, and the checkpoints written in each remote-code family's own layout (the converters of
the CPU test), read back through octavo's loaders.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import transformers

# tests/gpu is on sys.path under pytest; test_models puts tests/python there (checkpoints).
from test_models import (
    NEW_TOKENS, TINY_POOL, check_greedy_against_reference, half_noise, hf_greedy, prompts_for)
from checkpoints import build_tokenizer  # noqa: E402  (after test_models sets the path)

from octavo import LLM, SamplingParams  # noqa: E402


def _cpu_tests():
    """tests/python/test_models_h5.py under another module name (this file shares its name)."""
    path = os.path.join(os.path.dirname(__file__), "..", "python", "test_models_h5.py")
    spec = importlib.util.spec_from_file_location("cpu_test_models_h5", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu = _cpu_tests()
T = transformers
VOCAB = 320
# hidden 256 / 4 heads = head dim 64; the wide init of test_models.py keeps greedy choices clear
# of fp16 near-ties.
SIZES = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             max_position_embeddings=256, initializer_range=0.25, bos_token_id=0, eos_token_id=1,
             pad_token_id=2, tie_word_embeddings=False)

# case -> (config class, overrides, converter to the family's layout or None for transformers')
CASES = {
    "gemma": (T.GemmaConfig, dict(tie_word_embeddings=True), None),
    # Gemma 2's tied, sqrt(hidden)-scaled embedding peaks the logits (top logprob ~0) at the
    # wide init; a narrower one keeps the logprobs informative.
    "gemma2": (T.Gemma2Config, dict(sliding_window=24, query_pre_attn_scalar=64,
                                    attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
                                    tie_word_embeddings=True, initializer_range=0.05), None),
    "llama3_rope": (T.LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}), None),
    "internlm2": (T.LlamaConfig, dict(rope_theta=1e6), cpu.as_internlm2),
    "chatglm": (T.GlmConfig, dict(partial_rotary_factor=0.5, attention_bias=True,
                                  rms_norm_eps=1e-5, rope_theta=15000.0), cpu.as_chatglm),
    "qwen": (T.Qwen2Config, dict(num_key_value_heads=4, use_sliding_window=False), cpu.as_qwen),
    "orion": (T.StableLmConfig, dict(partial_rotary_factor=1.0, use_qkv_bias=False,
                                     use_parallel_residual=False), cpu.as_orion),
    "decilm": (T.LlamaConfig, dict(), cpu.as_decilm),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer(directory)
    return directory


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_matches_transformers_on_gpu(case, tmp_path, tokenizer_dir):
    config_class, overrides, convert = CASES[case]
    torch.manual_seed(sorted(CASES).index(case))
    config = config_class(**{**SIZES, **overrides})
    config._attn_implementation = "eager"
    model32 = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    if case == "decilm":
        model32 = cpu.with_kv_heads_per_layer(model32, [4, 1])
    with torch.no_grad():
        for param in model32.parameters():
            if param.ndim == 1:  # norms at 1 (Gemma: 0) and biases at 0 would hide misplaced ones
                param.add_(torch.randn_like(param) * 0.1)
            # The reference runs in fp32 on the fp16-rounded weights, as octavo reads them. Only
            # parameters are rounded: model.half().float() would round buffers too (the rotary
            # inverse frequencies), moving the reference by ~0.03 in logprob from the exact math.
            param.copy_(param.half().float())
    model_half = copy.deepcopy(model32).half()
    if convert is None:
        cpu.save_native(model_half, str(tmp_path), tokenizer_dir)
    else:
        cpu.save_checkpoint(str(tmp_path), *convert(model_half), tokenizer_dir)
    model32, model_half = model32.cuda(), model_half.cuda()
    prompts = prompts_for(VOCAB)
    reference = [hf_greedy(model32, p, device="cuda", with_margins=True) for p in prompts]
    changes = [half_noise(model32, model_half, p, r[0]) for p, r in zip(prompts, reference)]
    noise = (max(c[0] for c in changes), max(c[1] for c in changes))
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", **TINY_POOL)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    for batch in ([[p] for p in prompts] + [prompts]):
        outputs = llm.generate(batch, params, use_tqdm=False)
        compared, agreed, worst = check_greedy_against_reference(
            outputs, prompts, reference, noise, case)
    print(f"{case}: {agreed}/{compared} greedy tokens equal the fp32 reference's; "
          f"max |logprob - fp32| octavo fp16 {worst:.4f}, transformers fp16 {noise[0]:.4f}")
