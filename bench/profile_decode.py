"""Where a decode step's time goes on the GPU: kernel time per step (CUPTI, through
torch.profiler) against the step's wall time, for a batch of running requests.

    python bench/profile_decode.py --random-model qwen3-0.6b --batch 256 --context 1024

Prints one JSON line: wall ms per step, GPU kernel ms per step (busy), the idle share, and the
kernels that take the most time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from throughput import commit, kernel_summary, model_directory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-model", default="qwen3-0.6b")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead")
    parser.add_argument("--result-json", default=None, help="also append the JSON line here")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from octavo.engine_core import EngineArgs, create_engine, to_cpp_sampling_params
    from octavo.sampling_params import SamplingParams

    with model_directory(args.model, None if args.model else args.random_model) as model_dir:
        engine, spec, _ = create_engine(EngineArgs(
            model=model_dir, device="cuda", max_num_seqs=args.batch,
            max_model_len=args.context + 4096, enable_prefix_caching=False,
            enforce_eager=args.enforce_eager))
    # Long enough that no request finishes while the others are still prefilling.
    params = to_cpp_sampling_params(SamplingParams(temperature=1.0, max_tokens=4000,
                                                   ignore_eos=True, seed=1))
    for r in range(args.batch):
        engine.add_request([(r * 7919 + i) % spec["vocab_size"] for i in range(args.context)],
                           params)
    while engine.stats().num_waiting > 0 or engine.stats().prompt_tokens < args.batch * args.context:
        engine.step()
    assert engine.stats().num_running == args.batch, "every request decodes in the profiled steps"
    for _ in range(3):  # warm-up decode steps (the first of a batch size captures its graph)
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - start
    per_step = kernel_summary(prof, args.steps)
    line = json.dumps({
        "bench": "profile_decode", "model": args.model or args.random_model, "batch": args.batch,
        "context": args.context, "steps": args.steps, "device": torch.cuda.get_device_name(),
        "graphs": not args.enforce_eager,
        "wall_ms_per_step": round(wall / args.steps * 1e3, 3),
        "gpu_busy_ms_per_step": per_step["gpu_busy_ms"],
        "idle_share": round(1 - per_step["gpu_busy_ms"] / 1e3 / (wall / args.steps), 3),
        "launches_per_step": per_step["launches"],
        "top_kernels": per_step["top_kernels"],  # ms and calls per step
        "commit": commit(),
    })
    print(line)
    if args.result_json:
        with open(args.result_json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
