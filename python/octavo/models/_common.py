"""What the architecture families share: reading config.json fields into ModelSpec fields, and
turning a weight plan (canonical name <- HF tensors) into canonical tensors.

The spec is a plain dict with the field names of cpp/include/octavo/model_spec.h; enums are the
snake_case strings of their names ("rms_norm", "silu_glu", "rotary", "neox", "llama3", ...).

Weights are moved, never computed on: fusing q|k|v or gate|up is a concatenation of rows, so the
same code serves float32, float16 and bfloat16 (which numpy holds as uint16 bit patterns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

# HF hidden_act -> ModelSpec activation, for models whose MLP is gated (gate_proj, up_proj).
GLU_ACTIVATIONS = {
    "silu": "silu_glu",
    "swish": "silu_glu",
    "gelu": "gelu_glu",
    "gelu_pytorch_tanh": "gelu_tanh_glu",
    "gelu_new": "gelu_tanh_glu",
    "gelu_fast": "gelu_tanh_glu",
}

# The ModelSpec defaults (model_spec.h RopeConfig) for fields a scaling type does not use.
ROPE_DEFAULTS = {
    "pairing": "neox",
    "theta": 10000.0,
    "rotary_dim": 0,
    "scaling": "none",
    "factor": 1.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position": 0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 0.0,
}

# HF rope_type -> ModelSpec scaling.
_ROPE_SCALINGS = {
    "default": "none",
    "linear": "linear",
    "dynamic": "dynamic_ntk",
    "llama3": "llama3",
    "yarn": "yarn",
}


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else str(config.get("model_type", "?"))


def pick_architecture(config: dict, supported: tuple[str, ...]) -> str:
    """The first of config["architectures"] that the family supports, else its main one (for
    configs saved without architectures)."""
    for arch in config.get("architectures") or []:
        if arch in supported:
            return arch
    return supported[0]


def require(config: dict, key: str):
    if config.get(key) is None:
        raise ValueError(f"config.json of {architecture_of(config)} lacks {key!r}")
    return config[key]


def head_dim_of(config: dict) -> int:
    """config.head_dim when given (Qwen3, Mistral Nemo: may differ from hidden / heads), else
    hidden_size / num_attention_heads."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden, heads = require(config, "hidden_size"), require(config, "num_attention_heads")
    if hidden % heads:
        raise ValueError(
            f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and "
            f"config.json gives no head_dim")
    return hidden // heads


def glu_activation(config: dict) -> str:
    act = config.get("hidden_act", "silu")
    if act not in GLU_ACTIVATIONS:
        raise ValueError(
            f"hidden_act {act!r} is not supported for {architecture_of(config)}; supported: "
            f"{', '.join(sorted(GLU_ACTIVATIONS))}")
    return GLU_ACTIVATIONS[act]


def rope_from_config(config: dict, head_dim: int) -> dict:
    """The ModelSpec rope dict from `rope_parameters` (transformers >= 5 writes this, with
    rope_theta inside) or `rope_scaling` + `rope_theta` (older configs), following transformers'
    modeling_rope_utils for defaults."""
    params = config.get("rope_parameters")
    if params is None:
        params = config.get("rope_scaling")
    params = dict(params or {})
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        raise ValueError(
            f"per-layer-type rope parameters ({', '.join(params)}) are not supported for "
            f"{architecture_of(config)}")

    rope = dict(ROPE_DEFAULTS)
    theta = params.get("rope_theta", config.get("rope_theta"))
    rope["theta"] = float(theta if theta is not None else ROPE_DEFAULTS["theta"])
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        rope["rotary_dim"] = int(head_dim * float(partial))

    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in _ROPE_SCALINGS:
        raise ValueError(
            f"rope type {rope_type!r} of {architecture_of(config)} is not supported; supported: "
            f"{', '.join(_ROPE_SCALINGS)}")
    scaling = _ROPE_SCALINGS[rope_type]
    rope["scaling"] = scaling
    if scaling == "none":
        return rope

    max_pos = int(require(config, "max_position_embeddings"))
    # transformers prefers a top-level original_max_position_embeddings (Phi-3 stores it there).
    original = config.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None and scaling == "yarn":
        factor = max_pos / original  # DeepSeek-V3 style: implied by the two lengths
    if factor is None:
        raise ValueError(f"rope type {rope_type!r} of {architecture_of(config)} lacks 'factor'")
    rope["factor"] = float(factor)

    if scaling == "dynamic_ntk":
        # transformers grows the base from max_position_embeddings, whatever else is stored.
        rope["original_max_position"] = max_pos
    elif scaling == "llama3":
        rope["original_max_position"] = int(original)
        rope["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        rope["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
    elif scaling == "yarn":
        if params.get("truncate", True) is False:
            raise ValueError(
                f"rope type 'yarn' with truncate=false ({architecture_of(config)}) is not "
                f"supported")
        rope["original_max_position"] = int(original)
        rope["beta_fast"] = float(params.get("beta_fast") or 32.0)
        rope["beta_slow"] = float(params.get("beta_slow") or 1.0)
        rope["attention_factor"] = _yarn_attention_factor(params, rope["factor"])
    return rope


def _yarn_attention_factor(params: dict, factor: float) -> float:
    """The cos/sin scale, stated explicitly (as transformers computes it) so the engine needs no
    default: attention_factor if given, else from mscale / mscale_all_dim, else 0.1 ln(f) + 1."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(factor, m) / mscale(factor, m_all))
    return float(mscale(factor))


def windows_from_layer_types(config: dict, num_layers: int, window: int | None) -> list[int] | None:
    """Per-layer windows from `layer_types` ("sliding_attention" / "full_attention"), or None when
    the config has no layer_types."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        return None
    if len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types has {len(layer_types)} entries; num_hidden_layers is {num_layers}")
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types {unknown} of {architecture_of(config)} are not supported")
    return [int(window or 0) if t == "sliding_attention" else 0 for t in layer_types]


# ModelSpec fields every family must state; the rest default as in model_spec.h.
_REQUIRED = ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads",
             "num_kv_heads", "head_dim", "intermediate_size", "max_position_embeddings")
_DEFAULTS = {
    "norm": "layer_norm",
    "norm_eps": 1e-5,
    "norm_bias": True,
    "activation": "gelu",
    "positions": "rotary",
    "rope": None,
    "position_offset": 0,
    "residual": "sequential",
    "qkv_bias": False,
    "o_bias": False,
    "mlp_bias": False,
    "qk_norm": False,
    "tied_embeddings": False,
    "lm_head_bias": False,
    "embedding_norm": False,
    "sandwich_norms": False,
    "num_kv_heads_per_layer": [],
    "embedding_scale": 1.0,
    "attention_scale": 0.0,
    "attn_logit_softcap": 0.0,
    "final_logit_softcap": 0.0,
    "alibi_slope_scale": 1.0,
    "sliding_window": None,
}


def make_spec(**fields) -> dict:
    """A complete ModelSpec dict: the required fields, plus any others, the rest at their
    model_spec.h defaults. `rope` defaults to no rotary (the dict is still complete)."""
    missing = [f for f in _REQUIRED if fields.get(f) is None]
    assert not missing, f"make_spec lacks {missing}"
    unknown = set(fields) - set(_REQUIRED) - set(_DEFAULTS)
    assert not unknown, f"not ModelSpec fields: {unknown}"
    spec = {**_DEFAULTS, **fields}
    if spec["rope"] is None:
        spec["rope"] = dict(ROPE_DEFAULTS)
    if spec["sliding_window"] is None:
        spec["sliding_window"] = [0] * spec["num_layers"]
    spec["num_kv_heads_per_layer"] = list(spec["num_kv_heads_per_layer"])
    heads, kv_heads = spec["num_heads"], spec["num_kv_heads"]
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(
            f"{spec['architecture']}: {heads} attention heads are not a multiple of {kv_heads} "
            f"key/value heads")
    return spec


def decoder_spec(config: dict, **overrides) -> dict:
    """The spec of a Llama-style decoder (RMSNorm, rotary, gated MLP, sequential residual), read
    from the config fields that Llama, Mistral and Qwen share; `overrides` set the rest."""
    num_heads = int(require(config, "num_attention_heads"))
    head_dim = head_dim_of(config)
    fields = {  # the rest (rotary positions, no biases, sequential residual, ...) make_spec's
        "architecture": architecture_of(config),
        "vocab_size": int(require(config, "vocab_size")),
        "hidden_size": int(require(config, "hidden_size")),
        "num_layers": int(require(config, "num_hidden_layers")),
        "num_heads": num_heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or num_heads),
        "head_dim": head_dim,
        "intermediate_size": int(require(config, "intermediate_size")),
        "max_position_embeddings": int(require(config, "max_position_embeddings")),
        "norm": "rms_norm",
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "norm_bias": False,
        "activation": glu_activation(config),
        "rope": rope_from_config(config, head_dim),
        # Llama, Mistral and Qwen configs default to untied (PretrainedConfig's default is tied,
        # so an absent key must not fall through to it).
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    return make_spec(**{**fields, **overrides})


# --- weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSource:
    """One canonical tensor: the HF tensors whose rows, concatenated in order, make it, each with
    the shape the config implies for it (checked before anything is concatenated)."""

    name: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    # Applied to the concatenated parts, for layouts that are not canonical rows (GPT-2's Conv1D
    # weights are [in, out]; GPT-NeoX and BLOOM interleave q, k, v per head). It moves elements
    # (transpose, reorder rows), so it serves every dtype, bfloat16 bits included; one that
    # computes (Baichuan 2 normalises LM-head rows) must return the dtype it got (bf16 as bits).
    transform: Callable[[np.ndarray], np.ndarray] | None = None


class WeightPlan:
    """Collects WeightSources, checking that every HF tensor exists in the checkpoint."""

    def __init__(self, names: Iterable[str]):
        self.names = set(names)
        self.sources: list[WeightSource] = []

    def add(self, canonical: str, *parts: tuple[str, tuple[int, ...]],
            transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        for hf_name, _ in parts:
            if hf_name not in self.names:
                raise ValueError(
                    f"checkpoint lacks {hf_name!r}, needed for {canonical!r} "
                    f"({len(self.names)} tensors in the checkpoint)")
        self.sources.append(
            WeightSource(canonical, tuple((n, tuple(s)) for n, s in parts), transform))


def add_separate_qkv(plan: WeightPlan, ours: str, attn: str, q_rows: int, kv_rows: int,
                     hidden: int, bias: bool) -> None:
    """Separate q_proj, k_proj and v_proj under `attn` (and their biases when `bias`) as one
    canonical `ours`qkv, rows q | k | v."""
    plan.add(ours + "qkv.weight", (attn + "q_proj.weight", (q_rows, hidden)),
             (attn + "k_proj.weight", (kv_rows, hidden)),
             (attn + "v_proj.weight", (kv_rows, hidden)))
    if bias:
        plan.add(ours + "qkv.bias", (attn + "q_proj.bias", (q_rows,)),
                 (attn + "k_proj.bias", (kv_rows,)), (attn + "v_proj.bias", (kv_rows,)))

def gather(source: WeightSource, get_tensor: Callable[[str], np.ndarray]) -> np.ndarray:
    """The canonical tensor of `source`: its parts checked, concatenated along rows and passed
    through its transform."""
    fused = _concatenate(source, get_tensor)
    return fused if source.transform is None else source.transform(fused)


def _concatenate(source: WeightSource, get_tensor: Callable[[str], np.ndarray]) -> np.ndarray:
    arrays = []
    for hf_name, expected in source.parts:
        array = get_tensor(hf_name)
        if tuple(array.shape) != expected:
            raise ValueError(
                f"{hf_name!r} has shape {list(array.shape)}; the config implies {list(expected)} "
                f"for {source.name!r}")
        arrays.append(array)
    if len(arrays) == 1:
        return arrays[0]
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise ValueError(
            f"{source.name!r} fuses tensors of different dtypes: "
            + ", ".join(f"{n} {a.dtype}" for (n, _), a in zip(source.parts, arrays)))
    return np.concatenate(arrays, axis=0)


def add_norm(plan: WeightPlan, spec: dict, ours: str, hf: str) -> None:
    """A norm's weight (and bias when the spec's norms carry one); nothing for a norm without
    parameters."""
    if spec["norm"] == "layer_norm_no_weight":
        return
    hidden = spec["hidden_size"]
    plan.add(ours + ".weight", (hf + ".weight", (hidden,)))
    if spec["norm_bias"]:
        plan.add(ours + ".bias", (hf + ".bias", (hidden,)))


def run_plan(plan: WeightPlan, get_tensor: Callable[[str], np.ndarray]
             ) -> Iterator[tuple[str, np.ndarray]]:
    for source in plan.sources:
        yield source.name, gather(source, get_tensor)
