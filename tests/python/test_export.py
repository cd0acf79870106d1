"""`octavo export`: a Hugging Face checkpoint as octavo's model directory, loaded by the C++ API
(Engine(EngineConfig), no Python in the loading path) with the same greedy tokens as
LLM.generate on the checkpoint; and the native example program served from an export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from octavo import LLM, SamplingParams, _C  # noqa: E402
from octavo.engine_core import to_cpp_sampling_params  # noqa: E402
from octavo.export import export, main, parse_size  # noqa: E402

PROMPTS = [[5, 17, 42, 8, 91], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], [200, 7], list(range(10, 60))]
MAX_TOKENS = 10


def llm_greedy(model_dir: str, **kwargs) -> list[list[int]]:
    llm = LLM(model=model_dir, device="cpu", **kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def native_greedy(model_dir: str, dtype: str = "auto") -> list[list[int]]:
    """The tokens of the engine a native program gets from Engine(EngineConfig{model=dir})."""
    config = _C.EngineConfig()
    config.model = model_dir
    config.dtype = dtype
    config.num_kv_blocks = 64
    engine = _C.engine_from_model_dir(config)
    params = to_cpp_sampling_params(
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    ids = [engine.add_request(p, params) for p in PROMPTS]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            assert not out.error
            tokens[out.id].extend(out.new_token_ids)
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_exported_model_generates_what_llm_generates(tiny_checkpoints, tmp_path, architecture):
    hf_dir = tiny_checkpoints[architecture][0]
    out = str(tmp_path / "octavo-model")
    summary = export(hf_dir, out)
    assert summary["dtype"] == "float32"
    expected = llm_greedy(hf_dir)
    assert all(len(t) == MAX_TOKENS for t in expected)
    assert native_greedy(out) == expected


def test_octavo_json_holds_every_spec_field(llama_dir, tmp_path):
    out = str(tmp_path / "m")
    export(llama_dir, out)
    with open(os.path.join(out, "octavo.json")) as f:
        stored = json.load(f)
    assert stored["format_version"] == _C.MODEL_DIR_FORMAT_VERSION
    assert stored["dtype"] == "float32"
    assert stored["eos_token_ids"] == [1]  # the checkpoint's generation config
    # Every field the bindings expose is in the file: a field added to ModelSpec without its JSON
    # (cpp/src/model/model_dir.cc) fails here.
    fields = {name for name in dir(_C.ModelSpec()) if not name.startswith("_")} - {"validate"}
    assert fields == set(stored["model_spec"])
    rope_fields = {name for name in dir(_C.RopeConfig()) if not name.startswith("_")}
    assert rope_fields == set(stored["model_spec"]["rope"])
    assert stored["model_spec"]["architecture"] == "LlamaForCausalLM"
    spec, dtype, eos = _C.read_model_dir_config(out)
    assert (spec.num_layers, dtype, eos) == (3, "float32", [1])
    # The tokenizer travels with the weights; config.json does not (octavo.json replaces it).
    files = set(os.listdir(out))
    assert {"tokenizer.json", "tokenizer_config.json", "octavo.json", "model.safetensors"} <= files
    assert "config.json" not in files
    assert not [f for f in files if f.endswith(".tmp")]


def test_dtype_conversion_matches_the_engines(llama_dir, tmp_path):
    out = str(tmp_path / "bf16")
    summary = export(llama_dir, out, dtype="bf16")
    assert summary["dtype"] == "bfloat16"
    weights = _C.SafetensorsFile(os.path.join(out, "model.safetensors"))
    assert {weights.dtype(n) for n in weights.keys()} == {"bfloat16"}
    # Converted once at export with the engine's rounding: the same model as loading the fp32
    # checkpoint in bfloat16.
    assert native_greedy(out) == llm_greedy(llama_dir, dtype="bfloat16")


def test_shards_and_index(llama_dir, tmp_path):
    out = str(tmp_path / "sharded")
    summary = export(llama_dir, out, max_shard_bytes=200_000)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(index["weight_map"]) == summary["num_weights"]
    assert index["metadata"]["total_size"] == summary["bytes"]
    assert native_greedy(out) == llm_greedy(llama_dir)


def test_export_errors(llama_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        export(llama_dir, str(out))
    export(llama_dir, str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # only octavo's own files are replaced
    with pytest.raises(ValueError, match="dtype 'int8'"):
        export(llama_dir, str(tmp_path / "x"), dtype="int8")
    with pytest.raises(ValueError, match="checkpoint itself"):
        export(llama_dir, llama_dir, overwrite=True)
    with pytest.raises(ValueError, match="not a directory"):
        export(str(tmp_path / "missing"), str(tmp_path / "y"))
    assert main([str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert "octavo export: error:" in capsys.readouterr().err
    # The C++ loader tells a Hugging Face directory apart and says what to run.
    config = _C.EngineConfig()
    config.model = llama_dir
    with pytest.raises(ValueError, match="octavo export"):
        _C.engine_from_model_dir(config)
    assert parse_size("2GiB") == 2 << 30 and parse_size("500MB") == 500_000_000
    with pytest.raises(ValueError, match="not a number of bytes"):
        parse_size("lots")


def test_module_entry_point(llama_dir, tmp_path):
    out = str(tmp_path / "cli")
    result = subprocess.run([sys.executable, "-m", "octavo.export", llama_dir, out,
                             "--dtype", "float16"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout and "float16" in result.stdout
    assert _C.read_model_dir_config(out)[1] == "float16"


def test_native_async_client(tiny_checkpoints, tmp_path):
    """examples/async_client (built against the installed CMake package by tests/run.sh) serves
    the exported model to several threads through AsyncEngine and checks every request's tokens
    against LLM.generate's."""
    binary = os.environ.get("OCTAVO_ASYNC_CLIENT")
    if not binary:
        pytest.skip("OCTAVO_ASYNC_CLIENT is unset (tests/run.sh builds examples/async_client "
                    "and sets it)")
    hf_dir = tiny_checkpoints["Qwen3ForCausalLM"][0]
    out = str(tmp_path / "served")
    export(hf_dir, out)
    expected_file = tmp_path / "expected.txt"
    lines = ["# prompt token ids ; greedy output token ids of LLM.generate (ignore_eos)"]
    for prompt, tokens in zip(PROMPTS, llm_greedy(hf_dir)):
        lines.append(" ".join(map(str, prompt)) + " ; " + " ".join(map(str, tokens)))
    expected_file.write_text("\n".join(lines) + "\n")
    result = subprocess.run([binary, out, str(expected_file), "--threads", "4", "--repeat", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(PROMPTS) * 3} requests" in result.stdout

    # A wrong expectation is caught: the program is not a rubber stamp.
    first = lines[1].split(" ; ")
    lines[1] = first[0] + " ; " + " ".join(str((int(t) + 1) % 320) for t in first[1].split())
    expected_file.write_text("\n".join(lines) + "\n")
    result = subprocess.run([binary, out, str(expected_file)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "differ" in result.stdout + result.stderr
