"""Gemma, Gemma 2, LLaMA-2/3 rope variants, InternLM, InternLM2, Baichuan (7B, 13B, 2), ChatGLM
(2/3/4), Qwen (the first), Orion, Aquila, Yi and DeciLM: octavo's greedy generation against a
reference on tiny random checkpoints (fp32, CPU).

Families that transformers implements are built with from_config and compared with it. The others
(their code ships with their checkpoints) are written here in their published tensor names and
config keys, with weights converted from a mathematically equivalent transformers model (InternLM
is Llama with attention biases, ChatGLM is GLM-4, Qwen is Qwen2, Orion is StableLM with full
rotary, ...) that serves as the reference; Baichuan-13B's ALiBi has no such model and is compared
with a small torch implementation of its published math written below.

Criteria as in test_generate.py: identical greedy tokens for 32 new tokens, each token's logprob
within 2e-4, prompts of several lengths run together as a batch and alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from octavo import LLM, SamplingParams  # noqa: E402
from octavo.models import get_model_family, load_model  # noqa: E402

from checkpoints import build_tokenizer  # noqa: E402

NEW_TOKENS = 32
LOGPROB_TOLERANCE = 2e-4
VOCAB = 320
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)

# Tiny sizes: head_dim 16 (4 query heads, 2 KV heads), 3 layers.
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
             pad_token_id=2, tie_word_embeddings=False)


def prompts_for(vocab: int = VOCAB) -> list[list[int]]:
    rng = np.random.default_rng(2024)
    return [rng.integers(3, min(vocab, VOCAB), size=n).tolist() for n in (1, 9, 40)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer(directory)
    return directory


def native_model(config_class, seed: int = 0, **overrides):
    """A transformers model of the tiny sizes with random biases and norm weights (their
    initialisation, zeros and ones, would hide a missing bias or a wrong norm)."""
    torch.manual_seed(seed)
    kwargs = {**SIZES, **overrides}
    config = config_class(**kwargs)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model):
    return lambda ids: model(ids, logits_to_keep=1).logits[0, -1]


def reference_greedy(next_logits, prompt: list[int]):
    """Greedy continuation and each chosen token's logprob, recomputing the whole sequence each
    step (no cache): next_logits(LongTensor [1, n]) -> logits of the next token."""
    tokens, logprobs = list(prompt), []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            logprob = torch.log_softmax(next_logits(torch.tensor([tokens])).double(), -1)
        token = int(logprob.argmax())
        tokens.append(token)
        logprobs.append(float(logprob[token]))
    return tokens[len(prompt):], logprobs


def check_generation(directory: str, next_logits, vocab: int = VOCAB, **llm_kwargs):
    """octavo's greedy tokens and logprobs equal the reference's, batched and alone."""
    prompts = prompts_for(vocab)
    expected = [reference_greedy(next_logits, p) for p in prompts]
    llm = LLM(model=directory, dtype="float32", kv_cache_memory_bytes=32 << 20, **llm_kwargs)

    def compare(outputs, cases):
        for out, (tokens, logprobs) in zip(outputs, cases, strict=True):
            got = out.outputs[0].token_ids
            assert got == tokens, f"prompt of {len(out.prompt_token_ids)} tokens"
            ours = [entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, got)]
            np.testing.assert_allclose(ours, logprobs, atol=LOGPROB_TOLERANCE, rtol=0)

    compare(llm.generate(prompts, GREEDY, use_tqdm=False), expected)
    compare(llm.generate(prompts[1:2], GREEDY, use_tqdm=False), expected[1:2])
    return llm


def save_checkpoint(directory: str, config: dict, tensors: dict, tokenizer_dir: str,
                    fmt: str = "safetensors", shards: int = 1) -> str:
    """config.json, the tensors as model.safetensors or pytorch_model.bin (split into `shards`
    files with the index json transformers writes), and the tokenizer."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"torch_dtype": "float32", **config}, f)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), directory)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    ext, stem = (".safetensors", "model") if fmt == "safetensors" else (".bin", "pytorch_model")
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{stem}{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
        part = {k: tensors[k] for k in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(directory, file))
        weight_map.update({k: file for k in group})
    if shards > 1:
        with open(os.path.join(directory, f"{stem}{ext}.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


def save_native(model, directory: str, tokenizer_dir: str) -> str:
    model.save_pretrained(directory)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), directory)
    return directory


def config_keys(**keys) -> dict:
    """The tiny sizes under Llama's config keys, plus `keys`."""
    return llama_keys(transformers.LlamaConfig(**SIZES), **keys)


def llama_keys(config, **keys) -> dict:
    """A transformers config's sizes under Llama's config.json keys, plus `keys`."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
             "bos_token_id", "eos_token_id", "pad_token_id")
    return {**{k: getattr(config, k) for k in names}, "tie_word_embeddings": False,
            "hidden_act": "silu", "rms_norm_eps": getattr(config, "rms_norm_eps", 1e-6), **keys}


# --- converters: a transformers model -> (config.json, tensors) in a family's published layout --
# Shared with tests/gpu/test_models_h5.py.


def as_internlm(model):
    """InternLM: Llama's tensors (attention_bias=True), "bias" and "rotary" config keys."""
    config = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm", "bias": True,
              "rotary": {"base": model.config.rope_parameters["rope_theta"], "type": "dynamic"},
              **llama_keys(model.config)}
    config.pop("num_key_value_heads")  # InternLM is multi-head
    return config, dict(model.state_dict())


def as_internlm2(model):
    """wqkv groups each KV head's query heads with it: [q0 q1 k v] per KV head."""
    c = model.config
    heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    state = dict(model.state_dict())
    tensors = {"model.tok_embeddings.weight": state["model.embed_tokens.weight"],
               "model.norm.weight": state["model.norm.weight"],
               "output.weight": state["lm_head.weight"]}
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        q = state[p + "self_attn.q_proj.weight"].reshape(kv_heads, heads // kv_heads, d, -1)
        k = state[p + "self_attn.k_proj.weight"].reshape(kv_heads, 1, d, -1)
        v = state[p + "self_attn.v_proj.weight"].reshape(kv_heads, 1, d, -1)
        tensors[p + "attention.wqkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, c.hidden_size)
        tensors[p + "attention.wo.weight"] = state[p + "self_attn.o_proj.weight"]
        tensors[p + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
        tensors[p + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        tensors[p + "feed_forward.w1.weight"] = state[p + "mlp.gate_proj.weight"]
        tensors[p + "feed_forward.w3.weight"] = state[p + "mlp.up_proj.weight"]
        tensors[p + "feed_forward.w2.weight"] = state[p + "mlp.down_proj.weight"]
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "bias": False, "rope_theta": c.rope_parameters["rope_theta"],
              "rope_scaling": {"type": "dynamic", "factor": 2.0}, **llama_keys(c)}
    return config, tensors


def w_pack_state(model) -> dict:
    """Llama tensors with q, k and v fused into self_attn.W_pack, as Baichuan stores them."""
    state = dict(model.state_dict())
    for layer in range(model.config.num_hidden_layers):
        attn = f"model.layers.{layer}.self_attn."
        state[attn + "W_pack.weight"] = torch.cat(
            [state.pop(attn + f"{p}_proj.weight") for p in "qkv"])
    return state


def as_baichuan_7b(model):
    config = {"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan",
              **llama_keys(model.config)}
    config.pop("num_key_value_heads")
    return config, w_pack_state(model)


def chatglm_tensors(model, multi_query: bool) -> dict:
    """GLM-4 (transformers' GlmForCausalLM) tensors in ChatGLM's original layout."""
    state = dict(model.state_dict())
    heads, d = model.config.num_attention_heads, model.config.head_dim
    tensors = {"transformer.embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
               "transformer.encoder.final_layernorm.weight": state["model.norm.weight"],
               "transformer.output_layer.weight": state["lm_head.weight"],
               "transformer.rotary_pos_emb.inv_freq": torch.zeros(4)}  # stored, unused
    for layer in range(model.config.num_hidden_layers):
        hf, ours = f"model.layers.{layer}.", f"transformer.encoder.layers.{layer}."
        for kind in ("weight", "bias"):
            q, k, v = (state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv")
            if multi_query:
                qkv = torch.cat([q, k, v])
            else:  # per head [q, k, v]
                qkv = torch.stack([t.reshape(heads, d, *t.shape[1:]) for t in (q, k, v)], 1)
                qkv = qkv.reshape(3 * heads * d, *q.shape[1:])
            tensors[ours + f"self_attention.query_key_value.{kind}"] = qkv
        tensors[ours + "self_attention.dense.weight"] = state[hf + "self_attn.o_proj.weight"]
        tensors[ours + "input_layernorm.weight"] = state[hf + "input_layernorm.weight"]
        tensors[ours + "post_attention_layernorm.weight"] = state[
            hf + "post_attention_layernorm.weight"]
        tensors[ours + "mlp.dense_h_to_4h.weight"] = state[hf + "mlp.gate_up_proj.weight"]
        tensors[ours + "mlp.dense_4h_to_h.weight"] = state[hf + "mlp.down_proj.weight"]
    return tensors


def as_chatglm(model):
    """ChatGLM2/3 from transformers' GLM-4 (GlmForCausalLM, the same math); multi-query groups
    when the model has fewer KV heads than heads, else per-head [q, k, v] rows."""
    c = model.config
    multi_query = c.num_key_value_heads < c.num_attention_heads
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
              "num_layers": c.num_hidden_layers, "padded_vocab_size": c.vocab_size,
              "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
              "ffn_hidden_size": c.intermediate_size, "kv_channels": c.head_dim,
              "num_attention_heads": c.num_attention_heads,
              "seq_length": c.max_position_embeddings, "multi_query_attention": multi_query,
              "multi_query_group_num": c.num_key_value_heads, "layernorm_epsilon": c.rms_norm_eps,
              "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
              "post_layer_norm": True, "add_bias_linear": False, "add_qkv_bias": True,
              "original_rope": True, "rope_ratio": c.rope_parameters["rope_theta"] / 10000.0,
              "eos_token_id": 1, "pad_token_id": 2}
    return config, chatglm_tensors(model, multi_query)


def as_qwen(model):
    """The first Qwen from Qwen2 (the same math, multi-head); w2 is the gate, w1 the up."""
    c = model.config
    state = dict(model.state_dict())
    tensors = {"transformer.wte.weight": state["model.embed_tokens.weight"],
               "transformer.ln_f.weight": state["model.norm.weight"],
               "lm_head.weight": state["lm_head.weight"]}
    for layer in range(c.num_hidden_layers):
        hf, ours = f"model.layers.{layer}.", f"transformer.h.{layer}."
        for kind in ("weight", "bias"):
            tensors[ours + f"attn.c_attn.{kind}"] = torch.cat(
                [state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        tensors[ours + "attn.c_proj.weight"] = state[hf + "self_attn.o_proj.weight"]
        tensors[ours + "ln_1.weight"] = state[hf + "input_layernorm.weight"]
        tensors[ours + "ln_2.weight"] = state[hf + "post_attention_layernorm.weight"]
        tensors[ours + "mlp.w2.weight"] = state[hf + "mlp.gate_proj.weight"]
        tensors[ours + "mlp.w1.weight"] = state[hf + "mlp.up_proj.weight"]
        tensors[ours + "mlp.c_proj.weight"] = state[hf + "mlp.down_proj.weight"]
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
              "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
              "num_attention_heads": c.num_attention_heads,
              "num_hidden_layers": c.num_hidden_layers, "kv_channels": c.head_dim,
              "intermediate_size": 2 * c.intermediate_size, "rotary_pct": 1.0,
              "rotary_emb_base": c.rope_parameters["rope_theta"],
              "layer_norm_epsilon": c.rms_norm_eps,
              "seq_length": c.max_position_embeddings // 2,
              "max_position_embeddings": c.max_position_embeddings, "no_bias": True,
              "use_dynamic_ntk": True, "use_logn_attn": True, "tie_word_embeddings": False}
    return config, tensors


def as_orion(model):
    """Orion from StableLM with full rotary and a sequential residual: Llama's names, LayerNorm
    with weight and bias; Orion names its epsilon rms_norm_eps."""
    c = model.config
    config = {"architectures": ["OrionForCausalLM"], "model_type": "orion",
              **llama_keys(c, rms_norm_eps=c.layer_norm_eps),
              "rope_theta": c.rope_parameters["rope_theta"], "attention_bias": False}
    return config, dict(model.state_dict())


def as_aquila(model):
    config = {"architectures": ["AquilaForCausalLM"], "model_type": "aquila",
              **llama_keys(model.config)}
    return config, dict(model.state_dict())


def as_yi(model):
    """The first Yi release: Llama with the layer norms named ln1 and ln2."""
    state = {k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2"): v
             for k, v in model.state_dict().items()}
    config = {"architectures": ["YiForCausalLM"], "model_type": "Yi",
              "rope_theta": model.config.rope_parameters["rope_theta"],
              **llama_keys(model.config)}
    return config, state


def with_kv_heads_per_layer(model, counts: list[int], seed: int = 15):
    """The Llama `model` with layer L's attention rebuilt with counts[L] KV heads (DeciLM's
    variable GQA), random weights."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    torch.manual_seed(seed)
    keys = {k: v for k, v in model.config.to_dict().items() if k != "rope_scaling"}
    for layer, heads in enumerate(counts):
        config = transformers.LlamaConfig(**{**keys, "num_key_value_heads": heads})
        config._attn_implementation = model.config._attn_implementation
        attention = LlamaAttention(config, layer).to(next(model.parameters()).dtype)
        for p in attention.parameters():
            torch.nn.init.normal_(p, 0.0, model.config.initializer_range)
        model.model.layers[layer].self_attn = attention.eval()
    return model


def as_decilm(model):
    c = model.config
    counts = [layer.self_attn.k_proj.out_features // c.head_dim for layer in model.model.layers]
    config = {"architectures": ["DeciLMForCausalLM"], "model_type": "deci",
              "num_key_value_heads_per_layer": counts,
              "rope_scaling": {"type": "dynamic", "factor": 2.0}, **llama_keys(c)}
    config.pop("num_key_value_heads")
    return config, dict(model.state_dict())


# --- families transformers implements -----------------------------------------------------------


def test_gemma(tmp_path, tokenizer_dir):
    model = native_model(transformers.GemmaConfig, seed=1, hidden_activation="gelu_pytorch_tanh",
                         tie_word_embeddings=True)
    directory = save_native(model, str(tmp_path / "gemma"), tokenizer_dir)
    spec, _, _, _ = load_model(directory)
    assert spec["norm"] == "rms_norm_plus_one" and spec["tied_embeddings"]
    assert spec["embedding_scale"] == pytest.approx(8.0)
    check_generation(directory, hf_logits(model))


def test_gemma_legacy_gelu_means_tanh():
    family = get_model_family({"architectures": ["GemmaForCausalLM"]})
    config = {"architectures": ["GemmaForCausalLM"], **config_keys(hidden_act="gelu")}
    assert family.spec_from_config(config)["activation"] == "gelu_tanh_glu"
    config["hidden_activation"] = "gelu_pytorch_tanh"
    assert family.spec_from_config(config)["activation"] == "gelu_tanh_glu"


def test_gemma2(tmp_path, tokenizer_dir):
    # Caps low enough that tanh bends the scores and logits, a window the prompts outgrow.
    model = native_model(transformers.Gemma2Config, seed=2, sliding_window=8,
                         query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                         final_logit_softcapping=3.0, tie_word_embeddings=True)
    directory = save_native(model, str(tmp_path / "gemma2"), tokenizer_dir)
    spec, _, _, _ = load_model(directory)
    assert spec["sliding_window"] == [8, 0, 8] and spec["sandwich_norms"]
    assert spec["attention_scale"] == pytest.approx(24 ** -0.5)
    check_generation(directory, hf_logits(model))


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
], ids=["llama3", "linear"])
def test_llama_rope_scaling(tmp_path, tokenizer_dir, rope):
    """LLaMA-3.x (llama3 scaling, tied embeddings as in Llama-3.2) and linear scaling (LLaMA-2
    long-context fine-tunes)."""
    model = native_model(transformers.LlamaConfig, seed=3, rope_parameters=rope,
                         tie_word_embeddings=rope["rope_type"] == "llama3")
    directory = save_native(model, str(tmp_path / "llama"), tokenizer_dir)
    check_generation(directory, hf_logits(model))


def test_llama_dynamic_ntk_is_refused(tmp_path, tokenizer_dir):
    model = native_model(transformers.LlamaConfig,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                          "rope_theta": 10000.0})
    directory = save_native(model, str(tmp_path / "llama"), tokenizer_dir)
    with pytest.raises(ValueError, match="dynamic NTK"):
        LLM(model=directory, dtype="float32")


# --- families whose code ships with the checkpoint ----------------------------------------------


def test_internlm(tmp_path, tokenizer_dir):
    """InternLM is Llama with biases on q, k, v and o; its rotary is {"type": "dynamic"}.
    Written as a single pytorch_model.bin."""
    model = native_model(transformers.LlamaConfig, seed=4, num_key_value_heads=4,
                         attention_bias=True, rope_theta=20000.0)  # not the loader's default
    directory = save_checkpoint(str(tmp_path / "internlm"), *as_internlm(model), tokenizer_dir,
                                fmt="bin")
    check_generation(directory, hf_logits(model))


def test_internlm2(tmp_path, tokenizer_dir):
    model = native_model(transformers.LlamaConfig, seed=5, rope_theta=1e6)
    directory = save_checkpoint(str(tmp_path / "internlm2"), *as_internlm2(model), tokenizer_dir)
    check_generation(directory, hf_logits(model))


def test_baichuan_7b(tmp_path, tokenizer_dir):
    """Baichuan-7B (BaiChuanForCausalLM): Llama with W_pack; as sharded pytorch_model-*.bin."""
    model = native_model(transformers.LlamaConfig, seed=6, num_key_value_heads=4)
    directory = save_checkpoint(str(tmp_path / "baichuan"), *as_baichuan_7b(model),
                                tokenizer_dir, fmt="bin", shards=3)
    spec, _, _, _ = load_model(directory)
    assert spec["positions"] == "rotary"
    check_generation(directory, hf_logits(model))


BAICHUAN2_VOCAB = 125696


def test_baichuan2_7b_normalises_the_lm_head(tmp_path, tokenizer_dir):
    """Baichuan2-7B (BaichuanForCausalLM, RoPE): NormHead divides each LM-head row by its norm,
    which the reference model gets by normalised rows."""
    model = native_model(transformers.LlamaConfig, seed=7, num_key_value_heads=4,
                         vocab_size=BAICHUAN2_VOCAB)
    state = w_pack_state(model)  # raw rows, as Baichuan 2 stores them
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
              "model_max_length": 256, "z_loss_weight": 0,
              **config_keys(vocab_size=BAICHUAN2_VOCAB)}
    config.pop("num_key_value_heads")
    directory = save_checkpoint(str(tmp_path / "baichuan2"), config, state, tokenizer_dir)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight))
    check_generation(directory, hf_logits(model), vocab=BAICHUAN2_VOCAB)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normhead_rows_match_torch_in_16_bits(dtype):
    from octavo.models.baichuan import normalize_rows

    rows = (torch.randn(37, 24) * 3).to(dtype)
    expected = torch.nn.functional.normalize(rows.float()).to(dtype)
    if dtype == torch.bfloat16:
        got = torch.from_numpy(normalize_rows(rows.view(torch.int16).numpy().view(np.uint16))
                               .view(np.int16)).view(torch.bfloat16)
    else:
        got = torch.from_numpy(normalize_rows(rows.numpy()))
    assert torch.equal(got, expected)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al.): 2^(-8/n), 2^(-16/n), ... for the nearest power of two
    n <= heads; the remaining heads take every other slope of the sequence for 2n."""
    def geometric(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(heads)))
    return torch.tensor(geometric(closest) + geometric(2 * closest)[0::2][:heads - closest],
                        dtype=torch.float64)


def baichuan_13b_logits(w: dict, heads: int, eps: float, normhead: bool):
    """Baichuan-13B's forward as its model card and code describe it: RMSNorm, W_pack attention
    with the ALiBi bias slope_h * key_position added to the scaled scores under a causal mask,
    SwiGLU, a final RMSNorm, the LM head (rows normalised for Baichuan 2). float64 throughout."""
    w = {k: v.double() for k, v in w.items()}

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    slopes = alibi_slopes(heads)

    def next_logits(ids):
        ids = ids[0]
        n = len(ids)
        x = w["model.embed_tokens.weight"][ids]
        hidden = x.shape[-1]
        d = hidden // heads
        bias = slopes[:, None, None] * torch.arange(n, dtype=torch.float64)[None, None, :]
        future = torch.triu(torch.full((n, n), float("-inf"), dtype=torch.float64), 1)
        for layer in range(len([k for k in w if k.endswith("W_pack.weight")])):
            p = f"model.layers.{layer}."
            h = rms(x, w[p + "input_layernorm.weight"])
            q, k, v = (h @ w[p + "self_attn.W_pack.weight"].T).split(hidden, -1)
            q, k, v = (t.reshape(n, heads, d).transpose(0, 1) for t in (q, k, v))
            scores = q @ k.transpose(1, 2) / math.sqrt(d) + bias + future
            attn = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(n, hidden)
            x = x + attn @ w[p + "self_attn.o_proj.weight"].T
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        head = w["lm_head.weight"]
        if normhead:
            head = head / head.norm(dim=-1, keepdim=True)
        return rms(x[-1], w["model.norm.weight"]) @ head.T

    return next_logits


def random_baichuan_13b(heads: int, hidden: int, inter: int, layers: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(8)

    def randn(*shape, scale=0.1, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=gen)).float()

    w = {"model.embed_tokens.weight": randn(vocab, hidden, scale=1.0),
         "model.norm.weight": randn(hidden, mean=1.0), "lm_head.weight": randn(vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        w.update({p + "input_layernorm.weight": randn(hidden, mean=1.0),
                  p + "self_attn.W_pack.weight": randn(3 * hidden, hidden),
                  p + "self_attn.o_proj.weight": randn(hidden, hidden),
                  p + "post_attention_layernorm.weight": randn(hidden, mean=1.0),
                  p + "mlp.gate_proj.weight": randn(inter, hidden),
                  p + "mlp.up_proj.weight": randn(inter, hidden),
                  p + "mlp.down_proj.weight": randn(hidden, inter)})
    return w


def test_baichuan_13b_alibi(tmp_path, tokenizer_dir):
    """Baichuan-13B (BaichuanForCausalLM, ALiBi; its config has model_max_length and no
    max_position_embeddings) with 6 heads, so the slopes include the interleaved ones."""
    heads, hidden, inter = 6, 96, 112
    w = random_baichuan_13b(heads, hidden, inter, 3, VOCAB)
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
              "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": 3, "num_attention_heads": heads, "model_max_length": 128,
              "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    directory = save_checkpoint(str(tmp_path / "baichuan13b"), config, w, tokenizer_dir)
    spec, _, _, _ = load_model(directory)
    assert spec["positions"] == "alibi" and spec["max_position_embeddings"] == 128
    llm = check_generation(directory, baichuan_13b_logits(w, heads, 1e-6, normhead=False))
    assert llm.engine.config.max_model_len == 128


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["groups", "per_head_qkv"])
def test_chatglm(tmp_path, tokenizer_dir, kv_heads):
    """ChatGLM2/3 against transformers' GLM-4 (same math: half-rotary in GPT-J pairs, q/k/v
    biases, fused gate|up), rope_ratio 1.5 -> base 15000."""
    model = native_model(transformers.GlmConfig, seed=9, num_key_value_heads=kv_heads,
                         partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
                         rope_theta=15000.0)
    directory = save_checkpoint(str(tmp_path / "chatglm"), *as_chatglm(model), tokenizer_dir)
    spec, _, _, _ = load_model(directory)
    assert spec["rope"]["pairing"] == "gptj" and spec["rope"]["rotary_dim"] == 8
    assert spec["rope"]["theta"] == pytest.approx(15000.0)
    check_generation(directory, hf_logits(model))


def test_qwen(tmp_path, tokenizer_dir):
    """The first Qwen against Qwen2, as sharded safetensors. Its dynamic NTK and logn attention
    act only past seq_length (128 here), which becomes the context limit."""
    model = native_model(transformers.Qwen2Config, seed=10, num_key_value_heads=4,
                         use_sliding_window=False)
    directory = save_checkpoint(str(tmp_path / "qwen"), *as_qwen(model), tokenizer_dir, shards=2)
    llm = check_generation(directory, hf_logits(model))
    assert llm.engine.config.max_model_len == 128


def test_orion(tmp_path, tokenizer_dir):
    model = native_model(transformers.StableLmConfig, seed=11, partial_rotary_factor=1.0,
                         layer_norm_eps=1e-5, use_qkv_bias=False, use_parallel_residual=False)
    directory = save_checkpoint(str(tmp_path / "orion"), *as_orion(model), tokenizer_dir)
    check_generation(directory, hf_logits(model))


def test_aquila(tmp_path, tokenizer_dir):
    model = native_model(transformers.LlamaConfig, seed=12)
    directory = save_checkpoint(str(tmp_path / "aquila"), *as_aquila(model), tokenizer_dir)
    check_generation(directory, hf_logits(model))


def test_yi(tmp_path, tokenizer_dir):
    model = native_model(transformers.LlamaConfig, seed=13, rope_theta=5e6)
    directory = save_checkpoint(str(tmp_path / "yi"), *as_yi(model), tokenizer_dir)
    check_generation(directory, hf_logits(model))


# transformers warns about the rope_scaling key when the tokenizer reads DeciLM's config.json.
@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")
def test_decilm(tmp_path, tokenizer_dir):
    """DeciLM's variable GQA: 2, 4 and 1 KV heads in layers 0, 1, 2 (a Llama whose attention
    modules are rebuilt per layer is the reference)."""
    model = with_kv_heads_per_layer(native_model(transformers.LlamaConfig, seed=14), [2, 4, 1])
    directory = save_checkpoint(str(tmp_path / "decilm"), *as_decilm(model), tokenizer_dir)
    spec, _, _, _ = load_model(directory)
    assert spec["num_kv_heads_per_layer"] == [2, 4, 1]
    check_generation(directory, hf_logits(model))


# --- configs that are refused -------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["ChatGLMModel"], "position_encoding_2d": True},
     "first ChatGLM-6B"),
    ({"architectures": ["ChatGLMModel"], "apply_residual_connection_post_layernorm": True},
     "apply_residual_connection_post_layernorm"),
    ({"architectures": ["ChatGLMModel"], "quantization_bit": 4}, "quantized to 4 bits"),
    ({"architectures": ["DeciLMForCausalLM"], "block_configs": [{}]}, "Nemotron-NAS"),
    ({"architectures": ["DeciLMForCausalLM"], "num_key_value_heads_per_layer": [3, 2, 2]},
     r"num_key_value_heads_per_layer\[0\] is 3; it must divide num_attention_heads \(4\)"),
    ({"architectures": ["InternLMForCausalLM"], "rotary": {"type": "xpos"}},
     "rotary type 'xpos'"),
    ({"architectures": ["Gemma3ForCausalLM"]}, "unsupported architecture Gemma3ForCausalLM"),
])
def test_unsupported_configs_are_refused(config, message):
    full = {**config_keys(), **config}
    with pytest.raises(ValueError, match=message):
        get_model_family(full).spec_from_config(full)
