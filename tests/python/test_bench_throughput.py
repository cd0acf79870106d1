"""bench/throughput.py on the CPU: the workload's lengths drawn as BENCH.md prescribes, every
output run to its length, one JSON line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "throughput.py")


def test_throughput_bench_runs_every_output_to_its_length(llama_dir):
    command = [sys.executable, SCRIPT, "--model", llama_dir, "--num-prompts", "5",
               "--input-len", "8:20", "--output-len", "3:7", "--seed", "4", "--no-detokenize"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    line = json.loads(run.stdout.strip().splitlines()[-1])
    rng = random.Random(4)
    lengths = [(rng.randint(8, 20), rng.randint(3, 7)) for _ in range(5)]
    assert line["bench"] == "throughput" and line["requests"] == 5
    assert line["prompt_tokens"] == sum(i for i, _ in lengths)
    assert line["output_tokens"] == sum(o for _, o in lengths)
    assert line["steps"] >= max(o for _, o in lengths)
    assert line["async_steps"] == 0  # on the CPU async scheduling is off unless asked for
    assert line["output_tok_s"] > 0 and line["wall_s"] > 0
    assert "gpu_busy_ms" not in line


def test_throughput_bench_can_ask_for_async_scheduling(llama_dir):
    command = [sys.executable, SCRIPT, "--model", llama_dir, "--num-prompts", "3",
               "--input-len", "8", "--output-len", "4", "--no-detokenize", "--async-scheduling"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0 < line["async_steps"] < line["steps"]  # the first step has nothing to overlap


def test_throughput_bench_profile_needs_cuda(llama_dir):
    run = subprocess.run([sys.executable, SCRIPT, "--model", llama_dir, "--profile"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--profile" in run.stderr and "cuda" in run.stderr


def test_throughput_bench_hf_backend_runs_the_same_requests_in_static_batches(llama_dir):
    """--backend hf: BENCH.md's transformers baseline; each batch of 2 runs to its longest output
    and only each request's own tokens count."""
    command = [sys.executable, SCRIPT, "--model", llama_dir, "--num-prompts", "5",
               "--input-len", "8:20", "--output-len", "3:7", "--seed", "4", "--backend", "hf",
               "--hf-max-batch-size", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    line = json.loads(run.stdout.strip().splitlines()[-1])
    rng = random.Random(4)
    lengths = [(rng.randint(8, 20), rng.randint(3, 7)) for _ in range(5)]
    outputs = [o for _, o in lengths]
    assert line["backend"] == "hf" and line["hf_max_batch_size"] == 2
    assert line["prompt_tokens"] == sum(i for i, _ in lengths)
    assert line["output_tokens"] == sum(outputs)
    assert line["generated_tokens"] == sum(len(outputs[b:b + 2]) * max(outputs[b:b + 2])
                                           for b in range(0, 5, 2))
    assert line["output_tok_s"] > 0 and line["wall_s"] > 0
    assert "steps" not in line  # no engine statistics for transformers


def test_throughput_bench_backend_flags_are_checked(llama_dir):
    cases = [(["--backend", "hf"], "--hf-max-batch-size"),
             (["--backend", "hf", "--hf-max-batch-size", "0"], "N >= 1"),
             (["--hf-max-batch-size", "4"], "--backend hf"),
             (["--backend", "hf", "--hf-max-batch-size", "4", "--max-num-seqs", "8"],
              "--max-num-seqs")]
    for flags, message in cases:
        run = subprocess.run([sys.executable, SCRIPT, "--model", llama_dir, *flags],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, (flags, run.stderr)
