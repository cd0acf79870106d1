"""HF config -> ModelSpec fields and HF tensors -> canonical tensors, on tiny random models that
transformers builds here (nothing downloaded)."""

import json

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from octavo import models
from octavo.models import ARCHITECTURES, get_model_family, load_model
from octavo.models import _safetensors_reader

SPEC_FIELDS = {
    "architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "intermediate_size", "max_position_embeddings", "norm", "norm_eps", "norm_bias",
    "activation", "positions", "rope", "position_offset", "residual", "qkv_bias", "o_bias",
    "mlp_bias", "qk_norm", "tied_embeddings", "embedding_scale", "attention_scale",
    "attn_logit_softcap", "final_logit_softcap", "sliding_window", "lm_head_bias",
    "embedding_norm", "sandwich_norms", "num_kv_heads_per_layer", "alibi_slope_scale",
}  # every ModelSpec field: each family's spec goes through make_spec
ROPE_FIELDS = {
    "pairing", "theta", "rotary_dim", "scaling", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position", "beta_fast", "beta_slow", "attention_factor",
}

TINY = dict(vocab_size=300, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
            num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128,
            rms_norm_eps=1e-5)

CASES = {
    "llama": (LlamaConfig, dict(TINY, attention_bias=True, mlp_bias=True)),
    "llama_tied": (LlamaConfig, dict(TINY, tie_word_embeddings=True)),
    "mistral": (MistralConfig, dict(TINY, head_dim=48, sliding_window=8)),
    "qwen2": (Qwen2Config, dict(TINY, tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, dict(TINY, head_dim=48)),
    "qwen3_bias": (Qwen3Config, dict(TINY, attention_bias=True, tie_word_embeddings=True)),
}


def build(case, dtype=torch.float32):
    config_class, kwargs = CASES[case]
    config = config_class(**kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return config, model


def numpy_state(model):
    """HF tensors as numpy, bfloat16 as its uint16 bits (what the safetensors reader yields)."""
    def to_numpy(t):
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    return {name: to_numpy(t) for name, t in model.state_dict().items()}


def config_dict(config):
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config.to_dict()


def canonical(case, dtype=torch.float32):
    config, model = build(case, dtype)
    cfg = config_dict(config)
    family = get_model_family(cfg)
    spec = family.spec_from_config(cfg)
    state = numpy_state(model)
    weights = dict(models.canonical_weights(family, state.__getitem__, state.keys(), spec))
    return cfg, spec, state, weights


def test_registry_lists_the_four_architectures():
    assert set(ARCHITECTURES) >= {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                  "Qwen3ForCausalLM"}
    assert get_model_family({"model_type": "qwen3"}) is models.qwen3


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError) as e:
        get_model_family({"architectures": ["MambaForCausalLM"]})
    message = str(e.value)
    assert message.startswith("unsupported architecture MambaForCausalLM; supported: ")
    assert all(arch in message for arch in ARCHITECTURES)
    # the first supported entry wins
    assert get_model_family({"architectures": ["Foo", "MistralForCausalLM"]}) is models.mistral


@pytest.mark.parametrize("case", CASES)
def test_spec_fields(case):
    config, _ = build(case)
    cfg = config_dict(config)
    spec = get_model_family(cfg).spec_from_config(cfg)
    assert set(spec) == SPEC_FIELDS and set(spec["rope"]) == ROPE_FIELDS
    kwargs = CASES[case][1]
    head_dim = cfg.get("head_dim") or 16  # Qwen3Config defaults head_dim to 128
    assert spec["architecture"] == cfg["architectures"][0]
    assert (spec["vocab_size"], spec["hidden_size"], spec["num_layers"]) == (300, 96, 2)
    assert (spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]) == (6, 2, head_dim)
    assert (spec["intermediate_size"], spec["max_position_embeddings"]) == (64, 128)
    assert spec["norm"] == "rms_norm" and spec["norm_eps"] == pytest.approx(1e-5)
    assert spec["activation"] == "silu_glu" and spec["residual"] == "sequential"
    assert spec["positions"] == "rotary"
    assert spec["rope"]["scaling"] == "none" and spec["rope"]["pairing"] == "neox"
    assert spec["rope"]["theta"] == 10000.0 and spec["rope"]["rotary_dim"] == 0
    assert spec["tied_embeddings"] == kwargs.get("tie_word_embeddings", False)
    family = case.split("_")[0]
    bias = kwargs.get("attention_bias", False)
    assert spec["qkv_bias"] == (bias or family == "qwen2")
    assert spec["o_bias"] == bias
    assert spec["mlp_bias"] == kwargs.get("mlp_bias", False)
    assert spec["qk_norm"] == (family == "qwen3")
    assert spec["sliding_window"] == ([8, 8] if family == "mistral" else [0, 0])
    assert json.loads(json.dumps(spec)) == spec  # plain data


@pytest.mark.parametrize("case", CASES)
def test_canonical_weights(case):
    cfg, spec, state, weights = canonical(case)
    h, kv, d = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    hidden, inter, vocab = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    expected_names = {"embed_tokens.weight", "final_norm.weight"}
    if not spec["tied_embeddings"]:
        expected_names.add("lm_head.weight")
    for layer in range(spec["num_layers"]):
        names = ["input_norm.weight", "qkv.weight", "o.weight", "post_attn_norm.weight",
                 "gate_up.weight", "down.weight"]
        names += ["qkv.bias"] * spec["qkv_bias"] + ["o.bias"] * spec["o_bias"]
        names += ["q_norm.weight", "k_norm.weight"] * spec["qk_norm"]
        names += ["gate_up.bias", "down.bias"] * spec["mlp_bias"]
        expected_names |= {f"layers.{layer}.{n}" for n in names}
    assert set(weights) == expected_names

    same = np.testing.assert_array_equal
    same(weights["embed_tokens.weight"], state["model.embed_tokens.weight"])
    same(weights["final_norm.weight"], state["model.norm.weight"])
    if not spec["tied_embeddings"]:
        same(weights["lm_head.weight"], state["lm_head.weight"])
    for layer in range(spec["num_layers"]):
        hf, ours = f"model.layers.{layer}.", f"layers.{layer}."
        qkv = weights[ours + "qkv.weight"]
        assert qkv.shape == ((h + 2 * kv) * d, hidden)
        np.testing.assert_array_equal(qkv[:h * d], state[hf + "self_attn.q_proj.weight"])
        same(qkv[h * d:(h + kv) * d], state[hf + "self_attn.k_proj.weight"])
        np.testing.assert_array_equal(qkv[(h + kv) * d:], state[hf + "self_attn.v_proj.weight"])
        if spec["qkv_bias"]:
            np.testing.assert_array_equal(weights[ours + "qkv.bias"], np.concatenate(
                [state[hf + f"self_attn.{p}_proj.bias"] for p in "qkv"]))
        if spec["qk_norm"]:
            assert weights[ours + "q_norm.weight"].shape == (d,)
            np.testing.assert_array_equal(weights[ours + "k_norm.weight"],
                                          state[hf + "self_attn.k_norm.weight"])
        o = weights[ours + "o.weight"]
        assert o.shape == (hidden, h * d)
        np.testing.assert_array_equal(o, state[hf + "self_attn.o_proj.weight"])
        gate_up = weights[ours + "gate_up.weight"]
        assert gate_up.shape == (2 * inter, hidden)
        np.testing.assert_array_equal(gate_up[:inter], state[hf + "mlp.gate_proj.weight"])
        np.testing.assert_array_equal(gate_up[inter:], state[hf + "mlp.up_proj.weight"])
        if spec["mlp_bias"]:
            np.testing.assert_array_equal(weights[ours + "gate_up.bias"], np.concatenate(
                [state[hf + "mlp.gate_proj.bias"], state[hf + "mlp.up_proj.bias"]]))
            same(weights[ours + "down.bias"], state[hf + "mlp.down_proj.bias"])
        assert weights[ours + "down.weight"].shape == (hidden, inter)
        np.testing.assert_array_equal(weights[ours + "input_norm.weight"],
                                      state[hf + "input_layernorm.weight"])
        np.testing.assert_array_equal(weights[ours + "post_attn_norm.weight"],
                                      state[hf + "post_attention_layernorm.weight"])


def test_bfloat16_bits_are_moved_untouched():
    _, _, state, weights = canonical("qwen3", torch.bfloat16)
    qkv = weights["layers.1.qkv.weight"]
    assert qkv.dtype == np.uint16
    kv_rows = 2 * 48
    np.testing.assert_array_equal(qkv[-kv_rows:], state["model.layers.1.self_attn.v_proj.weight"])


def tied_spec_and_state():
    config, model = build("llama")
    cfg = config_dict(config)
    return cfg, models.llama.spec_from_config(cfg), numpy_state(model)


def test_missing_tensor_names_hf_and_canonical():
    cfg, spec, state = tied_spec_and_state()
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError) as e:
        models.canonical_weights(models.llama, state.__getitem__, state.keys(), spec)
    assert "'model.layers.1.self_attn.k_proj.weight'" in str(e.value)
    assert "'layers.1.qkv.weight'" in str(e.value)


def test_missing_lm_head_when_untied():
    cfg, spec, state = tied_spec_and_state()
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match="'lm_head.weight'"):
        models.canonical_weights(models.llama, state.__getitem__, state.keys(), spec)
    spec["tied_embeddings"] = True
    names = dict(models.canonical_weights(models.llama, state.__getitem__, state.keys(), spec))
    assert "lm_head.weight" not in names


def test_tied_config_ignores_stored_lm_head_and_extra_tensors():
    cfg, spec, state = tied_spec_and_state()
    spec["tied_embeddings"] = True
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
    weights = dict(models.canonical_weights(models.llama, state.__getitem__, state.keys(), spec))
    assert "lm_head.weight" not in weights and not any("inv_freq" in n for n in weights)


def test_wrong_shape_names_tensor():
    cfg, spec, state = tied_spec_and_state()
    state["model.layers.0.self_attn.v_proj.weight"] = np.zeros((16, 96), np.float32)
    with pytest.raises(ValueError, match=r"v_proj.weight' has shape \[16, 96\]; the config "
                                         r"implies \[32, 96\] for 'layers.0.qkv.weight'"):
        list(models.canonical_weights(models.llama, state.__getitem__, state.keys(), spec))


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = {"architectures": ["Qwen2ForCausalLM"], **TINY}
    assert models.qwen2.spec_from_config(cfg)["head_dim"] == 16
    cfg["head_dim"] = None
    assert models.qwen2.spec_from_config(cfg)["head_dim"] == 16
    cfg.update(head_dim=None, hidden_size=100)
    with pytest.raises(ValueError, match="not a multiple"):
        models.qwen2.spec_from_config(cfg)


# --- rope -------------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def rope_of(**config):
    cfg = {"architectures": ["LlamaForCausalLM"], **TINY, **config}
    return models.llama.spec_from_config(cfg)["rope"]


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_from_either_key(key):
    params = dict(LLAMA3)
    if key == "rope_parameters":
        params["rope_theta"] = 500000.0
        rope = rope_of(rope_parameters=params)
    else:
        rope = rope_of(rope_scaling=params, rope_theta=500000.0)
    assert rope["scaling"] == "llama3" and rope["theta"] == 500000.0
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert rope["original_max_position"] == 64


def test_rope_as_transformers_saves_it():
    """transformers 5 writes rope_parameters with rope_theta inside; 4.x wrote rope_theta and
    rope_scaling at the top level. Both must parse to the same spec."""
    config = LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    saved = json.loads(config.to_json_string())
    rope = rope_of(**{k: saved[k] for k in ("rope_parameters", "rope_scaling", "rope_theta")
                      if k in saved})
    assert rope == rope_of(rope_scaling=dict(LLAMA3, type="llama3"), rope_theta=500000.0)
    assert rope["theta"] == 500000.0 and rope["scaling"] == "llama3"
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert "rope_parameters" in saved


def test_linear_and_dynamic_rope():
    rope = rope_of(rope_scaling={"type": "linear", "factor": 2.0})
    assert (rope["scaling"], rope["factor"], rope["theta"]) == ("linear", 2.0, 10000.0)
    rope = rope_of(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6})
    assert (rope["scaling"], rope["factor"], rope["theta"]) == ("dynamic_ntk", 4.0, 1e6)
    assert rope["original_max_position"] == 128


def test_yarn_rope():
    rope = rope_of(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                    "original_max_position_embeddings": 32, "beta_fast": 16})
    assert rope["scaling"] == "yarn" and rope["factor"] == 4.0
    assert (rope["original_max_position"], rope["beta_fast"], rope["beta_slow"]) == (32, 16.0, 1.0)
    assert rope["attention_factor"] == pytest.approx(0.1 * np.log(4.0) + 1)
    rope = rope_of(rope_scaling={"type": "yarn", "factor": 4.0, "attention_factor": 1.5})
    assert rope["attention_factor"] == 1.5 and rope["original_max_position"] == 128
    rope = rope_of(rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 0.707,
                                 "mscale_all_dim": 0.707})
    assert rope["attention_factor"] == pytest.approx(1.0)


def test_default_rope_types_and_partial_rotary():
    assert rope_of(rope_scaling=None)["scaling"] == "none"
    assert rope_of(rope_parameters={"rope_type": "default", "rope_theta": 5.0})["theta"] == 5.0
    assert rope_of(partial_rotary_factor=0.5)["rotary_dim"] == 8


@pytest.mark.parametrize("rope_type", ["longrope", "mrope", "su"])
def test_unknown_rope_type_is_named(rope_type):
    with pytest.raises(ValueError, match=f"rope type '{rope_type}'"):
        rope_of(rope_scaling={"rope_type": rope_type, "factor": 2.0})


# --- sliding windows -----------------------------------------------------------------------------


def windows(config_class, **kwargs):
    config = config_class(**dict(TINY, num_hidden_layers=4), **kwargs)
    cfg = config_dict(config)
    return get_model_family(cfg).spec_from_config(cfg)["sliding_window"]


@pytest.mark.parametrize("config_class", [Qwen2Config, Qwen3Config])
def test_qwen_sliding_window_follows_transformers(config_class):
    assert windows(config_class) == [0, 0, 0, 0]
    assert windows(config_class, use_sliding_window=True, sliding_window=8,
                   max_window_layers=2) == [0, 0, 8, 8]
    assert windows(config_class, use_sliding_window=False, sliding_window=8,
                   max_window_layers=2) == [0, 0, 0, 0]
    # without layer_types (older configs): the same rule from max_window_layers
    cfg = {"architectures": [config_class.__name__.replace("Config", "ForCausalLM")],
           **dict(TINY, num_hidden_layers=4), "use_sliding_window": True, "sliding_window": 8,
           "max_window_layers": 1}
    assert get_model_family(cfg).spec_from_config(cfg)["sliding_window"] == [0, 8, 8, 8]
    # layer_types take precedence
    cfg["layer_types"] = ["sliding_attention", "full_attention"] * 2
    assert get_model_family(cfg).spec_from_config(cfg)["sliding_window"] == [8, 0, 8, 0]


def test_mistral_sliding_window_on_every_layer():
    assert windows(MistralConfig, sliding_window=16) == [16] * 4
    assert windows(MistralConfig, sliding_window=None) == [0] * 4


# --- load_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case, dtype, shard", [
    ("qwen3_bias", torch.bfloat16, False),
    ("llama", torch.float16, True),
    ("mistral", torch.float32, False),
])
def test_load_model_from_saved_checkpoint(tmp_path, case, dtype, shard):
    config, model = build(case, dtype)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "5GB")
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    spec, weights, model_dtype, saved_config = load_model(str(tmp_path))
    expected_dtype = str(dtype).removeprefix("torch.")
    assert model_dtype == expected_dtype
    cfg = config_dict(config)
    assert saved_config["architectures"] == cfg["architectures"]
    assert spec == get_model_family(cfg).spec_from_config(cfg)
    state = numpy_state(model)
    expected = dict(models.canonical_weights(get_model_family(cfg), state.__getitem__, state.keys(), spec))
    loaded = list(weights())
    assert [name for name, _, _ in loaded] == list(expected)
    for name, array, tensor_dtype in loaded:
        assert tensor_dtype == expected_dtype
        assert array.dtype == expected[name].dtype
        np.testing.assert_array_equal(array, expected[name])
    assert len(list(weights())) == len(loaded)  # the factory starts over


def save_checkpoint(path, config, tensors):
    from safetensors.torch import save_file

    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def test_load_model_reports_mixed_dtypes(tmp_path):
    config, model = build("llama_tied")
    cfg = config_dict(config)
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.bfloat16)
    save_checkpoint(tmp_path / "ok", cfg, tensors)
    spec, weights, dtype, _ = load_model(str(tmp_path / "ok"))
    assert dtype == "float32"  # from the embedding when the config names none
    dtypes = {name: d for name, _, d in weights()}
    assert dtypes["final_norm.weight"] == "bfloat16" and dtypes["layers.0.qkv.weight"] == "float32"

    tensors["model.layers.0.self_attn.k_proj.weight"] = (
        tensors["model.layers.0.self_attn.k_proj.weight"].to(torch.float16))
    save_checkpoint(tmp_path / "mixed", cfg, tensors)
    _, weights, _, _ = load_model(str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="'layers.0.qkv.weight' fuses tensors of different dtypes"):
        list(weights())

    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 96, dtype=torch.int8)
    save_checkpoint(tmp_path / "int8", cfg, tensors)
    _, weights, _, _ = load_model(str(tmp_path / "int8"))
    with pytest.raises(ValueError, match="k_proj.weight' has dtype (int8|I8)"):
        list(weights())


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture MambaForCausalLM"):
        load_model(str(tmp_path))
    cfg = {"architectures": ["LlamaForCausalLM"], **TINY}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no \.?safetensors"):
        load_model(str(tmp_path))
    save_checkpoint(tmp_path, cfg, {"model.embed_tokens.weight": torch.zeros(300, 96)})
    with pytest.raises(ValueError, match="lacks 'model.layers.0.input_layernorm.weight'"):
        load_model(str(tmp_path))


def test_numpy_safetensors_reader_matches_safetensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int32).reshape(2, 3), "d": torch.zeros(0, 4),
               "e": torch.randn(2, 2).half()}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    f = _safetensors_reader.SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert sorted(f.keys()) == list("abcde")
    assert [f.dtype(k) for k in "abcde"] == ["float32", "bfloat16", "int32", "float32", "float16"]
    assert f.shape("c") == [2, 3] and f.shape("d") == [0, 4]
    for k, t in tensors.items():
        expected = t.view(torch.int16).numpy().view(np.uint16) if k == "b" else t.numpy()
        np.testing.assert_array_equal(f.tensor(k), expected)
    assert not f.tensor("a").flags.writeable
    found = _safetensors_reader.find_safetensors_files(str(tmp_path))
    assert found == [str(tmp_path / "x.safetensors")]
