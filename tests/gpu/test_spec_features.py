"""The ModelSpec features Llama lacks (embedding norm, sandwich norms, an fp32 LM-head bias through
cuBLASLt's epilogue, per-layer KV head counts) on the GPU: octavo's prompt logprobs against
transformers with the same change made to the torch model, within HALF_NOISE_FACTOR times
transformers' own bf16 deviation from fp32 (the criterion of test_models.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from checkpoints import build_checkpoint  # noqa: E402
from spec_variants import (  # noqa: E402
    with_embedding_norm, with_lm_head_bias, with_per_layer_kv_heads, with_sandwich_norms)

from octavo import _C  # noqa: E402
from octavo.engine_core import to_cpp_sampling_params, to_cpp_spec  # noqa: E402
from octavo.models import load_model  # noqa: E402
from octavo.sampling_params import SamplingParams  # noqa: E402

HALF_NOISE_FACTOR = 4.0
PROMPT = list(range(3, 83))


def octavo_prompt_logprobs(spec, weights):
    config = _C.EngineConfig()
    config.device, config.dtype, config.num_kv_blocks = "cuda", "bfloat16", 64
    tuples = [(n, d, np.ascontiguousarray(a)) for n, a, d in weights]
    engine = _C.Engine(to_cpp_spec(spec), config, tuples)
    params = to_cpp_sampling_params(SamplingParams(prompt_logprobs=0, max_tokens=1))
    engine.add_request(PROMPT, params)
    entries = []
    while engine.has_unfinished():
        for out in engine.step():
            entries += [lp.logprob for lp in out.new_prompt_logprobs]
    return np.array(entries)


def hf_prompt_logprobs(model, lm_head_bias=None):
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT], device="cuda")).logits[0].double()
    if lm_head_bias is not None:
        logits = logits + torch.from_numpy(lm_head_bias).double().cuda()
    lp = torch.log_softmax(logits, -1).cpu().numpy()
    return lp[np.arange(len(PROMPT) - 1), PROMPT[1:]]


def check(spec, weights, model, lm_head_bias=None):
    got = octavo_prompt_logprobs(spec, weights)
    exact = hf_prompt_logprobs(model.float(), lm_head_bias)
    half = hf_prompt_logprobs(model.bfloat16(), lm_head_bias)
    deviation, noise = np.abs(got - exact).max(), np.abs(half - exact).max()
    print(f"\n{spec.get('architecture')}: max |logprob - fp32| octavo bf16 {deviation:.4f}, "
          f"transformers bf16 {noise:.4f}")
    assert deviation <= HALF_NOISE_FACTOR * noise + 0.01


@pytest.fixture
def llama(tmp_path):
    directory = str(tmp_path / "llama")
    model = build_checkpoint(directory, "LlamaForCausalLM", seed=3, hidden_size=384, head_dim=64,
                             intermediate_size=512, initializer_range=0.25)
    spec, weights, _, _ = load_model(directory)
    return model.cuda(), spec, list(weights())


def test_embedding_norm(llama):
    model, spec, weights = llama
    check(*with_embedding_norm(model, spec, weights), model)


def test_sandwich_norms(llama):
    model, spec, weights = llama
    check(*with_sandwich_norms(model, spec, weights), model)


def test_lm_head_bias(llama):
    model, spec, weights = llama
    spec, weights, bias = with_lm_head_bias(model, spec, weights)
    check(spec, weights, model, lm_head_bias=bias)


def test_per_layer_kv_heads(llama):
    model, spec, weights = llama
    check(*with_per_layer_kv_heads(model, spec, weights, init_std=0.25), model)
