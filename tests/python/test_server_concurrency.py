"""Many concurrent streams against one server, some clients hanging up midway: every other
stream completes with the right text, the cut ones are aborted, and the KV pool ends empty.
Also bench/serving.py's smoke run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from octavo import SamplingParams  # noqa: E402
from server_utils import ServerProcess, metric, read_metrics  # noqa: E402

NUM_STREAMS = 200
CUT_EVERY = 10  # every 10th client hangs up after two chunks
MAX_TOKENS = 16
PROMPTS = ["Paris is a city", "The quick brown", "Octavo splits the", "Le café est",
           "Continuous batching", "It is known for", "The cat sleeps", "blocks of sixteen"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def server(llama_dir):
    with ServerProcess(llama_dir) as process:
        yield process


async def _stream(client: httpx.AsyncClient, i: int) -> tuple:
    cut = i % CUT_EVERY == CUT_EVERY - 1
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0, "stream": True,
            # The cut streams would run long: they must still be running when cut.
            "max_tokens": 200 if cut else MAX_TOKENS, "ignore_eos": cut}
    text, finish_reason, chunks = "", None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                continue
            if cut and chunks == 2:
                return "cut", None, None  # leaving the block closes the connection
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                break
            choice = json.loads(line[len("data: "):])["choices"][0]
            text += choice["text"]
            finish_reason = choice["finish_reason"] or finish_reason
            chunks += 1
    return "done", text, finish_reason


async def _run_streams(url: str) -> list[tuple]:
    limits = httpx.Limits(max_connections=NUM_STREAMS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*[_stream(client, i) for i in range(NUM_STREAMS)])


def _wait_for_idle_pool(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        values = read_metrics(url)
        idle = (metric(values, "octavo:kv_cache_blocks_used") == 0
                and metric(values, "octavo:num_requests_running") == 0
                and metric(values, "octavo:num_requests_waiting") == 0)
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def test_concurrent_streams_with_clients_hanging_up(server, llama_dir):
    from octavo import LLM

    llm = LLM(model=llama_dir, device="cpu", kv_cache_memory_bytes=16 << 20)
    expected = {p: out.outputs[0].text for p, out in zip(
        PROMPTS, llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                              use_tqdm=False))}
    before = read_metrics(server.url)

    started = time.monotonic()
    results = asyncio.run(_run_streams(server.url))
    elapsed = time.monotonic() - started

    cut = [i for i, r in enumerate(results) if r[0] == "cut"]
    assert len(cut) == NUM_STREAMS // CUT_EVERY
    for i, (status, text, finish_reason) in enumerate(results):
        if status == "done":
            assert text == expected[PROMPTS[i % len(PROMPTS)]], f"stream {i}"
            assert finish_reason == "length"

    after = _wait_for_idle_pool(server.url)
    assert metric(after, "octavo:kv_cache_blocks_used") == 0, "KV blocks leaked"
    assert metric(after, "octavo:num_requests_running") == 0
    assert metric(after, "octavo:num_requests_waiting") == 0
    aborted = (metric(after, "octavo:request_success_total", finished_reason="abort")
               - metric(before, "octavo:request_success_total", finished_reason="abort"))
    assert aborted == len(cut)
    # The cut streams stopped generating: far fewer tokens than their 200 each.
    generated = (metric(after, "octavo:generation_tokens_total")
                 - metric(before, "octavo:generation_tokens_total"))
    assert generated < (NUM_STREAMS - len(cut)) * MAX_TOKENS + len(cut) * 100
    print(f"{NUM_STREAMS} streams in {elapsed:.1f} s")
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_client_that_gives_up_on_a_whole_response_aborts_it(server):
    before = read_metrics(server.url)
    body = {"prompt": PROMPTS[0], "max_tokens": 230, "ignore_eos": True, "n": 4,
            "temperature": 1.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/completions", json=body, timeout=0.5)
    after = _wait_for_idle_pool(server.url)
    assert metric(after, "octavo:kv_cache_blocks_used") == 0
    assert metric(after, "octavo:request_success_total", finished_reason="abort") == metric(
        before, "octavo:request_success_total", finished_reason="abort") + 1
    generated = (metric(after, "octavo:generation_tokens_total")
                 - metric(before, "octavo:generation_tokens_total"))
    assert generated < 4 * 230


def test_bench_serving_smoke(server, tmp_path):
    result_path = tmp_path / "result.json"
    command = [sys.executable, os.path.join(REPO, "bench", "serving.py"),
               "--base-url", server.url, "--num-prompts", "24", "--input-len", "24",
               "--output-len", "8", "--request-rate", "200", "--seed", "3",
               "--result-json", str(result_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(result_path.read_text())
    assert result["completed"] == 24 and result["failed"] == 0
    assert result["total_input_tokens"] == 24 * 24
    assert result["total_output_tokens"] == 24 * 8
    assert result["output_throughput"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = result[name]
        assert 0 < stats["p50"] <= stats["p99"], name
    assert "Output token throughput" in run.stdout
