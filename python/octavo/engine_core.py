"""Builds the C++ engine from a Hugging Face checkpoint directory and engine arguments.

Shared by `LLM` and the server: read config.json, map it to a ModelSpec, map the checkpoint's
tensors to canonical weights, size the engine, and hand everything to `octavo._C.Engine`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from octavo import _C
from octavo.models import load_model, normalize_dtype

logger = logging.getLogger("octavo")


@dataclass
class EngineArgs:
    """Engine arguments, named as vLLM names them.

    model: path to a Hugging Face checkpoint directory (config.json, safetensors, tokenizer).
    dtype: "auto" (the checkpoint's), "float32", "float16" or "bfloat16"; storage of weights and KV.
    max_model_len: longest prompt + output, in tokens; None: the model's max_position_embeddings.
    max_num_seqs: requests running at once; None: 1024 on a GPU of at least 70 GiB, else 256.
    max_num_batched_tokens: tokens per step; None: 16384 on a GPU of at least 70 GiB, else
        min(8192, max_model_len); at least max_num_seqs.
    block_size: tokens per KV block (power of two, default 16).
    enable_prefix_caching: reuse cached KV of shared prompt prefixes (default True).
    num_gpu_blocks_override: fix the KV pool size in blocks instead of sizing it from memory.
    kv_cache_memory_bytes: on the CPU, bytes given to the KV pool (default 4 GiB).
    gpu_memory_utilization: on a GPU, the share of its memory octavo may use (default 0.9); the
        KV pool gets what weights and step buffers leave of it.
    seed: seeds requests that bring no seed of their own.
    device: "cpu", "cuda" or "cuda:N".
    enforce_eager: never replay CUDA graphs (by default decode steps replay a graph captured per
        padded batch size the first time one runs).
    async_scheduling: schedule and launch each step while the one before it runs, its decode
        rows reading their input tokens on the device; False waits for every step's tokens
        first. None (default): on for GPUs, off on the CPU (whose ops finish on return, so it
        would only deliver tokens a step later).
    """

    model: str
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    device: str = "cpu"
    enforce_eager: bool = False
    async_scheduling: Optional[bool] = None
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)


_ENUM_FIELDS = {
    "norm": "NormKind",
    "activation": "Activation",
    "positions": "PositionKind",
    "residual": "ResidualKind",
}
_ROPE_ENUM_FIELDS = {"pairing": "RotaryPairing", "scaling": "RopeScaling"}


def _enum(enum_name: str, value: str):
    enum = getattr(_C, enum_name)
    try:
        return getattr(enum, value)
    except AttributeError:
        raise ValueError(f"unknown {enum_name} {value!r}") from None


def to_cpp_spec(spec: dict) -> "_C.ModelSpec":
    """A ModelSpec dict (models/*.py) as the C++ struct."""
    cpp = _C.ModelSpec()
    for key, value in spec.items():
        if key == "rope":
            rope = _C.RopeConfig()
            for rope_key, rope_value in (value or {}).items():
                if rope_value is None:
                    continue
                if rope_key in _ROPE_ENUM_FIELDS:
                    rope_value = _enum(_ROPE_ENUM_FIELDS[rope_key], rope_value)
                setattr(rope, rope_key, rope_value)
            cpp.rope = rope
        elif key in _ENUM_FIELDS:
            setattr(cpp, key, _enum(_ENUM_FIELDS[key], value))
        elif value is not None:
            setattr(cpp, key, value)
    cpp.validate()
    return cpp


def read_eos_token_ids(model_dir: str, config: dict, tokenizer=None) -> list:
    """EOS ids: generation_config.json's, else config.json's, else the tokenizer's."""
    candidates = []
    generation_config = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(generation_config):
        with open(generation_config) as f:
            candidates.append(json.load(f).get("eos_token_id"))
    candidates.append(config.get("eos_token_id"))
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    for value in candidates:
        if value is None:
            continue
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return []


def default_device() -> str:
    """"cuda" when a GPU is visible to this build, else "cpu" (the device of device="auto")."""
    from octavo import _C

    return "cuda" if _C.cuda_device_count() > 0 else "cpu"


def create_engine(args: EngineArgs, tokenizer=None, asynchronous: bool = False):
    """Returns (engine, spec dict, config dict): a `_C.Engine` (driven by step()), or with
    `asynchronous` a `_C.AsyncEngine` (its own loop thread). Raises ValueError for a bad
    checkpoint or argument."""
    model_dir = args.model
    if not os.path.isdir(model_dir):
        raise ValueError(
            f"model {model_dir!r} is not a directory; give a local Hugging Face checkpoint "
            "directory (config.json, *.safetensors)")
    dtype = "auto" if args.dtype == "auto" else normalize_dtype(args.dtype)
    if dtype is None:
        raise ValueError(f"dtype {args.dtype!r} is not one of auto, float32, float16, bfloat16 "
                         f"(or float, half, bf16)")
    spec, weights, checkpoint_dtype, config = load_model(model_dir)
    cpp_spec = to_cpp_spec(spec)

    engine_config = _C.EngineConfig()
    engine_config.device = args.device
    engine_config.dtype = checkpoint_dtype if dtype == "auto" else dtype
    if dtype == "auto" and args.device.startswith("cuda") and checkpoint_dtype == "float32":
        # GPUs compute in 16 bits: like vLLM, an fp32 checkpoint runs in bf16 unless told otherwise.
        logger.info("octavo: float32 checkpoint on %s: running in bfloat16", args.device)
        engine_config.dtype = "bfloat16"
    if args.max_model_len is not None:
        engine_config.max_model_len = int(args.max_model_len)
    if args.max_num_seqs is not None:
        if int(args.max_num_seqs) < 1:
            raise ValueError(f"max_num_seqs is {args.max_num_seqs}; it must be at least 1")
        engine_config.max_num_seqs = int(args.max_num_seqs)
    if args.max_num_batched_tokens is not None:
        engine_config.max_num_batched_tokens = int(args.max_num_batched_tokens)
    engine_config.block_size = int(args.block_size)
    engine_config.enable_prefix_caching = bool(args.enable_prefix_caching)
    if args.num_gpu_blocks_override is not None:
        engine_config.num_kv_blocks = int(args.num_gpu_blocks_override)
    if args.kv_cache_memory_bytes is not None:
        engine_config.cpu_kv_cache_bytes = int(args.kv_cache_memory_bytes)
    engine_config.gpu_memory_utilization = float(args.gpu_memory_utilization)
    engine_config.seed = int(args.seed) & 0xFFFFFFFFFFFFFFFF
    engine_config.enforce_eager = bool(args.enforce_eager)
    if args.async_scheduling is not None:
        engine_config.async_scheduling = bool(args.async_scheduling)
    engine_config.eos_token_ids = read_eos_token_ids(model_dir, config, tokenizer)

    weight_tuples = [(name, dtype, np.ascontiguousarray(array)) for name, array, dtype in weights()]
    engine_class = _C.AsyncEngine if asynchronous else _C.Engine
    engine = engine_class(cpp_spec, engine_config, weight_tuples)
    del weight_tuples
    resolved = engine.config
    logger.info(
        "octavo: %s on %s, %s; KV pool %d blocks x %d tokens = %d tokens; max_model_len %d",
        spec.get("architecture"), resolved.device, resolved.dtype, resolved.num_kv_blocks,
        resolved.block_size, resolved.num_kv_blocks * resolved.block_size, resolved.max_model_len)
    return engine, spec, config


def to_cpp_sampling_params(params) -> "_C.SamplingParams":
    """octavo.SamplingParams (validated) as the C++ struct."""
    cpp = _C.SamplingParams()
    cpp.n = int(params.best_of or params.n)  # best_of candidates are forked like n
    cpp.temperature = float(params.temperature)
    cpp.top_p = float(params.top_p)
    cpp.top_k = int(params.top_k) if params.top_k and params.top_k > 0 else 0
    cpp.min_p = float(params.min_p)
    cpp.seed = None if params.seed is None else int(params.seed) & 0xFFFFFFFFFFFFFFFF
    cpp.max_tokens = params.max_tokens
    cpp.min_tokens = int(params.min_tokens)
    cpp.stop_token_ids = list(params.stop_token_ids or [])
    cpp.ignore_eos = bool(params.ignore_eos)
    cpp.want_logprobs = params.logprobs is not None
    cpp.logprobs = int(params.logprobs or 0)
    cpp.logit_bias = sorted((int(t), float(b)) for t, b in (params.logit_bias or {}).items())
    cpp.presence_penalty = float(params.presence_penalty)
    cpp.frequency_penalty = float(params.frequency_penalty)
    cpp.repetition_penalty = float(params.repetition_penalty)
    cpp.prompt_logprobs = params.prompt_logprobs
    return cpp


def engine_args_from_kwargs(model: str, kwargs: dict[str, Any]) -> EngineArgs:
    known = set(EngineArgs.__dataclass_fields__) - {"model", "extra"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}")
    return EngineArgs(model=model, **kwargs)
