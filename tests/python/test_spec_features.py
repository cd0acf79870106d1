"""ModelSpec features that some families need and Llama lacks (embedding norm, sandwich norms, an
LM-head bias, per-layer KV head counts), each checked on a tiny Llama against transformers with the
same change made to the torch model (forward hooks, a swapped attention module)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from octavo import _C  # noqa: E402
from octavo.engine_core import to_cpp_sampling_params, to_cpp_spec  # noqa: E402
from octavo.models import load_model  # noqa: E402
from octavo.sampling_params import SamplingParams  # noqa: E402

from checkpoints import build_checkpoint  # noqa: E402
from spec_variants import (  # noqa: E402
    with_embedding_norm, with_lm_head_bias, with_per_layer_kv_heads, with_sandwich_norms)

NEW_TOKENS = 20
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 70)), [3]]


def hf_greedy(model, prompt, lm_head_bias=None):
    tokens, logprobs = list(prompt), []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1].double()
        if lm_head_bias is not None:
            logits = logits + torch.from_numpy(lm_head_bias).double()
        lp = torch.log_softmax(logits, -1)
        tokens.append(int(lp.argmax()))
        logprobs.append(float(lp.max()))
    return tokens[len(prompt):], logprobs


def run_octavo(spec, weights):
    config = _C.EngineConfig()
    config.device, config.dtype, config.num_kv_blocks, config.block_size = "cpu", "float32", 256, 8
    tuples = [(name, dtype, np.ascontiguousarray(array)) for name, array, dtype in weights]
    engine = _C.Engine(to_cpp_spec(spec), config, tuples)
    params = to_cpp_sampling_params(SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                   ignore_eos=True, logprobs=0))
    ids = [engine.add_request(p, params) for p in PROMPTS]
    tokens = {i: [] for i in ids}
    logprobs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.id] += list(out.new_token_ids)
            logprobs[out.id] += [lp.logprob for lp in out.new_logprobs]
    return [(tokens[i], logprobs[i]) for i in ids]


def check(spec, weights, model, lm_head_bias=None):
    for (tokens, logprobs), prompt in zip(run_octavo(spec, weights), PROMPTS):
        expected_tokens, expected_logprobs = hf_greedy(model, prompt, lm_head_bias)
        assert tokens == expected_tokens
        np.testing.assert_allclose(logprobs, expected_logprobs, atol=2e-4)


@pytest.fixture
def llama(tmp_path):
    directory = str(tmp_path / "llama")
    model = build_checkpoint(directory, "LlamaForCausalLM", seed=3)
    spec, weights, _, _ = load_model(directory)
    return model, spec, list(weights())


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
    """Layer 1 becomes multi-head (6 KV heads) and layer 2 multi-query (1) while layer 0 keeps 2:
    the pool's layers differ in size, and copy-on-write and attention must find each one's part."""
    model, spec, weights = llama
    spec, weights = with_per_layer_kv_heads(model, spec, weights)
    check(spec, weights, model)

    bad = {**spec, "num_kv_heads_per_layer": [2, 4, 2]}
    with pytest.raises(ValueError, match="layer 1 has 4 kv heads; num_heads \\(6\\) must be a "
                                         "multiple of it"):
        to_cpp_spec(bad)
    with pytest.raises(ValueError, match="lists 2 layers; the model has 3"):
        to_cpp_spec({**spec, "num_kv_heads_per_layer": [2, 2]})
