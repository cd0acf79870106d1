"""Online serving benchmark: a load generator against a running OpenAI-compatible server.

    python -m octavo.entrypoints.openai.api_server --model DIR --port 8000 &
    python bench/serving.py --base-url http://127.0.0.1:8000 --num-prompts 256 \
        --input-len 100:1024 --output-len 100:1024 --request-rate inf --vocab-size 151936

Each request is a streamed /v1/completions call with a prompt of random token ids and a fixed
output length (ignore_eos, as BENCH.md's workloads run every output to its length). Lengths are
drawn as BENCH.md prescribes: random.Random(seed), (randint(in), randint(out)) per request.
Requests arrive all at once (--request-rate inf) or as a Poisson process at the given rate,
optionally capped at --max-concurrency in flight. Reports request and token throughput and the
mean and percentiles of TTFT (time to first token), TPOT (time per output token after the first,
per request), ITL (gap between streamed chunks) and end-to-end latency; --result-json saves them
with the run's settings. Standard library only, so it runs wherever the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
import urllib.parse
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import commit, parse_range  # noqa: E402  (standard library only at import)

# Token ids for prompts when --vocab-size is not given: the server's own tokenization of this.
_TEXT_POOL = ("Paris is a city in France. It is known for the Eiffel Tower and its museums. "
              "The quick brown fox jumps over the lazy dog while the cat sleeps. Continuous "
              "batching admits new requests at every step of the engine.")


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    chunk_gaps: list[float] = field(default_factory=list)


class HTTPError(Exception):
    pass


async def _http(url: str, method: str, path: str, body: bytes | None, headers: dict):
    """One HTTP/1.1 request on its own connection; returns (status, reader, writer, chunked)."""
    parsed = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port or 80,
                                                   limit=1 << 22)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parsed.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    response_headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        response_headers[key.strip().lower()] = value.strip()
    chunked = response_headers.get("transfer-encoding", "").lower() == "chunked"
    return status, reader, writer, chunked, response_headers


async def _body_chunks(reader: asyncio.StreamReader, chunked: bool, headers: dict):
    if not chunked:
        length = headers.get("content-length")
        yield await (reader.readexactly(int(length)) if length else reader.read())
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def http_json(url: str, method: str, path: str, payload=None, api_key=None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = json.dumps(payload).encode() if payload is not None else None
    status, reader, writer, chunked, response_headers = await _http(url, method, path, body,
                                                                    headers)
    try:
        data = b"".join([c async for c in _body_chunks(reader, chunked, response_headers)])
    finally:
        writer.close()
    if status != 200:
        raise HTTPError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
    return json.loads(data)


async def stream_completion(url: str, payload: dict, api_key, result: RequestResult) -> None:
    """Sends one streamed completion and records its timings into `result`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    last = None
    writer = None
    try:
        status, reader, writer, chunked, response_headers = await _http(
            url, "POST", "/v1/completions", json.dumps(payload).encode(), headers)
        if status != 200:
            body = b"".join([c async for c in _body_chunks(reader, chunked, response_headers)])
            result.error = f"HTTP {status}: {body[:300]!r}"
            return
        buffer = b""
        async for data in _body_chunks(reader, chunked, response_headers):
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                message = event[len(b"data: "):]
                if message == b"[DONE]":
                    result.latency = time.perf_counter() - start
                    if payload["ignore_eos"] and result.output_len != payload["max_tokens"]:
                        result.error = (f"{result.output_len} output tokens where "
                                        f"{payload['max_tokens']} were asked")
                    else:
                        result.success = True
                    return
                chunk = json.loads(message)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return
                now = time.perf_counter()
                usage = chunk.get("usage")
                if usage is not None:
                    result.output_len = usage["completion_tokens"]
                if chunk.get("choices"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.chunk_gaps.append(now - last)
                    last = now
        result.error = "the stream ended without [DONE]"
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        if writer is not None:
            writer.close()


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """Mean and percentiles (linear interpolation, numpy's default), times `scale`."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)) * scale

    return {"mean": statistics.fmean(values) * scale, "p50": at(0.5), "p90": at(0.9),
            "p99": at(0.99)}


async def run(args: argparse.Namespace) -> dict:
    url = args.base_url.rstrip("/")
    model = args.model or (await http_json(url, "GET", "/v1/models",
                                           api_key=args.api_key))["data"][0]["id"]
    lengths_rng = random.Random(args.seed)
    input_range, output_range = parse_range(args.input_len), parse_range(args.output_len)
    lengths = [(lengths_rng.randint(*input_range), lengths_rng.randint(*output_range))
               for _ in range(args.num_prompts)]
    ids_rng = random.Random(args.seed + 1)
    if args.vocab_size:
        pool = range(args.vocab_size)
    else:
        pool = sorted(set((await http_json(url, "POST", "/tokenize", {"prompt": _TEXT_POOL},
                                           api_key=args.api_key))["tokens"]))
    payloads = [{
        "model": model, "prompt": [ids_rng.choice(pool) for _ in range(prompt_len)],
        "max_tokens": output_len, "ignore_eos": args.ignore_eos, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    } for prompt_len, output_len in lengths]

    if args.warmup:
        warm = RequestResult(prompt_len=8)
        await stream_completion(url, {**payloads[0], "prompt": payloads[0]["prompt"][:8],
                                      "max_tokens": 4}, args.api_key, warm)
        if not warm.success:
            raise SystemExit(f"serving.py: the warm-up request failed: {warm.error}")

    results = [RequestResult(prompt_len=len(p["prompt"])) for p in payloads]
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    arrivals = random.Random(args.seed + 2)

    async def one(payload: dict, result: RequestResult) -> None:
        if limit is None:
            await stream_completion(url, payload, args.api_key, result)
            return
        async with limit:
            await stream_completion(url, payload, args.api_key, result)

    start = time.perf_counter()
    tasks = []
    for payload, result in zip(payloads, results):
        tasks.append(asyncio.ensure_future(one(payload, result)))
        if math.isfinite(args.request_rate):
            await asyncio.sleep(arrivals.expovariate(args.request_rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start

    done = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit(), "base_url": url,
        "model": model, "num_prompts": args.num_prompts, "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, "input_len": args.input_len,
        "output_len": args.output_len, "seed": args.seed, "ignore_eos": args.ignore_eos,
        "completed": len(done), "failed": len(failed), "duration": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles(tpots),
        "itl_ms": percentiles([gap for r in done for gap in r.chunk_gaps]),
        "e2el_ms": percentiles([r.latency for r in done]),
        "errors": sorted({r.error for r in failed})[:5],
    }


def report(result: dict) -> str:
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]

    def row(name: str, value) -> None:
        lines.append(f"{name:<44}{value:>16.2f}" if isinstance(value, float)
                     else f"{name:<44}{value:>16}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2el_ms", "E2EL")):
        lines.append("{:-^60}".format(f" {title} (ms) "))
        stats = result[key]
        for name in ("mean", "p50", "p90", "p99"):
            row(f"{name.capitalize() if name == 'mean' else name.upper()} {title} (ms):",
                float(stats[name]))
    if result["errors"]:
        lines.append("{:-^60}".format(" Errors "))
        lines.extend(result["errors"])
    lines.append("=" * 60)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--api-key", default=os.environ.get("OCTAVO_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="100:1024", help="N or LOW:HIGH (uniform)")
    parser.add_argument("--output-len", default="100:1024", help="N or LOW:HIGH (uniform)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="draw prompt ids from [0, N) (default: ids of a short text, "
                             "tokenized by the server)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight (default: no limit)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="run every output to its length (default on)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="send one short request first (default on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or not args.request_rate > 0:
        parser.error("--num-prompts must be >= 1 and --request-rate > 0")

    result = asyncio.run(run(args))
    print(report(result))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=2)
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
