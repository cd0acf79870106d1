"""bench/floor.py: BENCH.md's floors for the H100 ceilings it quotes, the model sizes against
transformers' own count of the same shapes, and a measured run as a fraction of its floor."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "floor.py")


def load_floor_module():
    spec = importlib.util.spec_from_file_location("floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["floor"] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def run_floor(*args):
    run = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                         timeout=60)
    return run, [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


def test_floors_match_bench_md_on_its_h100():
    """BENCH.md, at 3.02 TB/s and 786 TFLOP/s: nano 5.57 s = 25,300 output tok/s, llama8b 22.2 s
    = 13,100, and Llama-3.1-8B's decode latency floor 16.06 GB / 3.02 TB/s = 5.3 ms."""
    run, lines = run_floor("--copy-bandwidth", "3.02", "--matmul-rate", "786")
    assert run.returncode == 0, run.stderr
    by_name = {line["workload"]: line for line in lines}
    assert set(by_name) == {"nano", "llama8b", "latency"}
    assert by_name["nano"]["floor_s"] == pytest.approx(5.57, abs=0.01)
    assert by_name["nano"]["max_output_tok_s"] == pytest.approx(25_300, rel=0.002)
    assert by_name["nano"]["kv_read_TB"] == pytest.approx(14.9, abs=0.05)
    assert by_name["llama8b"]["floor_s"] == pytest.approx(22.2, abs=0.01)
    assert by_name["llama8b"]["max_output_tok_s"] == pytest.approx(13_100, rel=0.002)
    assert by_name["llama8b"]["kv_read_TB"] == pytest.approx(34.3, abs=0.05)
    assert by_name["latency"]["weights_GB"] == pytest.approx(16.06, abs=0.01)
    assert by_name["latency"]["tpot_floor_ms"] == pytest.approx(5.3, abs=0.02)


def test_floor_scales_with_the_ceilings():
    """Twice the bandwidth halves the decode part; the prefill part follows the matrix rate."""
    floor = load_floor_module()
    nano = floor.WORKLOADS["nano"]
    base = floor.floor(nano, 3e12, 800e12)
    faster = floor.floor(nano, 6e12, 400e12)
    assert faster["decode_floor_s"] == pytest.approx(base["decode_floor_s"] / 2, abs=0.002)
    assert faster["prefill_floor_s"] == pytest.approx(base["prefill_floor_s"] * 2, abs=0.002)


@pytest.mark.parametrize("name,config", [
    ("QWEN3_0_6B", dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)),
    ("LLAMA_3_1_8B", dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                          intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, tie_word_embeddings=False)),
])
def test_model_sizes_match_transformers(name, config):
    """The shapes' parameter counts equal transformers' for the same configs (built on the meta
    device: no memory, no download)."""
    import torch
    import transformers

    floor = load_floor_module()
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert getattr(floor, name).parameters() == sum(p.numel() for p in model.parameters())


def test_measured_runs_as_fractions_of_the_floor(tmp_path):
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"bench": "ceilings", "copy_bandwidth_TBps": 3.02,
                                    "bf16_matmul_TFLOPs": 786.0}) + "\n")
    measured = tmp_path / "runs.jsonl"
    measured.write_text("\n".join(json.dumps(line) for line in [
        {"workload": "nano", "output_tok_s": 12_648.05},
        {"workload": "latency", "tpot_ms": {"mean": 10.636}},
    ]) + "\n")
    run, lines = run_floor("--ceilings", str(ceilings), "--measured", str(measured))
    assert run.returncode == 0, run.stderr
    by_name = {line["workload"]: line for line in lines}
    assert by_name["nano"]["fractions_of_floor"] == [0.5]
    assert by_name["latency"]["fractions_of_floor"] == [0.5]
    assert "fractions_of_floor" not in by_name["llama8b"]


def test_refuses_missing_or_nonpositive_ceilings():
    run, _ = run_floor("--copy-bandwidth", "3.0")
    assert run.returncode == 2 and "--matmul-rate" in run.stderr
    run, _ = run_floor("--copy-bandwidth", "0", "--matmul-rate", "700")
    assert run.returncode == 2 and "positive" in run.stderr
