"""The GPT-lineage families (GPT-2, GPT BigCode, OPT, GPT-J, GPT-NeoX, Falcon, MPT, BLOOM, Phi,
Phi-3, StableLM, Starcoder2, OLMo, Jais) against a reference, on tiny random checkpoints.

Families that transformers implements are built with AutoModelForCausalLM.from_config and saved
with save_pretrained; octavo's greedy tokens must equal transformers' for 32 new tokens and each
token's logprob agree within 2e-4 (fp32 on both sides; the same bound as test_generate.py), for
prompts of 1 to 70 tokens, one at a time and as one batch of mixed lengths.

Jais has no transformers implementation: its checkpoint is written here in the published layout
(config keys and Conv1D tensors of modeling_jais.py), and the reference is a small torch model of
its math written from the Jais paper and model card (GPT-2 block, SwiGLU, ALiBi, muP scales).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from octavo import LLM, SamplingParams  # noqa: E402
from octavo.models import ARCHITECTURES, get_model_family, load_model  # noqa: E402
from octavo.models import _gpt_common  # noqa: E402

from checkpoints import build_tokenizer  # noqa: E402

NEW_TOKENS = 32
LOGPROB_TOLERANCE = 2e-4
PROMPT_LENGTHS = (1, 5, 17, 40, 70)
VOCAB = 320
MAX_POSITIONS = 128  # learned tables must hold the longest prompt plus NEW_TOKENS

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)

# Tiny configs: odd sizes where the family allows them, biases and grouped heads where it has them.
T = transformers
CASES = {
    "gpt2": lambda: T.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        initializer_range=0.2),
    "gpt_bigcode_mqa": lambda: T.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=96,
        n_positions=MAX_POSITIONS, multi_query=True, initializer_range=0.2),
    "gpt_bigcode_mha": lambda: T.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        multi_query=False, activation_function="gelu", initializer_range=0.2),
    "opt": lambda: T.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=64, init_std=0.2,
        pad_token_id=2),
    "gptj": lambda: T.GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
        n_positions=MAX_POSITIONS, initializer_range=0.2),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        intermediate_size=160, max_position_embeddings=MAX_POSITIONS, rotary_pct=0.25,
        initializer_range=0.2),
    "gpt_neox_sequential": lambda: T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                         "partial_rotary_factor": 0.5},
        use_parallel_residual=False, hidden_act="gelu_new", initializer_range=0.2),
    "falcon_7b_style": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        multi_query=True, parallel_attn=True, bias=False, initializer_range=0.2),
    "falcon_40b_style": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_kv_heads=2, new_decoder_architecture=True, bias=False, initializer_range=0.2),
    "falcon_11b_style": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_kv_heads=3, new_decoder_architecture=True, num_ln_in_parallel_attn=1, bias=True,
        ffn_hidden_size=128, initializer_range=0.2),
    "falcon_sequential_mha": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        multi_query=False, parallel_attn=False, bias=True, initializer_range=0.2),
    # Falcon-RW: ALiBi instead of rotary (4 heads: power-of-two slopes, so transformers' bfloat16
    # rounding of each bias is exact over these lengths).
    "falcon_rw_alibi": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        multi_query=False, parallel_attn=False, bias=True, alibi=True, initializer_range=0.2),
    "falcon_rw_alibi_parallel": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        multi_query=False, parallel_attn=True, bias=False, alibi=True, initializer_range=0.2),
    "mpt": lambda: T.MptConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=MAX_POSITIONS,
        initializer_range=0.2),
    "bloom": lambda: T.BloomConfig(
        vocab_size=VOCAB, hidden_size=96, n_layer=2, n_head=6, initializer_range=0.2),
    "phi": lambda: T.PhiConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=MAX_POSITIONS, partial_rotary_factor=0.5,
        initializer_range=0.2),
    "phi3": lambda: T.Phi3Config(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=160, max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=MAX_POSITIONS, sliding_window=24, pad_token_id=2,
        initializer_range=0.2),
    "stablelm": lambda: T.StableLmConfig(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=160, max_position_embeddings=MAX_POSITIONS,
        use_qkv_bias=True, initializer_range=0.2),
    "stablelm_parallel": lambda: T.StableLmConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=96, max_position_embeddings=MAX_POSITIONS,
        use_parallel_residual=True, partial_rotary_factor=0.5, rope_theta=20000.0,
        layer_norm_eps=1e-6, initializer_range=0.2),
    "starcoder2": lambda: T.Starcoder2Config(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=160, max_position_embeddings=MAX_POSITIONS,
        sliding_window=24, initializer_range=0.2),
    "olmo": lambda: T.OlmoConfig(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, intermediate_size=160, max_position_embeddings=MAX_POSITIONS,
        attention_bias=True, pad_token_id=2, initializer_range=0.2),
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The reference models are tiny: one thread is fastest, and on a shared 2-core machine
    torch's spinning workers slow every forward pass twentyfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(model) -> None:
    """transformers starts norms at 1 and biases at 0, which would hide a misplaced norm weight
    or bias: give every 1-D parameter random values around its start."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)


def build(directory: str, case: str, seed: int):
    torch.manual_seed(seed)
    config = CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    perturb(model)
    model.save_pretrained(directory)
    build_tokenizer(directory)
    return model


def prompts():
    rng = np.random.default_rng(1234)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def reference_greedy(forward, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation of a reference model by full recomputation, with each chosen token's
    logprob. `forward(ids [1, n]) -> logits [n, vocab]`."""
    tokens, logprobs = list(prompt), []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            logits = forward(torch.tensor([tokens]))[-1].double()
        lp = torch.log_softmax(logits, -1)
        tokens.append(int(lp.argmax()))
        logprobs.append(float(lp.max()))
    return tokens[len(prompt):], logprobs


def check_matches(directory: str, reference: list[tuple[list[int], list[int], list[float]]]):
    # 64 blocks of 16 tokens hold the batch (5 x 102 tokens); the default pool is 4 GiB.
    llm = LLM(model=directory, device="cpu", dtype="float32", num_gpu_blocks_override=64,
              max_model_len=MAX_POSITIONS)

    def check(outputs, expected):
        for out, (prompt, tokens, logprobs) in zip(outputs, expected, strict=True):
            got = out.outputs[0].token_ids
            assert got == tokens, f"prompt of {len(prompt)} tokens: {got} != {tokens}"
            ours = [entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, got)]
            np.testing.assert_allclose(ours, logprobs, atol=LOGPROB_TOLERANCE, rtol=0)

    # The shortest and the longest prompt alone, then all five as one batch of mixed lengths.
    for item in (reference[0], reference[-1]):
        check(llm.generate([item[0]], GREEDY, use_tqdm=False), [item])
    check(llm.generate([r[0] for r in reference], GREEDY, use_tqdm=False), reference)


def hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' own greedy generation (its KV cache path) and each chosen token's logprob."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
            eos_token_id=None, pad_token_id=2)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].double(), dim=-1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(case, tmp_path):
    directory = str(tmp_path / case)
    model = build(directory, case, seed=sorted(CASES).index(case))
    check_matches(directory, [(p, *hf_greedy(model, p)) for p in prompts()])


# --- Jais: the published layout, against a torch model of its math -------------------------------

JAIS_CONFIG = {
    "architectures": ["JAISLMHeadModel"],
    "model_type": "jais",
    "auto_map": {"AutoModelForCausalLM": "modeling_jais.JAISLMHeadModel"},
    "vocab_size": VOCAB, "n_embd": 96, "n_layer": 2, "n_head": 6, "n_inner": 160,
    "n_positions": MAX_POSITIONS, "activation_function": "swiglu",
    "position_embedding_type": "alibi", "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True, "mup_scale_qk_dot_by_d": True,
    "mup_embeddings_scale": 3.5, "mup_output_alpha": 2.0, "mup_width_scale": 0.3,
    "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
}
# The jais-family generation of key names, with learned positions and a GELU MLP.
JAIS_LEARNED_CONFIG = {
    **{k: v for k, v in JAIS_CONFIG.items() if not k.startswith("mup_")},
    "n_embd": 64, "n_head": 4, "n_inner": 96, "activation_function": "gelu_new",
    "position_embedding_type": "learned", "embeddings_scale": 2.5, "width_scale": 0.7,
    "scale_qk_dot_by_d": False,
}


def jais_scales(config: dict) -> tuple[float, float, bool]:
    """(embeddings scale, logits scale, q.k scaled by 1/d) as the Jais code reads them: the
    jais-family names first, then the muP ones of jais-13b/30b."""
    if "embeddings_scale" in config:
        return config["embeddings_scale"], config["width_scale"], config["scale_qk_dot_by_d"]
    return (config["mup_embeddings_scale"], config["mup_output_alpha"] * config["mup_width_scale"],
            config["mup_scale_qk_dot_by_d"])


def jais_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (Press et al.): 2^(-8i/n) for a power of two n; otherwise those of the
    nearest lower power of two, then every other slope of the next power."""
    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two(num_heads))
    lower = 2 ** math.floor(math.log2(num_heads))
    return torch.tensor(power_of_two(lower)
                        + power_of_two(2 * lower)[0::2][:num_heads - lower])


def jais_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as in a Jais checkpoint (Conv1D weights are [in, out])."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["n_embd"], config["n_inner"], config["vocab_size"]

    def rand(*shape, std=0.2, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"transformer.wte.weight": rand(vocab, hidden),
         "transformer.ln_f.weight": rand(hidden, std=0.1, mean=1.0),
         "transformer.ln_f.bias": rand(hidden, std=0.1)}
    if config["position_embedding_type"] == "learned":
        w["transformer.wpe.weight"] = rand(config["n_positions"], hidden)
    conv1d = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden),
              "mlp.c_fc": (hidden, inter), "mlp.c_proj": (inter, hidden)}
    if config["activation_function"] == "swiglu":
        conv1d["mlp.c_fc2"] = (hidden, inter)
    for layer in range(config["n_layer"]):
        p = f"transformer.h.{layer}."
        for norm in ("ln_1", "ln_2"):
            w[p + norm + ".weight"] = rand(hidden, std=0.1, mean=1.0)
            w[p + norm + ".bias"] = rand(hidden, std=0.1)
        for name, (n_in, n_out) in conv1d.items():
            w[p + name + ".weight"] = rand(n_in, n_out)
            w[p + name + ".bias"] = rand(n_out, std=0.1)
    # The causal-mask buffer GPT-2-style checkpoints carry: must be ignored.
    w["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    return w


def jais_forward(config: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] of a Jais model: pre-LN GPT-2 block; attention scores
    q.k / d^(1 or 0.5), minus slope * |i - j| with ALiBi, causal; MLP c_fc(x) * silu(c_fc2(x))
    (SwiGLU) or act(c_fc(x)); the input embedding (token + learned position) times the
    embeddings scale; the logits of the tied LM head times the width scale."""
    hidden, heads = config["n_embd"], config["n_head"]
    size = hidden // heads
    eps = config["layer_norm_epsilon"]
    embeddings_scale, logits_scale, by_d = jais_scales(config)
    n = ids.shape[1]
    x = w["transformer.wte.weight"][ids[0]]
    if config["position_embedding_type"] == "learned":
        x = x + w["transformer.wpe.weight"][:n]
        bias = torch.zeros(heads, n, n)
    else:
        distance = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs().float()
        bias = -jais_slopes(heads)[:, None, None] * distance  # [heads, n, n]
    x = x * embeddings_scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    def ln(t, name):
        return torch.nn.functional.layer_norm(t, (hidden,), w[name + ".weight"], w[name + ".bias"],
                                              eps)

    def conv1d(t, name):
        return t @ w[name + ".weight"] + w[name + ".bias"]

    for layer in range(config["n_layer"]):
        p = f"transformer.h.{layer}."
        q, k, v = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn").split(hidden, dim=-1)
        q, k, v = (t.view(n, heads, size).transpose(0, 1) for t in (q, k, v))
        scores = q @ k.transpose(1, 2) / size ** (1.0 if by_d else 0.5) + bias
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, hidden)
        x = x + conv1d(attn, p + "attn.c_proj")
        h = ln(x, p + "ln_2")
        if config["activation_function"] == "swiglu":
            h = conv1d(h, p + "mlp.c_fc") * torch.nn.functional.silu(conv1d(h, p + "mlp.c_fc2"))
        else:
            h = torch.nn.functional.gelu(conv1d(h, p + "mlp.c_fc"), approximate="tanh")
        x = x + conv1d(h, p + "mlp.c_proj")
    x = ln(x, "transformer.ln_f")
    return (x @ w["transformer.wte.weight"].T) * logits_scale


def write_checkpoint(directory: str, config: dict, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in weights.items()},
              os.path.join(directory, "model.safetensors"))
    build_tokenizer(directory)


@pytest.mark.parametrize("config", [JAIS_CONFIG, JAIS_LEARNED_CONFIG], ids=["alibi", "learned"])
def test_jais_matches_reference(config, tmp_path):
    weights = jais_weights(config, seed=11)
    directory = str(tmp_path / "jais")
    write_checkpoint(directory, config, weights)
    reference = [(p, *reference_greedy(lambda ids: jais_forward(config, weights, ids), p))
                 for p in prompts()]
    check_matches(directory, reference)


@pytest.mark.parametrize("config", [JAIS_CONFIG, JAIS_LEARNED_CONFIG], ids=["alibi", "learned"])
def test_jais_scales_change_the_reference(config):
    """Each muP scale moves the reference's logprobs, so the match above checks every one."""
    weights = jais_weights(config, seed=11)
    prompt = prompts()[3]
    _, base = reference_greedy(lambda ids: jais_forward(config, weights, ids), prompt)
    for key in ("mup_embeddings_scale", "mup_width_scale", "mup_scale_qk_dot_by_d",
                "embeddings_scale", "width_scale", "scale_qk_dot_by_d"):
        if key not in config:
            continue
        changed = {**config, key: not config[key] if isinstance(config[key], bool) else 1.0}
        _, other = reference_greedy(lambda ids: jais_forward(changed, weights, ids), prompt)
        assert np.max(np.abs(np.array(other) - np.array(base))) > 1e-2, key


# --- hub layouts: the same model saved the way the hub's checkpoints were -------------------------


def load_canonical(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    spec, weights, _, _ = load_model(directory)
    return spec, {name: np.array(array) for name, array, _ in weights()}


def rewrite(source: str, target: str, config_changes: dict, rename, extra=None) -> None:
    """A copy of the checkpoint in `source` with config.json edited (None deletes a key) and
    every tensor renamed by `rename` (None drops it), plus `extra` tensors."""
    from safetensors.torch import load_file

    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    tensors = {}
    for name, tensor in load_file(os.path.join(source, "model.safetensors")).items():
        if rename(name) is not None:
            tensors[rename(name)] = tensor
    write_checkpoint(target, config, {**tensors, **(extra or {})})


def strip(prefix: str):
    return lambda name: name.removeprefix(prefix)


HUB_LAYOUTS = {
    # openai-community/gpt2: saved from GPT2Model (no "transformer."), causal-mask buffers kept.
    "gpt2": (dict(n_ctx=MAX_POSITIONS), strip("transformer."),
             {"h.0.attn.bias": torch.tril(torch.ones(1, 1, 4, 4)),
              "h.0.attn.masked_bias": torch.tensor(-1e4)}),
    # bigscience/bloom-560m: saved from BloomModel; n_embed and num_attention_heads.
    "bloom": (dict(n_embed=96, hidden_size=None, num_attention_heads=6, n_head=None),
              strip("transformer."), None),
    # EleutherAI/pythia-*: rotary_pct / rotary_emb_base, the LM head named embed_out (values
    # other than the loader's defaults, 0.25 and 10000, so that ignoring a key fails).
    "gpt_neox_sequential": (dict(rope_parameters=None, rope_scaling=None, rotary_pct=0.5,
                                 rotary_emb_base=20000),
                            lambda name: "embed_out.weight" if name == "lm_head.weight" else name,
                            None),
    # facebook/opt-*: saved from OPTModel ("decoder." prefix).
    "opt": ({}, strip("model."), None),
    # tiiuae/falcon-40b's first upload: RWForCausalLM, model_type RefinedWeb, n_* keys.
    "falcon_40b_style": (dict(architectures=["RWForCausalLM"], model_type="RefinedWeb",
                              n_embed=96, hidden_size=None, n_head=6, num_attention_heads=None,
                              n_head_kv=2, num_kv_heads=None, n_layer=2,
                              num_hidden_layers=None, new_decoder_architecture=None,
                              num_ln_in_parallel_attn=None), None, None),
    # stabilityai/stablelm-3b-4e1t's first upload: StableLMEpochForCausalLM, rope_pct, norm_eps.
    "stablelm_parallel": (dict(architectures=["StableLMEpochForCausalLM"],
                               model_type="stablelm_epoch", rope_parameters=None, rope_pct=0.5,
                               rope_theta=20000, norm_eps=1e-6, layer_norm_eps=None),
                          None, None),
    # mosaicml/mpt-7b: MosaicML's own architecture name.
    "mpt": (dict(architectures=["MPTForCausalLM"]), None, None),
}


@pytest.mark.parametrize("case", sorted(HUB_LAYOUTS))
def test_hub_layouts_load_the_same_model(case, tmp_path):
    saved = str(tmp_path / "saved")
    torch.manual_seed(0)
    config = CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb(model)
    model.save_pretrained(saved)
    changes, rename, extra = HUB_LAYOUTS[case]
    hub = str(tmp_path / "hub")
    rewrite(saved, hub, changes, rename or (lambda name: name), extra)
    spec, weights = load_canonical(saved)
    hub_spec, hub_weights = load_canonical(hub)
    assert {**hub_spec, "architecture": None} == {**spec, "architecture": None}
    assert hub_weights.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(hub_weights[name], weights[name], err_msg=name)


def test_fused_layouts_move_bfloat16_bits_untouched(tmp_path):
    """Regrouping q/k/v rows and transposing Conv1D weights only move elements: a bfloat16
    checkpoint's canonical tensors are the float32 ones rounded, bit for bit."""
    for case in ("gpt_neox", "falcon_40b_style", "gpt2", "bloom"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(CASES[case]())
        perturb(model)
        model.to(torch.bfloat16).save_pretrained(str(tmp_path / f"{case}_bf16"))
        model.to(torch.float32).save_pretrained(str(tmp_path / f"{case}_fp32"))
        _, bf16 = load_canonical(str(tmp_path / f"{case}_bf16"))
        _, fp32 = load_canonical(str(tmp_path / f"{case}_fp32"))
        for name, array in fp32.items():
            expected = torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy()
            np.testing.assert_array_equal(bf16[name].view(np.int16), expected, err_msg=name)


def test_scale_values_rounds_bfloat16_like_torch():
    x = torch.randn(1000) * 3
    bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = _gpt_common.scale_values(bits, 0.3)
    expected = (x.to(torch.bfloat16).float() * 0.3).to(torch.bfloat16)
    np.testing.assert_array_equal(ours.view(np.int16), expected.view(torch.int16).numpy())
    halves = x.numpy().astype(np.float16)
    np.testing.assert_array_equal(_gpt_common.scale_values(halves, 0.3),
                                  (halves.astype(np.float32) * np.float32(0.3)).astype(np.float16))


# --- what is refused, and how ---------------------------------------------------------------------


REFUSED = {
    "opt_350m": (lambda: CASES["opt"]().to_dict() | {"do_layer_norm_before": False},
                 "do_layer_norm_before"),
    "opt_projected": (lambda: CASES["opt"]().to_dict() | {"word_embed_proj_dim": 32},
                      "word_embed_proj_dim"),
    "phi3_longrope": (lambda: CASES["phi3"]().to_dict() | {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
        "long_factor": [1.0] * 8}}, "longrope"),
    "phi3_su": (lambda: {k: v for k, v in CASES["phi3"]().to_dict().items()
                         if k != "rope_parameters"} | {"rope_scaling": {"type": "su"}},
                "LongRoPE"),
    "phi_qk_layernorm": (lambda: CASES["phi"]().to_dict() | {"qk_layernorm": True},
                         "qk_layernorm"),
    "stablelm_qk_layernorm": (lambda: CASES["stablelm"]().to_dict() | {"qk_layernorm": True},
                              "qk_layernorm"),
    "olmo_clip_qkv": (lambda: CASES["olmo"]().to_dict() | {"clip_qkv": 8.0}, "clip_qkv"),
    "mpt_clip_qkv": (lambda: CASES["mpt"]().to_dict() | {"attn_config": {"clip_qkv": 6.0}},
                     "clip_qkv"),
    "mpt_no_alibi": (lambda: CASES["mpt"]().to_dict() | {"attn_config": {"alibi": False}},
                     "learned positions"),
    "bloom_post_ln_residual": (lambda: CASES["bloom"]().to_dict()
                               | {"apply_residual_connection_post_layernorm": True},
                               "apply_residual_connection_post_layernorm"),
    "gpt2_layer_scaled": (lambda: CASES["gpt2"]().to_dict()
                          | {"scale_attn_by_inverse_layer_idx": True},
                          "scale_attn_by_inverse_layer_idx"),
    "gptj_no_rotary_dim": (lambda: CASES["gptj"]().to_dict() | {"rotary_dim": None},
                           "rotary_dim"),
    "jais_alibi_scaling": (lambda: JAIS_CONFIG | {"alibi_scaling": {"type": "linear",
                                                                     "factor": 2.0}},
                           "alibi_scaling"),
    "jais_relu2": (lambda: JAIS_CONFIG | {"activation_function": "relu2"}, "relu2"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_options_are_refused_by_name(case):
    make_config, message = REFUSED[case]
    config = make_config()
    with pytest.raises(ValueError, match=message):
        get_model_family(config).spec_from_config(config)


def test_unsupported_architecture_lists_these_families():
    with pytest.raises(ValueError, match="unsupported architecture Olmo2ForCausalLM") as error:
        get_model_family({"architectures": ["Olmo2ForCausalLM"]})
    for arch in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM", "OPTForCausalLM", "GPTJForCausalLM",
                 "GPTNeoXForCausalLM", "FalconForCausalLM", "MptForCausalLM", "BloomForCausalLM",
                 "PhiForCausalLM", "Phi3ForCausalLM", "StableLmForCausalLM",
                 "Starcoder2ForCausalLM", "OlmoForCausalLM", "JAISLMHeadModel"):
        assert arch in ARCHITECTURES and arch in str(error.value)


def test_mpt_with_a_learned_position_table_is_refused(tmp_path):
    saved, hub = str(tmp_path / "saved"), str(tmp_path / "hub")
    model = transformers.AutoModelForCausalLM.from_config(CASES["mpt"]())
    model.save_pretrained(saved)
    rewrite(saved, hub, {}, lambda name: name,
            {"transformer.wpe.weight": torch.zeros(MAX_POSITIONS, 64)})
    with pytest.raises(ValueError, match="wpe.weight"):
        load_model(hub)


@pytest.mark.parametrize("case", sorted(CASES))
def test_specs_name_only_model_spec_fields(case):
    from octavo import _C

    fields = {f for f in dir(_C.ModelSpec()) if not f.startswith("_")} - {"validate"}
    rope_fields = {f for f in dir(_C.RopeConfig()) if not f.startswith("_")}
    config = CASES[case]().to_dict()
    spec = get_model_family(config).spec_from_config(config)
    assert set(spec) <= fields and set(spec["rope"]) <= rope_fields
