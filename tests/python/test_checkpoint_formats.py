"""Checkpoint files load_model reads: safetensors (one file or shards named by
model.safetensors.index.json) and PyTorch .bin (pytorch_model.bin or shards named by
pytorch_model.bin.index.json), the latter only through torch.load(weights_only=True)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from octavo.models import load_model  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False)


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def save_bin(directory, model, shards: int = 1, **save_kwargs) -> None:
    """The model as transformers wrote .bin checkpoints: config.json and pytorch_model.bin, or
    pytorch_model-0000i-of-0000n.bin shards and pytorch_model.bin.index.json."""
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    state = model.state_dict()
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = (f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" if shards > 1
                else "pytorch_model.bin")
        torch.save({n: state[n] for n in names[i::shards]}, os.path.join(directory, file),
                   **save_kwargs)
        weight_map.update({n: file for n in names[i::shards]})
    if shards > 1:
        with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def loaded(directory):
    spec, weights, dtype, _ = load_model(str(directory))
    return spec, dtype, [(name, np.array(array), tensor_dtype)
                         for name, array, tensor_dtype in weights()]


@pytest.mark.parametrize("dtype, shards", [
    (torch.float32, 1), (torch.bfloat16, 3), (torch.float16, 2),
])
def test_bin_checkpoints_load_as_safetensors_do(tmp_path, dtype, shards):
    model = tiny_llama(dtype)
    model.save_pretrained(tmp_path / "safetensors", max_shard_size="60KB")
    assert (tmp_path / "safetensors" / "model.safetensors.index.json").exists()
    save_bin(tmp_path / "bin", model, shards)
    spec, model_dtype, expected = loaded(tmp_path / "safetensors")
    bin_spec, bin_dtype, got = loaded(tmp_path / "bin")
    assert bin_spec == spec and bin_dtype == model_dtype == str(dtype).removeprefix("torch.")
    assert [(n, d) for n, _, d in got] == [(n, d) for n, _, d in expected]
    for (name, array, _), (_, reference, _) in zip(got, expected):
        assert array.dtype == reference.dtype, name  # bfloat16: uint16 bits on both sides
        np.testing.assert_array_equal(array, reference, err_msg=name)


def test_legacy_bin_format_loads(tmp_path):
    """Files saved before torch 1.6 (not zip archives) cannot be memory-mapped: read in full."""
    model = tiny_llama()
    save_bin(tmp_path, model, _use_new_zipfile_serialization=False)
    _, _, got = loaded(tmp_path)
    embed = dict((n, a) for n, a, _ in got)["embed_tokens.weight"]
    np.testing.assert_array_equal(embed, model.model.embed_tokens.weight.detach().numpy())


def test_safetensors_win_over_bin(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    _, _, got = loaded(tmp_path)
    assert got[0][0] == "embed_tokens.weight"


def test_bin_with_code_is_refused_without_running_it(tmp_path):
    """A pickle that would run code on load (here: create a directory) is refused by
    weights_only, and nothing runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    state = dict(model.state_dict())
    state["payload"] = Payload()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"weights_only=True\), which refuses to run pickled code"):
        load_model(str(tmp_path))
    assert not marker.exists()


def test_bin_entries_must_be_tensors(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save({**model.state_dict(), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="entry 'step' is a int, not a tensor"):
        load_model(str(tmp_path))


def test_bin_index_naming_a_missing_shard(tmp_path):
    save_bin(tmp_path, tiny_llama(), shards=2)
    os.remove(tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ValueError, match="names shards that are missing: "
                                         "pytorch_model-00002-of-00002.bin"):
        load_model(str(tmp_path))


def test_bin_without_torch_names_the_fix(tmp_path, monkeypatch):
    save_bin(tmp_path, tiny_llama())
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ValueError, match=r"needs torch \(pip install torch\)"):
        load_model(str(tmp_path))


def test_directory_without_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no weights: no .safetensors files and no "
                                         "pytorch_model.bin or pytorch_model.bin.index.json"):
        load_model(str(tmp_path))
