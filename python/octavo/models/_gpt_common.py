"""What the GPT-lineage families share (GPT-2, GPT BigCode, OPT, GPT-J, GPT-NeoX, Falcon, MPT,
BLOOM, Phi, Phi-3, StableLM, Starcoder2, OLMo, Jais): their non-gated activations, the tensor-name prefix a checkpoint was saved with, and the
transforms that turn fused or transposed layouts into canonical rows.

Every transform only moves elements (transpose, reorder rows), so it serves float32, float16 and
bfloat16 (uint16 bits) alike; `scale_values` is the one exception, for folding a constant into a
small tensor, and it rounds bfloat16 as the hardware does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from octavo.models._common import (
    ROPE_DEFAULTS, WeightPlan, add_norm, architecture_of, rope_from_config)

# HF activation names of non-gated MLPs -> ModelSpec activation. gelu_new, gelu_fast and
# gelu_pytorch_tanh are the same tanh approximation written three ways.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}

def unsupported(config: dict, what: str) -> ValueError:
    """The error for a config option octavo cannot run, naming the architecture."""
    return ValueError(f"{architecture_of(config)}: {what} is not supported")


def config_int(config: dict, *keys: str) -> int:
    """The first of `keys` that config.json sets (families and their releases spell the same size
    differently: n_embd, n_embed, hidden_size, d_model); ValueError naming every spelling."""
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise ValueError(f"config.json of {architecture_of(config)} lacks "
                     + " or ".join(repr(k) for k in keys))


def activation(config: dict, key: str, default: str) -> str:
    """The ModelSpec activation of a non-gated MLP from config[key]."""
    name = config.get(key) or default
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{architecture_of(config)}: activation {name!r} ({key}) is not supported; "
            f"supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def head_dim(hidden: int, heads: int, config: dict) -> int:
    """hidden / heads, which every family here takes as the head size."""
    if hidden % heads:
        raise ValueError(
            f"{architecture_of(config)}: hidden size {hidden} is not a multiple of "
            f"{heads} attention heads")
    return hidden // heads


def rope(config: dict, head_size: int, *, theta: float | None = None,
         partial_rotary_factor: float | None = None) -> dict:
    """The rope dict from the config's rope_parameters / rope_scaling, with the family's own
    keys for theta and the rotating fraction filled in where transformers' rope_parameters
    lacks them (a key inside rope_parameters wins, as in transformers)."""
    adjusted = dict(config)
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if theta is not None and "rope_theta" not in params and config.get("rope_theta") is None:
        adjusted["rope_theta"] = theta
    if (partial_rotary_factor is not None and "partial_rotary_factor" not in params
            and config.get("partial_rotary_factor") is None):
        adjusted["partial_rotary_factor"] = partial_rotary_factor
    out = rope_from_config(adjusted, head_size)
    if out["rotary_dim"] % 2 or out["rotary_dim"] > head_size:
        raise ValueError(
            f"{architecture_of(config)}: {out['rotary_dim']} rotary dimensions of a "
            f"{head_size}-wide head (the count must be even and at most the head size)")
    return out


def plain_rope(head_size: int, rotary_dim: int, *, theta: float = 10000.0,
               pairing: str = "neox") -> dict:
    """An unscaled rope dict for families whose config states its rotary fields directly."""
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(
            f"{rotary_dim} rotary dimensions of a {head_size}-wide head (the count must be "
            f"even, positive and at most the head size)")
    return {**ROPE_DEFAULTS, "theta": float(theta), "rotary_dim": int(rotary_dim),
            "pairing": pairing}


# --- tensor names -------------------------------------------------------------------------------


def find_prefix(names: Iterable[str], anchor: str, prefixes: tuple[str, ...],
                family: str) -> str:
    """The prefix (one of `prefixes`) under which the checkpoint stores `anchor`: checkpoints
    saved from the bare model (GPT2Model, BloomModel, OPTModel) lack the LM wrapper's
    "transformer." or "model." in front of every name."""
    names = set(names)
    for prefix in prefixes:
        if prefix + anchor in names:
            return prefix
    tried = ", ".join(repr(p + anchor) for p in prefixes)
    raise ValueError(
        f"checkpoint has none of {tried} ({len(names)} tensors in the checkpoint); is it a "
        f"{family} checkpoint?")


def conv1d(array: np.ndarray) -> np.ndarray:
    """GPT-2's Conv1D stores [in, out]; a Linear weight is [out, in]."""
    return array.T


def per_head_qkv(num_heads: int, head_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Rows grouped per head as [head][q, k, v][head_size] (GPT-NeoX, BLOOM, MHA BigCode) -> all
    q rows, then k, then v: grouped_qkv with one query head per KV head."""
    return grouped_qkv(num_heads, 1, head_size)


def grouped_qkv(num_kv_heads: int, group: int, head_size: int
                ) -> Callable[[np.ndarray], np.ndarray]:
    """Falcon's new decoder layout, rows as [kv head][its `group` query heads, k, v][head_size]
    -> q rows (kv-major, so query head h reads kv head h // group), then k, then v."""
    def transform(array: np.ndarray) -> np.ndarray:
        grouped = array.reshape(num_kv_heads, group + 2, head_size, -1)
        q = grouped[:, :group].reshape(num_kv_heads * group * head_size, -1)
        k = grouped[:, group].reshape(num_kv_heads * head_size, -1)
        v = grouped[:, group + 1].reshape(num_kv_heads * head_size, -1)
        return np.concatenate([q, k, v]).reshape((-1,) + array.shape[1:])

    return transform


def scale_values(array: np.ndarray, factor: float) -> np.ndarray:
    """array * factor in the array's own storage: float32 and float16 directly; bfloat16 bits
    (uint16) widened to float32, scaled, rounded to nearest even back to bfloat16."""
    if array.dtype == np.uint16:
        wide = (array.astype(np.uint32) << 16).view(np.float32) * np.float32(factor)
        bits = wide.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
        return (rounded >> 16).astype(np.uint16)
    return (array.astype(np.float32) * np.float32(factor)).astype(array.dtype)


def add_linear(plan: WeightPlan, ours: str, hf: str, rows: int, cols: int, bias: bool,
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """A Linear layer (weight [rows, cols]) and its bias when `bias`; `transform` applies to
    both (a row reorder)."""
    plan.add(ours + ".weight", (hf + ".weight", (rows, cols)), transform=transform)
    if bias:
        plan.add(ours + ".bias", (hf + ".bias", (rows,)), transform=transform)


def add_conv1d(plan: WeightPlan, ours: str, hf: str, rows: int, cols: int, bias: bool) -> None:
    """A GPT-2 Conv1D layer (weight stored [cols, rows]) as a canonical Linear [rows, cols]."""
    plan.add(ours + ".weight", (hf + ".weight", (cols, rows)), transform=conv1d)
    if bias:
        plan.add(ours + ".bias", (hf + ".bias", (rows,)))


def add_head(plan: WeightPlan, spec: dict, final_norm: str | None, lm_head: str = "lm_head"
             ) -> None:
    """The final norm and, unless tied to the embedding, the LM head, with its bias when the spec
    has one."""
    vocab, hidden = spec["vocab_size"], spec["hidden_size"]
    if final_norm is not None:
        add_norm(plan, spec, "final_norm", final_norm)
    if not spec["tied_embeddings"]:
        # A tied checkpoint may still store lm_head.weight (a copy of the embedding): unused.
        plan.add("lm_head.weight", (lm_head + ".weight", (vocab, hidden)))
    if spec["lm_head_bias"]:
        plan.add("lm_head.bias", (lm_head + ".bias", (vocab,)))
