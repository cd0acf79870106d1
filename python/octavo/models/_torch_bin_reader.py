"""PyTorch .bin checkpoints (pytorch_model.bin, or shards named by pytorch_model.bin.index.json),
read safely: torch.load(weights_only=True) unpickles tensors and plain containers only, never
code, so a malicious .bin cannot run anything. Files in torch's zip format are memory-mapped.

Same interface as octavo._C.SafetensorsFile: keys(), dtype(name), shape(name) and tensor(name), a
numpy array (bfloat16 as uint16 bits). torch is needed only here, and only for .bin checkpoints.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np

INDEX = "pytorch_model.bin.index.json"
SINGLE = "pytorch_model.bin"


def find_bin_files(model_dir: str) -> list[str]:
    """The checkpoint's .bin files: those named by pytorch_model.bin.index.json when it exists,
    else pytorch_model.bin when it exists, else none."""
    index = os.path.join(model_dir, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise ValueError(f"{INDEX} in {model_dir!r} names shards that are missing: "
                             f"{', '.join(missing)}")
        return [os.path.join(model_dir, s) for s in shards]
    single = os.path.join(model_dir, SINGLE)
    return [single] if os.path.isfile(single) else []


def _torch():
    try:
        import torch
    except ImportError:
        raise ValueError(
            "this checkpoint stores its weights as PyTorch .bin files, and reading them needs "
            "torch (pip install torch), or convert them once to safetensors where torch is "
            "installed: transformers' save_pretrained(dir, safe_serialization=True)") from None
    return torch


class TorchBinFile:
    """The tensors of one .bin file (a state dict saved by torch.save)."""

    def __init__(self, path: str):
        torch = _torch()
        self.path = path
        try:
            state = _load(torch, path, mmap=True)
        except RuntimeError:
            # Files from torch < 1.6 (the legacy, non-zip format) cannot be memory-mapped.
            state = _load(torch, path, mmap=False)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        self._tensors = {}
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a "
                                 f"tensor (expected a state dict saved by save_pretrained)")
            self._tensors[name] = value
        self._torch = torch

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _get(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def dtype(self, name: str) -> str:
        """"float32" | "float16" | "bfloat16", or torch's name of any other dtype ("int8", ...)."""
        return str(self._get(name).dtype).removeprefix("torch.")

    def shape(self, name: str) -> list[int]:
        return list(self._get(name).shape)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as numpy, sharing memory with the (mapped) file where its storage is
        contiguous; bfloat16 as its uint16 bits."""
        t = self._get(name).contiguous()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(np.uint16)
        return t.numpy()


def _load(torch, path: str, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _unsafe(path, e) from None
    except RuntimeError as e:
        if mmap:
            raise  # the caller retries without mapping
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None
    except (EOFError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None


def _unsafe(path: str, error: Exception) -> ValueError:
    return ValueError(
        f"{path} holds more than tensors, and octavo reads .bin files only with "
        f"torch.load(weights_only=True), which refuses to run pickled code: {error}. Convert "
        f"the checkpoint to safetensors if you trust its source")
