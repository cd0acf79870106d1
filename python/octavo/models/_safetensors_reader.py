"""A minimal safetensors reader in numpy, used when the compiled module has no SafetensorsFile.

Same interface as octavo._C.SafetensorsFile: keys(), dtype(name), shape(name) and tensor(name), a
read-only numpy view of the memory-mapped file (bfloat16 as uint16 bits, float8 as uint8).
Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}}, then the data, offsets counted from the end of the header.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np

# safetensors dtype -> (name as octavo reports it, numpy dtype holding its bits)
_DTYPES = {
    "F64": ("float64", np.float64),
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "F8_E4M3": ("float8_e4m3fn", np.uint8),
    "F8_E5M2": ("float8_e5m2", np.uint8),
    "I64": ("int64", np.int64),
    "I32": ("int32", np.int32),
    "I16": ("int16", np.int16),
    "I8": ("int8", np.int8),
    "U64": ("uint64", np.uint64),
    "U32": ("uint32", np.uint32),
    "U16": ("uint16", np.uint16),
    "U8": ("uint8", np.uint8),
    "BOOL": ("bool", np.bool_),
}


def find_safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's files: those named by model.safetensors.index.json when it exists (so a
    stray consolidated.safetensors beside the shards is not read twice), else every
    *.safetensors in the directory."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, s) for s in shards]
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + header_len
        size = os.path.getsize(path)
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def dtype(self, name: str) -> str:
        code = self._entry(name)["dtype"]
        return _DTYPES[code][0] if code in _DTYPES else code.lower()

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)["shape"])

    def tensor(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]][1]).reshape(entry["shape"])
