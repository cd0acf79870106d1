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

NEW_TOKENS = 20
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 70)), [3]]


def rms_norm(x, weight, eps=1e-6):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


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
    w = torch.rand(model.config.hidden_size) + 0.5
    model.model.embed_tokens.register_forward_hook(lambda m, i, out: rms_norm(out, w))
    spec = {**spec, "embedding_norm": True}
    check(spec, weights + [("embed_norm.weight", w.numpy(), "float32")], model)


def test_sandwich_norms(llama):
    model, spec, weights = llama
    extra = []
    for l, layer in enumerate(model.model.layers):
        attn_w, mlp_w = torch.rand(model.config.hidden_size) + 0.5, torch.rand(model.config.hidden_size) + 0.5
        layer.self_attn.o_proj.register_forward_hook(lambda m, i, out, w=attn_w: rms_norm(out, w))
        layer.mlp.down_proj.register_forward_hook(lambda m, i, out, w=mlp_w: rms_norm(out, w))
        extra += [(f"layers.{l}.attn_out_norm.weight", attn_w.numpy(), "float32"),
                  (f"layers.{l}.mlp_out_norm.weight", mlp_w.numpy(), "float32")]
    check({**spec, "sandwich_norms": True}, weights + extra, model)


def test_lm_head_bias(llama):
    model, spec, weights = llama
    bias = np.random.default_rng(0).normal(0, 2.0, model.config.vocab_size).astype(np.float32)
    check({**spec, "lm_head_bias": True}, weights + [("lm_head.bias", bias, "float32")], model,
          lm_head_bias=bias)


def test_per_layer_kv_heads(llama):
    """Layer 1 becomes multi-head (6 KV heads) and layer 2 multi-query (1) while layer 0 keeps 2:
    the pool's layers differ in size, and copy-on-write and attention must find each one's part."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    model, spec, weights = llama
    counts = [2, 6, 1]
    torch.manual_seed(5)
    for l, heads in enumerate(counts):
        config = type(model.config)(**{**model.config.to_dict(), "num_key_value_heads": heads})
        config._attn_implementation = model.config._attn_implementation
        attention = LlamaAttention(config, l)
        for p in attention.parameters():
            torch.nn.init.normal_(p, 0.0, 0.1)
        model.model.layers[l].self_attn = attention.eval()
    by_name = {name: (array, dtype) for name, array, dtype in weights}
    for l, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        by_name[f"layers.{l}.qkv.weight"] = (qkv.numpy(), "float32")
        by_name[f"layers.{l}.o.weight"] = (attn.o_proj.weight.detach().numpy(), "float32")
    spec = {**spec, "num_kv_heads_per_layer": counts}
    check(spec, [(n, a, d) for n, (a, d) in by_name.items()], model)

    bad = {**spec, "num_kv_heads_per_layer": [2, 4, 2]}
    with pytest.raises(ValueError, match="layer 1 has 4 kv heads; num_heads \\(6\\) must be a "
                                         "multiple of it"):
        to_cpp_spec(bad)
    with pytest.raises(ValueError, match="lists 2 layers; the model has 3"):
        to_cpp_spec({**spec, "num_kv_heads_per_layer": [2, 2]})
