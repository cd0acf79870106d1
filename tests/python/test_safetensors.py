"""SafetensorsFile through the bindings: zero-copy, read-only views of what the safetensors package
wrote, views that outlive the file object, and ValueError naming the file for broken files."""

import gc

import numpy as np
import pytest

from octavo import _C

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _address(array):
    return array.__array_interface__["data"][0]


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "model.norm.weight": rng.standard_normal((4, 2)).astype(np.float16),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "position_ids": np.arange(6, dtype=np.int64),
    }
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"format": "np", "note": "é"})
    return path, tensors


def test_views_equal_what_safetensors_wrote(written):
    path, tensors = written
    f = _C.SafetensorsFile(str(path))
    assert f.path == str(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert len(f) == len(tensors) and "scalar" in f and "missing" not in f
    assert f.metadata() == {"format": "np", "note": "é"}
    for name in ["model.embed_tokens.weight", "model.norm.weight", "scalar", "empty"]:
        original = tensors[name]
        assert f.dtype(name) == str(original.dtype)
        assert f.shape(name) == original.shape
        view = f.tensor(name)
        assert view.dtype == original.dtype
        assert view.shape == original.shape
        np.testing.assert_array_equal(view, original)
        assert not view.flags.writeable
    with pytest.raises(ValueError):
        f.tensor("model.norm.weight")[0, 0] = 1.0


def test_views_are_zero_copy_into_the_mapping(written):
    path, _ = written
    f = _C.SafetensorsFile(str(path))
    a = f.tensor("model.embed_tokens.weight")
    b = f.tensor("model.embed_tokens.weight")
    assert _address(a) == _address(b)  # both point into the one mapping, not into copies
    assert not a.flags.owndata


def test_other_dtypes_are_listed_but_not_viewed(written):
    path, _ = written
    f = _C.SafetensorsFile(str(path))
    assert f.dtype("position_ids") == "I64"
    assert f.shape("position_ids") == (6,)
    with pytest.raises(ValueError, match="'position_ids' has dtype I64"):
        f.tensor("position_ids")


def test_view_outlives_the_file_object(written):
    path, tensors = written
    f = _C.SafetensorsFile(str(path))
    view = f.tensor("model.embed_tokens.weight")
    del f
    gc.collect()
    np.testing.assert_array_equal(view, tensors["model.embed_tokens.weight"])


def test_bfloat16_comes_out_as_its_uint16_bits(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    original = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    safetensors_torch.save_file({"w": original}, str(path))
    f = _C.SafetensorsFile(str(path))
    assert f.dtype("w") == "bfloat16"
    assert f.shape("w") == (3, 4)
    view = f.tensor("w")
    assert view.dtype == np.uint16
    np.testing.assert_array_equal(view.view(np.int16), original.view(torch.int16).numpy())
    # The documented way back to a bf16 tensor.
    assert torch.equal(torch.from_numpy(view.copy()).view(torch.bfloat16), original)


def test_unknown_name_raises_value_error(written):
    path, _ = written
    f = _C.SafetensorsFile(str(path))
    with pytest.raises(ValueError, match="tensor 'lm_head.weight' not found in .*model.safetensors"):
        f.tensor("lm_head.weight")
    with pytest.raises(ValueError, match="not found"):
        f.shape("lm_head.weight")


def test_truncated_file_raises_value_error_naming_it(written, tmp_path):
    path, _ = written
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated.safetensors: truncated: tensor"):
        _C.SafetensorsFile(str(truncated))


def test_garbage_and_missing_files_raise_value_error_naming_them(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="garbage.safetensors: header: invalid JSON"):
        _C.SafetensorsFile(str(garbage))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="short.safetensors: file is 3 bytes"):
        _C.SafetensorsFile(str(short))
    with pytest.raises(ValueError, match="missing.safetensors: cannot open"):
        _C.SafetensorsFile(str(tmp_path / "missing.safetensors"))


def test_find_safetensors_files_follows_the_index(tmp_path):
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]:
        safetensors_numpy.save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {"total_size": 8}, "weight_map": {'
        '"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", '
        '"c": "model-00002-of-00002.safetensors"}}'
    )
    assert _C.find_safetensors_files(str(tmp_path)) == [
        str(tmp_path / "model-00002-of-00002.safetensors"),
        str(tmp_path / "model-00001-of-00002.safetensors"),
    ]


def test_find_safetensors_files_names_an_empty_directory(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no safetensors weights"):
        _C.find_safetensors_files(str(tmp_path))
