"""Baichuan and Baichuan 2 (BaiChuanForCausalLM, BaichuanForCausalLM; the code ships with the
checkpoint): Llama's tensors with q|k|v fused in self_attn.W_pack ([3 * hidden, hidden], already
q rows, k rows, v rows), no biases, and

- positions: the 7B models rotate (RoPE, base 10000, up to max_position_embeddings); the 13B
  models use ALiBi (up to model_max_length) with the standard slopes. Their published configs tell
  them apart by key: the 7B configs (Baichuan-7B, Baichuan2-7B) carry max_position_embeddings,
  the 13B ones (Baichuan-13B, Baichuan2-13B) only model_max_length. BaiChuanForCausalLM is always
  the 7B.
- Baichuan 2's NormHead: its forward divides each LM-head row by its L2 norm; rows are
  normalised here, once, at load. Baichuan 2 is told from Baichuan 1 by its vocabulary: 125,696
  tokens in every Baichuan 2 model, 64,000 in Baichuan 1 (the rule vLLM uses too).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from octavo.models._common import (
    WeightPlan, decoder_spec, pick_architecture, require)
from octavo.models._llama_layout import llama_layout_plan

ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")
MODEL_TYPES = ("baichuan",)

_BAICHUAN2_VOCAB = 125696


def uses_alibi(config: dict) -> bool:
    if "BaiChuanForCausalLM" in (config.get("architectures") or []):
        return False
    return config.get("max_position_embeddings") is None


def spec_from_config(config: dict) -> dict:
    """ModelSpec fields of a Baichuan config."""
    heads = int(require(config, "num_attention_heads"))
    overrides = {}
    if uses_alibi(config):
        config = {**config, "max_position_embeddings": require(config, "model_max_length")}
        overrides["positions"] = "alibi"
    # Multi-head attention throughout; the configs' own num_key_value_heads (if any) is not used.
    config = {**config, "num_key_value_heads": heads, "rope_theta": 10000.0,
              "rope_scaling": None, "rope_parameters": None}
    return decoder_spec(config, architecture=pick_architecture(config, ARCHITECTURES),
                        **overrides)


def normalize_rows(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (torch.nn.functional.normalize: eps 1e-12), computed in
    fp32 and returned in the input's dtype (float32, float16, or bfloat16 as uint16 bits)."""
    if rows.dtype == np.uint16:  # bfloat16 bits: the top half of a float32
        values = (rows.astype(np.uint32) << 16).view(np.float32)
    else:
        values = rows.astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float64))
    normalized = (values / np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
    if rows.dtype != np.uint16:
        return normalized.astype(rows.dtype)
    bits = normalized.view(np.uint32)
    # Round to nearest even, as torch's float -> bfloat16 conversion does (no NaNs here).
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def weight_plan(names: Iterable[str], spec: dict) -> WeightPlan:
    """Where each canonical tensor of a Baichuan checkpoint comes from (lm_head.weight row
    normalised for Baichuan 2)."""
    normhead = spec["vocab_size"] == _BAICHUAN2_VOCAB
    return llama_layout_plan(names, spec, fused_qkv="W_pack",
                             lm_head_transform=normalize_rows if normhead else None)
