"""Bad checkpoints, bad arguments and bad requests give errors that name the problem."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("torch")

from octavo import LLM, SamplingParams  # noqa: E402

from checkpoints import build_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("good"))
    build_checkpoint(directory, "LlamaForCausalLM", seed=11)
    return directory


def copy_of(good_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(good_dir, target)
    return target


def rewrite_tensors(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(good_dir, tmp_path):
    directory = copy_of(good_dir, tmp_path)
    rewrite_tensors(directory, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(model=str(directory))


def test_wrong_shape_is_named(good_dir, tmp_path):
    directory = copy_of(good_dir, tmp_path)

    def shrink(tensors):
        name = "model.layers.0.self_attn.o_proj.weight"
        tensors[name] = tensors[name][:, :-1].copy()

    rewrite_tensors(directory, shrink)
    with pytest.raises(ValueError, match=r"o_proj|layers\.0\.o\.weight"):
        LLM(model=str(directory))


def test_truncated_file_is_reported(good_dir, tmp_path):
    directory = copy_of(good_dir, tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|model.safetensors"):
        LLM(model=str(directory))


def test_garbage_file_is_reported(good_dir, tmp_path):
    directory = copy_of(good_dir, tmp_path)
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(model=str(directory))


def test_unknown_architecture_lists_supported(good_dir, tmp_path):
    directory = copy_of(good_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    config["model_type"] = "made_up"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="MadeUpForCausalLM.*LlamaForCausalLM"):
        LLM(model=str(directory))


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory|tokenizer|config"):
        LLM(model=str(tmp_path / "nope"))


def test_bad_engine_arguments(good_dir):
    with pytest.raises(ValueError, match="block_size"):
        LLM(model=good_dir, block_size=3)
    with pytest.raises(ValueError, match="max_model_len 100000 exceeds"):
        LLM(model=good_dir, max_model_len=100000)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        LLM(model=good_dir, num_gpu_blocks_override=2, max_model_len=256)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(model=good_dir, max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="device 'tpu'|unknown device"):
        LLM(model=good_dir, device="tpu")
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(model=good_dir, not_an_argument=1)


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": 50}, "logprobs"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_fail_alone(good_dir):
    llm = LLM(model=good_dir, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="prompt has 80 tokens; max_model_len is 64"):
        llm.generate([[5] * 80], params, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 100000]], params, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], params, use_tqdm=False)
    # A rejected batch leaves nothing behind: the engine serves the next call normally.
    assert llm.engine.num_unfinished() == 0
    (out,) = llm.generate([[5, 6]], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    # max_tokens beyond max_model_len is capped there, finishing with "length".
    (long,) = llm.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=100,
                                                       ignore_eos=True), use_tqdm=False)
    assert len(long.outputs[0].token_ids) == 4 and long.outputs[0].finish_reason == "length"


def test_dtype_spellings(good_dir):
    """vLLM's spellings (half, float, bf16) work in LLM as in the server; others are refused."""
    llm = LLM(model=good_dir, device="cpu", dtype="half", num_gpu_blocks_override=16)
    assert llm.engine.config.dtype == "float16"
    with pytest.raises(ValueError, match="dtype 'int8' is not one of auto, float32"):
        LLM(model=good_dir, device="cpu", dtype="int8")
