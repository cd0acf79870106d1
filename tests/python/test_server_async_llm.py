"""AsyncLLM, the server's engine: asyncio streams over the C++ AsyncEngine, equal to LLM's
outputs; cancellation aborts and frees the KV blocks; delta outputs never take text back."""

from __future__ import annotations

import asyncio
import time

import pytest

from octavo import SamplingParams
from octavo.async_llm import AsyncLLM, EngineDeadError, RequestOutputKind
from octavo.engine_core import EngineArgs

PROMPTS = ["Paris is a", "The quick brown fox", "Continuous batching admits new requests"]


@pytest.fixture(scope="module")
def llm(llama_dir):
    from octavo import LLM

    return LLM(model=llama_dir, device="cpu", kv_cache_memory_bytes=16 << 20)


@pytest.fixture(scope="module")
def async_llm(llama_dir):
    engine = AsyncLLM(EngineArgs(model=llama_dir, device="cpu",
                                 kv_cache_memory_bytes=16 << 20))
    yield engine
    engine.shutdown()


def letter_bias(tokenizer) -> dict[int, float]:
    # The random model emits partial UTF-8 bytes unless pushed towards letters.
    return {i: 10.0 for i in range(len(tokenizer)) if tokenizer.decode([i]) in set("abcdef ")}


async def collect(async_llm, prompt, params, request_id, kind=RequestOutputKind.CUMULATIVE):
    return [out async for out in async_llm.generate(prompt, params, request_id, output_kind=kind)]


def run(coroutine):
    return asyncio.run(coroutine)


def wait_until_idle(async_llm, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = async_llm.stats()
        if (async_llm.engine.num_unfinished() == 0
                and stats.num_free_kv_blocks == stats.num_kv_blocks) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_concurrent_generates_equal_llm_generate(async_llm, llm):
    params = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=12, logprobs=2)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)

    async def main():
        runs = [collect(async_llm, p, params, f"r{i}")
                for i in range(4) for p in PROMPTS]
        return await asyncio.gather(*runs)

    results = run(main())
    for i, outputs in enumerate(results):
        final = outputs[-1]
        want = expected[i % len(PROMPTS)]
        assert final.finished and all(not o.finished for o in outputs[:-1])
        assert final.prompt_token_ids == want.prompt_token_ids
        for got, ref in zip(final.outputs, want.outputs):
            assert got.token_ids == ref.token_ids
            assert got.text == ref.text
            assert got.cumulative_logprob == pytest.approx(ref.cumulative_logprob, abs=1e-4)
        # Cumulative outputs: several, each longer than the one before.
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert len(lengths) > 1 and all(a < b for a, b in zip(lengths, lengths[1:])), lengths
        assert final.metrics.first_token_time >= final.metrics.arrival_time
        assert final.metrics.num_generation_tokens == sum(len(o.token_ids) for o in final.outputs)


@pytest.mark.parametrize("include_stop", [False, True])
def test_delta_outputs_add_up_and_never_take_back_a_stop_string(async_llm, llm, include_stop):
    bias = letter_bias(llm.get_tokenizer())
    base = dict(temperature=1.0, seed=3, max_tokens=40, logit_bias=bias)
    full = llm.generate(PROMPTS[0], SamplingParams(**base), use_tqdm=False)[0].outputs[0].text
    stop = full[20:24]
    params = SamplingParams(**base, stop=[stop], include_stop_str_in_output=include_stop)
    expected = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert expected.finish_reason == "stop"

    deltas = run(collect(async_llm, PROMPTS[0], params, "d", RequestOutputKind.DELTA))
    # Deltas only append: had one shown the start of the stop string (which the match then cuts
    # off), the joined text would hold it.
    assert "".join(c.text for d in deltas for c in d.outputs) == expected.text
    assert [t for d in deltas for c in d.outputs for t in c.token_ids] == expected.token_ids
    assert len(deltas) > 2
    assert deltas[-1].finished and deltas[-1].outputs[-1].finish_reason == "stop"
    assert all(not d.finished for d in deltas[:-1])


def test_final_only_yields_once(async_llm, llm):
    params = SamplingParams(temperature=0, max_tokens=8)
    outputs = run(collect(async_llm, PROMPTS[1], params, "f", RequestOutputKind.FINAL_ONLY))
    assert len(outputs) == 1 and outputs[0].finished
    expected = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    assert outputs[0].outputs[0].token_ids == expected.outputs[0].token_ids


def test_cancelling_a_consumer_aborts_its_request(async_llm):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def consume(seen: asyncio.Event):
        async for _ in async_llm.generate(PROMPTS[2], params, "cancel-me"):
            seen.set()

    async def main():
        seen = asyncio.Event()
        task = asyncio.ensure_future(consume(seen))
        await seen.wait()
        assert async_llm.stats().num_free_kv_blocks < async_llm.stats().num_kv_blocks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    stats = wait_until_idle(async_llm)
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert async_llm.engine.num_unfinished() == 0


def test_leaving_the_loop_early_aborts_the_request(async_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=200, ignore_eos=True)

    async def main():
        outputs = async_llm.generate(PROMPTS[0], params, "early")
        async for output in outputs:
            if sum(len(c.token_ids) for c in output.outputs) >= 6:
                break
        await outputs.aclose()

    run(main())
    stats = wait_until_idle(async_llm)
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_refused_requests_raise_value_error_at_once(async_llm):
    too_long = list(range(5, 5 + 300))
    with pytest.raises(ValueError, match="256"):
        run(collect(async_llm, too_long, SamplingParams(max_tokens=4), "long"))
    with pytest.raises(ValueError, match="vocabulary"):
        run(collect(async_llm, [1, 100000], SamplingParams(max_tokens=4), "vocab"))
    with pytest.raises(ValueError, match="best_of"):
        run(collect(async_llm, PROMPTS[0], SamplingParams(n=1, best_of=2), "bo",
                    RequestOutputKind.DELTA))
    # The engine still runs.
    outputs = run(collect(async_llm, PROMPTS[0], SamplingParams(max_tokens=2), "after"))
    assert outputs[-1].finished


def test_shutdown_ends_running_requests(llama_dir):
    engine = AsyncLLM(EngineArgs(model=llama_dir, device="cpu", kv_cache_memory_bytes=8 << 20))
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        outputs = engine.generate(PROMPTS[0], params, "running")
        await outputs.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in outputs:
                pass
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0], params, "late")

    run(main())
    assert engine.errored
    engine.shutdown()  # idempotent
