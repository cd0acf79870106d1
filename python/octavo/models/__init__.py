"""Hugging Face architectures as ModelSpecs: one module per family, each with

    spec_from_config(config: dict) -> dict
        ModelSpec fields (cpp/include/octavo/model_spec.h) as a plain dict; enums as snake_case
        strings ("rms_norm", "silu_glu", "rotary", ...), `rope` as a dict of RopeConfig fields,
        `sliding_window` as one window per layer (0 = full attention).
    weight_plan(names, spec) -> WeightPlan
        where each canonical tensor comes from; ValueError naming a missing HF tensor. A family
        that sets WEIGHTS_USE_CONFIG = True takes weight_plan(names, spec, config) instead.

and the constants ARCHITECTURES (the HF architecture names it reads) and MODEL_TYPES
(config.json model_type values that mean it, for configs saved without "architectures").
Adding an architecture is a module here: every public module of this package is a family.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import pkgutil
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np

from octavo.models import _torch_bin_reader
from octavo.models._common import WeightPlan, gather, run_plan


def _families() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]


ARCHITECTURES: dict[str, ModuleType] = {
    arch: family for family in _families() for arch in family.ARCHITECTURES
}

# For configs saved without "architectures" (a bare XConfig().save_pretrained).
_MODEL_TYPES: dict[str, str] = {
    model_type: family.ARCHITECTURES[0]
    for family in _families() for model_type in getattr(family, "MODEL_TYPES", ())
}

# Weight dtypes the engine loads; anything else (quantized checkpoints) is refused by name.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")

_DTYPE_ALIASES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def get_model_family(config: dict) -> ModuleType:
    """The family module for config["architectures"] (the first supported entry), or for
    config["model_type"] when the config names no architecture."""
    archs = list(config.get("architectures") or [])
    if not archs and config.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[config["model_type"]]]
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    named = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
    raise ValueError(
        f"unsupported architecture {named}; supported: {', '.join(sorted(ARCHITECTURES))}")


def plan_weights(family: ModuleType, names, spec: dict, config: dict | None = None) -> WeightPlan:
    """family.weight_plan, given the config too where the family folds config values into its
    tensors (WEIGHTS_USE_CONFIG: Jais's logit scale)."""
    if getattr(family, "WEIGHTS_USE_CONFIG", False):
        return family.weight_plan(names, spec, config)
    return family.weight_plan(names, spec)


def canonical_weights(family: ModuleType, get_tensor: Callable[[str], np.ndarray], names,
                      spec: dict, config: dict | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical name, array) for every tensor the spec needs (q|k|v and gate|up fused by rows),
    in the family's plan order. `get_tensor(name)` returns the HF tensor as a numpy array of any
    dtype (bfloat16 as uint16 bits): tensors are only sliced and concatenated, never converted."""
    return run_plan(plan_weights(family, names, spec, config), get_tensor)


def normalize_dtype(dtype) -> str | None:
    """"float32" | "float16" | "bfloat16" for the spellings configs use ("torch.bfloat16",
    "bf16", "half", ...); None for "auto", None or anything else."""
    if dtype is None:
        return None
    name = str(dtype).lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name)


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{model_dir!r} has no config.json (expected a Hugging Face model directory)")
    with open(path) as f:
        return json.load(f)


def _safetensors_api():
    """(find_safetensors_files, SafetensorsFile): the compiled reader when this build has it,
    else the numpy one."""
    try:
        from octavo import _C

        return _C.find_safetensors_files, _C.SafetensorsFile
    except (ImportError, AttributeError):
        from octavo.models import _safetensors_reader

        return _safetensors_reader.find_safetensors_files, _safetensors_reader.SafetensorsFile


WeightsFactory = Callable[[], Iterator[tuple[str, np.ndarray, str]]]


def checkpoint_files(model_dir: str) -> list:
    """Readers (keys(), dtype(name), tensor(name)) of the checkpoint's weight files: its
    safetensors when it has any (the shards model.safetensors.index.json names, else every
    *.safetensors), else its PyTorch .bin files (pytorch_model.bin, or the shards
    pytorch_model.bin.index.json names), read with torch.load(weights_only=True)."""
    if os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")) or glob.glob(
            os.path.join(model_dir, "*.safetensors")):
        find_files, SafetensorsFile = _safetensors_api()
        return [SafetensorsFile(p) for p in find_files(model_dir)]
    bin_paths = _torch_bin_reader.find_bin_files(model_dir)
    if bin_paths:
        return [_torch_bin_reader.TorchBinFile(p) for p in bin_paths]
    raise ValueError(
        f"{model_dir!r} has no weights: no .safetensors files and no {_torch_bin_reader.SINGLE} "
        f"or {_torch_bin_reader.INDEX} with its shards")


def load_model(model_dir: str) -> tuple[dict, WeightsFactory, str, dict]:
    """Reads a Hugging Face model directory: config.json and the weights in safetensors or
    PyTorch .bin files, sharded or not (see checkpoint_files).

    Returns (spec, weights, dtype, config): the ModelSpec dict; a function that returns a fresh
    iterator of (canonical_name, array, tensor_dtype), arrays being memory-mapped views unless
    fused (tensor_dtype: "float32" | "float16" | "bfloat16", bfloat16 arrays hold uint16 bits;
    each tensor reports its own, since checkpoints may mix them); the model's dtype
    (config "dtype" / "torch_dtype", else that of the embedding); and config.json as a dict.

    Everything that can be checked without reading tensor data is checked here: the architecture,
    the config, and that every tensor the spec needs exists.
    """
    config = read_config(model_dir)
    family = get_model_family(config)
    spec = family.spec_from_config(config)

    files = checkpoint_files(model_dir)
    where = {name: f for f in files for name in f.keys()}
    plan = plan_weights(family, where.keys(), spec, config)

    def tensor_dtype(name: str) -> str:
        dtype = where[name].dtype(name)
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"tensor {name!r} has dtype {dtype}; octavo loads {', '.join(WEIGHT_DTYPES)} "
                f"weights (quantized checkpoints are not supported yet)")
        return dtype

    dtype = normalize_dtype(config.get("dtype", config.get("torch_dtype")))
    if dtype is None:
        dtype = tensor_dtype(plan.sources[0].parts[0][0])

    def weights() -> Iterator[tuple[str, np.ndarray, str]]:
        for source in plan.sources:
            dtypes = {tensor_dtype(name) for name, _ in source.parts}
            if len(dtypes) > 1:
                raise ValueError(
                    f"{source.name!r} fuses tensors of different dtypes: "
                    + ", ".join(f"{n} {tensor_dtype(n)}" for n, _ in source.parts))
            yield source.name, gather(source, lambda n: where[n].tensor(n)), dtypes.pop()

    return spec, weights, dtype, config
