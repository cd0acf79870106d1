"""`octavo export HF_DIR OUT_DIR`: a Hugging Face checkpoint as octavo's own model directory.

    python -m octavo.export path/to/hf-checkpoint path/to/octavo-model [--dtype bfloat16]

The output is what the C++ API loads with no Python (`Engine(EngineConfig{.model = OUT_DIR})`,
cpp/include/octavo/model_dir.h): octavo.json (format version, storage dtype, EOS ids and the
ModelSpec), the weights under their canonical names as safetensors (model.safetensors, or shards
with model.safetensors.index.json), and the tokenizer and generation files copied alongside. The
Python loader's mapping (fusing q|k|v and gate|up, renaming, per-architecture fixes) is done once
here, so a native program runs the same model `LLM(model=HF_DIR)` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import struct
import sys
from typing import Optional, Sequence

import numpy as np

from octavo.models import WEIGHT_DTYPES, load_model, normalize_dtype

# Files copied from the checkpoint: what a tokenizer and generation settings are made of. Model
# weights in other formats and config.json (octavo.json replaces it) are not copied.
_COPIED_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
    r".*\.tiktoken|generation_config\.json|chat_template.*|preprocessor_config\.json)$")

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

DEFAULT_MAX_SHARD_BYTES = 2 << 30  # a shard is held in memory while it is written

logger = logging.getLogger("octavo")


def parse_size(text: str) -> int:
    """"2GB", "500MB", "1GiB" or a byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r} is not a number of bytes (e.g. 2GB, 500MB, 1GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}
    if unit not in scale:
        raise ValueError(f"size {text!r}: unknown unit {match.group(2)!r}")
    return int(number * scale[unit])


def write_safetensors(path: str, tensors: list[tuple[str, np.ndarray, str]]) -> None:
    """Writes (name, array, dtype) tensors as one safetensors file. Tensors go largest element
    first, back to back (as the safetensors library lays them out), so each starts aligned to its
    element size; the header is padded with spaces to 8 bytes."""
    ordered = sorted(tensors, key=lambda t: -_ITEMSIZE[t[2]])  # stable: keeps engine order within
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array, dtype in ordered:
        nbytes = array.size * _ITEMSIZE[dtype]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, array, _ in ordered:
            f.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def _eos_token_ids(hf_dir: str, config: dict) -> list[int]:
    """What LLM(model=hf_dir) uses: generation_config.json's, config.json's, else the tokenizer's."""
    from octavo.engine_core import read_eos_token_ids

    eos = read_eos_token_ids(hf_dir, config)
    if eos:
        return eos
    try:
        from octavo.tokenizer import load_tokenizer

        return read_eos_token_ids(hf_dir, config, load_tokenizer(hf_dir))
    except (ValueError, ImportError):
        return []


def export(hf_dir: str, out_dir: str, dtype: str = "auto",
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> dict:
    """Writes the octavo model directory `out_dir` from the Hugging Face checkpoint `hf_dir`.

    dtype: "auto" keeps each tensor's dtype; "float32", "float16" or "bfloat16" converts every
        weight with the engine's rounding (what the engine would do when loading).
    max_shard_bytes: weights beyond this go to further shards (each is held in memory once).
    overwrite: replace the octavo files of an existing output directory.

    Returns a summary: {"model_spec", "dtype", "eos_token_ids", "files", "num_weights", "bytes"}.
    Raises ValueError for an unsupported checkpoint, a bad argument or an existing output.
    """
    from octavo import _C
    from octavo.engine_core import to_cpp_spec

    if not os.path.isdir(hf_dir):
        raise ValueError(f"{hf_dir!r} is not a directory (expected a Hugging Face checkpoint)")
    if dtype != "auto" and normalize_dtype(dtype) not in WEIGHT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use auto, float32, float16 or bfloat16")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes is {max_shard_bytes}; it must be positive")
    if os.path.exists(out_dir) and os.path.samefile(hf_dir, out_dir):
        raise ValueError("the output directory is the checkpoint itself; give another OUT_DIR")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir!r} exists and is not empty (pass --overwrite to replace its "
                         f"octavo files)")

    spec, weights, model_dtype, config = load_model(hf_dir)
    cpp_spec = to_cpp_spec(spec)
    target = None if dtype == "auto" else normalize_dtype(dtype)
    storage_dtype = target or model_dtype
    eos = _eos_token_ids(hf_dir, config)
    outside = [t for t in eos if not 0 <= t < cpp_spec.vocab_size]
    if outside:
        # Such an id can never be sampled; octavo.json holds only ids inside the vocabulary.
        logger.warning("octavo export: EOS ids %s are outside the vocabulary of %d; dropped",
                       outside, cpp_spec.vocab_size)
        eos = [t for t in eos if t not in outside]
    config_json = _C.model_dir_config_to_json(cpp_spec, storage_dtype, eos)
    expected = dict(_C.expected_weights(cpp_spec))

    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):
        if stale == "octavo.json" or stale.endswith(".safetensors") or \
                stale == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, stale))

    writer = _ShardWriter(out_dir, max_shard_bytes)
    try:
        for name, array, tensor_dtype in weights():
            if name not in expected:
                raise ValueError(f"the loader produced {name!r}, which the engine does not expect")
            if list(array.shape) != list(expected[name]):
                raise ValueError(f"{name!r} has shape {list(array.shape)}; the engine expects "
                                 f"{list(expected[name])}")
            del expected[name]
            out_dtype = target or tensor_dtype
            if out_dtype != tensor_dtype:
                array = _C.convert_weight(np.ascontiguousarray(array), tensor_dtype, out_dtype)
            writer.add(name, array, out_dtype)
        if expected:
            raise ValueError(f"the loader produced no {sorted(expected)[0]!r} "
                             f"({len(expected)} expected weights missing)")
        files = writer.finish()
    finally:
        writer.remove_temporaries()

    for entry in sorted(os.listdir(hf_dir)):
        if _COPIED_FILES.match(entry) and os.path.isfile(os.path.join(hf_dir, entry)):
            shutil.copyfile(os.path.join(hf_dir, entry), os.path.join(out_dir, entry))
            files.append(entry)
    # octavo.json last: a directory holding it is complete.
    with open(os.path.join(out_dir, "octavo.json"), "w") as f:
        f.write(config_json)
    files.append("octavo.json")
    return {"model_spec": json.loads(config_json)["model_spec"], "dtype": storage_dtype,
            "eos_token_ids": eos, "files": files, "num_weights": writer.num_weights,
            "bytes": writer.total_bytes}


class _ShardWriter:
    """Collects tensors into shards of at most max_shard_bytes (a larger tensor gets a shard of its
    own), writes each under a temporary name when full, and names them when all are known:
    model.safetensors alone, or model-0000i-of-0000n.safetensors plus the index."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: list[tuple[str, np.ndarray, str]] = []
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary name, tensor names)
        self.num_weights = 0
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray, dtype: str) -> None:
        nbytes = array.size * _ITEMSIZE[dtype]
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending.append((name, array, dtype))
        self.pending_bytes += nbytes
        self.num_weights += 1
        self.total_bytes += nbytes

    def _flush(self) -> None:
        temp = f".octavo-shard-{len(self.written):05d}.safetensors.tmp"
        self.written.append((temp, [t[0] for t in self.pending]))
        write_safetensors(os.path.join(self.out_dir, temp), self.pending)
        self.pending, self.pending_bytes = [], 0

    def finish(self) -> list[str]:
        self._flush()
        path = lambda name: os.path.join(self.out_dir, name)  # noqa: E731
        if len(self.written) == 1:
            os.replace(path(self.written[0][0]), path("model.safetensors"))
            return ["model.safetensors"]
        files, weight_map = [], {}
        for i, (temp, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.replace(path(temp), path(final))
            files.append(final)
            weight_map.update({n: final for n in names})
        with open(path("model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f,
                      indent=2)
        return files + ["model.safetensors.index.json"]

    def remove_temporaries(self) -> None:
        """Removes shards still under their temporary names (left when writing failed)."""
        for temp, _ in self.written:
            if os.path.exists(os.path.join(self.out_dir, temp)):
                os.remove(os.path.join(self.out_dir, temp))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`octavo export HF_DIR OUT_DIR [--dtype D] [--max-shard-size S] [--overwrite]`."""
    parser = argparse.ArgumentParser(
        prog="octavo export",
        description="Write octavo's model directory (octavo.json + canonical safetensors + "
                    "tokenizer files) from a Hugging Face checkpoint, for the C++ API and "
                    "octavo_bench.")
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    parser.add_argument("--dtype", default="auto",
                        help="auto (keep each tensor's), float32, float16 or bfloat16")
    parser.add_argument("--max-shard-size", default="2GiB",
                        help="largest safetensors file before sharding (default 2GiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the octavo files of a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        summary = export(args.hf_dir, args.out_dir, dtype=args.dtype,
                         max_shard_bytes=parse_size(args.max_shard_size),
                         overwrite=args.overwrite)
    except ValueError as e:
        print(f"octavo export: error: {e}", file=sys.stderr)
        return 2
    spec = summary["model_spec"]
    print(f"octavo export: {spec['architecture']} ({spec['num_layers']} layers, hidden "
          f"{spec['hidden_size']}, vocab {spec['vocab_size']}) -> {args.out_dir}: "
          f"{summary['num_weights']} weights, {summary['bytes'] / 2**20:,.1f} MiB "
          f"{summary['dtype']}, {len(summary['files'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
