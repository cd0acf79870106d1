"""bench/kernels.py's smoke run on the GPU: every shape of --quick reports against the ceilings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernels_bench_quick(tmp_path):
    result_path = tmp_path / "kernels.jsonl"
    command = [sys.executable, os.path.join(REPO, "bench", "kernels.py"), "--quick",
               "--result-json", str(result_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [json.loads(line) for line in result_path.read_text().splitlines()]
    decode = [line for line in lines if line["kernel"] == "paged_decode"]
    prefill = [line for line in lines if line["kernel"] == "paged_prefill"]
    gemv = [line for line in lines if line["kernel"] == "gemv"]
    nano_run = [line for line in lines if line["kernel"] == "paged_decode_nano_run"]
    llama8b_run = [line for line in lines if line["kernel"] == "paged_decode_llama8b_run"]
    layer_ops = [line for line in lines
                 if line["kernel"] in ("norm", "rotary_write_kv", "activation",
                                       "activation_unscaled")]
    assert len(decode) == 3 and len(prefill) == 1 and len(gemv) == 1
    assert sorted(line["heads"] for line in decode) == [32, 32, 64]
    assert sorted(line["order"] for line in nano_run) == ["longest_first", "rows"]
    assert [line["order"] for line in llama8b_run] == ["longest_first"]
    assert set(llama8b_run[0]["by_batch"]) <= {"512-257", "256-129", "128-33", "32-1"}
    for line in nano_run + llama8b_run:
        assert line["steps"] == 4 and line["kv_GB"] > 0 and 0 < line["fraction_of_copy"] < 1.5
    assert any(line["uneven"] for line in decode)
    for line in decode:
        assert line["us"] > 0 and 0 < line["fraction_of_copy"] < 1.5
    for line in prefill:
        assert line["ms"] > 0 and line["sdpa_ms"] > 0 and 0 < line["fraction_of_matmul"] < 1.5
    for line in gemv:
        assert line["us"] > 0 and line["cublas_us"] > 0 and 0 < line["fraction_of_copy"] < 1.5
    assert sorted(line["kernel"] for line in layer_ops) == ["activation", "activation_unscaled",
                                                            "norm", "rotary_write_kv"]
    for line in layer_ops:
        assert line["us"] > 0 and line["rows"] == 4 and 0 < line["fraction_of_copy"] < 1.5
    assert all(line["copy_bandwidth_TBps"] > 0 for line in lines)
