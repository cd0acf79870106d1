"""Latency workload (BENCH.md): time to first token and per output token, batch 1 to 64.

    python bench/latency.py --random-model llama-3.1-8b --device cuda
    python bench/latency.py --model DIR --device cuda --batch-sizes 1,8,64 --input-len 128 \
        --output-len 256

For each batch size, `batch` requests of input-len random prompt tokens and output-len output
tokens (ignore_eos, greedy) are added at once to the synchronous engine and stepped to the end,
twice: the first run warms the engine (cuBLASLt plans, the decode graphs of every padded batch and
table width the run meets), the second is measured. Per request: TTFT = first token - submission,
TPOT = (last token - first token) / (tokens - 1). Prints one JSON line per batch size (mean, p50,
p99 of each, the engine's host/executor split per step); --result-json appends them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import percentiles  # noqa: E402
from throughput import commit, model_directory  # noqa: E402


def summary_ms(values: list[float]) -> dict:
    """Mean and percentiles in ms, as bench/serving.py computes them."""
    return {name: round(value, 3) for name, value in percentiles(values).items()}


def run_batch(engine, params, prompts: list[list[int]]) -> tuple[list[float], list[float], int]:
    """Adds every prompt, steps until all finish; returns per-request TTFT and TPOT in seconds
    and the steps taken."""
    steps_before = engine.stats().num_steps
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first, last, count = {}, {}, {i: 0 for i in ids}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.error:
                raise SystemExit(f"latency.py: request {out.id} failed: {out.error}")
            if out.new_token_ids:
                first.setdefault(out.id, now)
                last[out.id] = now
                count[out.id] += len(out.new_token_ids)
    ttft = [first[i] - start for i in ids]
    tpot = [(last[i] - first[i]) / (count[i] - 1) for i in ids if count[i] > 1]
    return ttft, tpot, engine.stats().num_steps - steps_before


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face checkpoint directory")
    source.add_argument("--random-model", help="a bench/throughput.py shape (random bf16 weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--result-json", default=None, help="append the JSON lines here")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(batch_sizes) < 1 or args.input_len < 1 or args.output_len < 2:
        parser.error("batch sizes and --input-len must be >= 1, --output-len >= 2")

    from octavo.engine_core import EngineArgs, create_engine, to_cpp_sampling_params
    from octavo.sampling_params import SamplingParams

    with model_directory(args.model, args.random_model) as model_dir:
        engine, spec, _ = create_engine(EngineArgs(
            model=model_dir, device=args.device, dtype=args.dtype,
            max_model_len=args.input_len + args.output_len + 1,
            max_num_seqs=max(max(batch_sizes), 1), enable_prefix_caching=False,
            enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling))
    params = to_cpp_sampling_params(SamplingParams(temperature=0.0, max_tokens=args.output_len,
                                                   ignore_eos=True))
    rng = random.Random(args.seed)
    lines = []
    for batch in batch_sizes:
        prompts = [[rng.randrange(spec["vocab_size"]) for _ in range(args.input_len)]
                   for _ in range(batch)]
        run_batch(engine, params, prompts)  # warm-up: plans and graphs for this batch's shapes
        before = engine.stats()
        ttft, tpot, steps = run_batch(engine, params, prompts)
        after = engine.stats()
        per_step = lambda field: round(
            (getattr(after, field) - getattr(before, field)) / max(steps, 1) * 1e3, 3)
        line = json.dumps({
            "bench": "latency", "model": args.random_model or args.model, "device": args.device,
            "batch": batch, "input_len": args.input_len, "output_len": args.output_len,
            "ttft_ms": summary_ms(ttft), "tpot_ms": summary_ms(tpot), "steps": steps,
            "schedule_ms_per_step": per_step("schedule_seconds"),
            "execute_ms_per_step": per_step("execute_seconds"),
            "output_ms_per_step": per_step("output_seconds"),
            "device_wait_ms_per_step": per_step("device_wait_seconds"),
            "enforce_eager": args.enforce_eager,
            "async_scheduling": bool(engine.config.async_scheduling), "commit": commit(),
        })
        print(line, flush=True)
        lines.append(line)
    if args.result_json:
        with open(args.result_json, "a") as f:
            f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
