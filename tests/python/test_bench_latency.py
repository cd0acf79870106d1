"""bench/latency.py on the CPU: one JSON line per batch size, with every request timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_latency_bench_reports_each_batch(llama_dir, tmp_path):
    result_path = tmp_path / "latency.jsonl"
    command = [sys.executable, os.path.join(REPO, "bench", "latency.py"), "--model", llama_dir,
               "--batch-sizes", "1,3", "--input-len", "12", "--output-len", "6",
               "--result-json", str(result_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [json.loads(line) for line in result_path.read_text().splitlines()]
    assert [line["batch"] for line in lines] == [1, 3]
    for line in lines:
        assert line["bench"] == "latency" and line["output_len"] == 6
        # Every request's 6 tokens after the one prefill: at least 5 decode steps, one per token.
        assert line["steps"] >= 6
        for key in ("ttft_ms", "tpot_ms"):
            assert 0 < line[key]["p50"] <= line[key]["p99"], key
        assert line["execute_ms_per_step"] > 0
    assert run.stdout.count('"bench": "latency"') == 2


def test_latency_bench_rejects_bad_sizes(llama_dir):
    command = [sys.executable, os.path.join(REPO, "bench", "latency.py"), "--model", llama_dir,
               "--batch-sizes", "0", "--output-len", "6"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "batch sizes" in run.stderr
