"""Start an octavo server, load it at several request rates with bench/serving.py, stop it.

    python bench/serving_sweep.py --model DIR --device cuda --rates inf,32,16 \
        --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --vocab-size 151936 \
        --result-json sweep.json

    python bench/serving_sweep.py --random-model qwen3-0.6b --device cuda ...   # nano workload

One server process for the whole sweep (its start time is reported); each rate is one
serving.py run with the same seed, so every rate sends the same requests. Server flags other
than these go after `--`: `... -- --max-num-seqs 128`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402
from throughput import commit, model_directory  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> float:
    """Seconds until GET /health answers 200; raises if the server exits or time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"serving_sweep.py: the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"serving_sweep.py: no healthy server at {url} after {timeout:.0f} s")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory")
    source.add_argument("--random-model", help="build a random checkpoint of this shape "
                                               "(bench/throughput.py's names)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rates", default="inf", help="comma-separated request rates (req/s)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="100:1024")
    parser.add_argument("--output-len", default="100:1024")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args(argv)
    rates = [math.inf if r.strip() == "inf" else float(r) for r in args.rates.split(",")]

    with model_directory(args.model, args.random_model) as model:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "octavo.entrypoints.openai.api_server", "--model", model,
                   "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
                   "--served-model-name", args.random_model or os.path.basename(model),
                   *server_extra]
        server = subprocess.Popen(command)
        try:
            startup = wait_healthy(url, server, args.startup_timeout)
            print(f"serving_sweep.py: server healthy after {startup:.1f} s", flush=True)
            runs = []
            for rate in rates:
                run_args = argparse.Namespace(
                    base_url=url, model=None, api_key=None, num_prompts=args.num_prompts,
                    input_len=args.input_len, output_len=args.output_len,
                    vocab_size=args.vocab_size, request_rate=rate,
                    max_concurrency=args.max_concurrency, ignore_eos=True, warmup=True,
                    seed=args.seed)
                result = asyncio.run(serving.run(run_args))
                print(serving.report(result), flush=True)
                runs.append(result)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()

    summary = {"commit": commit(), "model": args.random_model or args.model,
               "device": args.device, "server_flags": server_extra,
               "server_startup_seconds": startup, "runs": runs}
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    if any(r["failed"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
