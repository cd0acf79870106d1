"""octavo._C.AsyncEngine (the engine loop on its own thread) through its Python binding:
concurrent submission from Python threads gives LLM.generate's greedy tokens, outputs stream in
step order, abort and shutdown end requests with 'abort' outputs and free their blocks, bad input
raises at once, and blocking calls release the GIL."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

pytest.importorskip("torch")

from octavo import LLM, SamplingParams, _C  # noqa: E402
from octavo.engine_core import EngineArgs, create_engine, to_cpp_sampling_params  # noqa: E402

PATIENCE = 30.0  # seconds; a deadline instead of a hang


def make_async_engine(model_dir: str, **engine_kwargs) -> "_C.AsyncEngine":
    """An AsyncEngine as LLM's engine gets it."""
    engine, _, _ = create_engine(EngineArgs(model=model_dir, dtype="float32", **engine_kwargs),
                                 asynchronous=True)
    return engine


def greedy(max_tokens: int) -> "_C.SamplingParams":
    return to_cpp_sampling_params(
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


class Collector:
    """Everything get_outputs returned, by request, checked for order as it arrives."""

    def __init__(self):
        self.tokens = defaultdict(list)
        self.finished = defaultdict(list)  # request -> finish reasons of its final outputs
        self.after_finish = []

    def add(self, outputs):
        for out in outputs:
            if self.finished[out.group_id]:
                self.after_finish.append(out.group_id)
            self.tokens[out.group_id].extend(out.new_token_ids)
            if out.finished:
                self.finished[out.group_id].append(out.finish_reason)

    def drain(self, engine, ids):
        """Reads outputs until every request in `ids` has finished."""
        deadline = time.monotonic() + PATIENCE
        while not all(self.finished[i] for i in ids):
            assert time.monotonic() < deadline, "requests did not finish"
            self.add(engine.get_outputs(0.05))


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = make_async_engine(llama_dir, block_size=8)
    yield engine
    engine.shutdown(finish_in_flight=False)


def test_concurrent_submission_matches_generate(llama_dir, engine):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 320, size=1 + (7 * i) % 29).tolist() for i in range(24)]
    max_tokens = [1 + i % 12 for i in range(24)]
    llm = LLM(llama_dir, dtype="float32", block_size=8)
    expected = [out.outputs[0].token_ids for out in llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens],
        use_tqdm=False)]

    ids = [None] * len(prompts)
    errors = []

    def submit(indices):
        try:
            for i in indices:
                ids[i] = engine.add_request(prompts[i], greedy(max_tokens[i]))
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(range(t, len(prompts), 6),)) for t in range(6)]
    collector = Collector()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        collector.add(engine.get_outputs(0.01))
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(ids)) == len(ids)
    collector.drain(engine, ids)

    for i, request in enumerate(ids):
        assert collector.tokens[request] == expected[i], f"prompt {i}"
        assert collector.finished[request] == ["length"]
    assert not collector.after_finish
    assert engine.num_unfinished() == 0
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_abort_frees_blocks(engine):
    total = engine.stats().num_kv_blocks
    request = engine.add_request(list(range(3, 40)), greedy(200))
    other = engine.add_request([5, 6, 7], greedy(4))
    collector = Collector()
    deadline = time.monotonic() + PATIENCE
    while not collector.tokens[request]:
        assert time.monotonic() < deadline
        collector.add(engine.get_outputs(0.05))
    assert engine.stats().num_free_kv_blocks < total
    engine.abort(request)
    collector.drain(engine, [request, other])
    assert collector.finished[request] == ["abort"]
    assert 0 < len(collector.tokens[request]) < 200
    assert collector.finished[other] == ["length"] and len(collector.tokens[other]) == 4
    engine.abort(request)  # finished: ignored
    engine.abort(123456789)  # unknown: ignored
    assert engine.get_outputs(0.0) == []
    assert engine.num_unfinished() == 0
    assert engine.stats().num_free_kv_blocks == total


def test_parallel_sampling_outputs_share_the_request_id(engine):
    params = to_cpp_sampling_params(SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=5,
                                                   ignore_eos=True))
    request = engine.add_request([9, 10, 11], params)
    per_sequence = defaultdict(list)
    finished = []
    deadline = time.monotonic() + PATIENCE
    while engine.num_unfinished() > 0 or len(finished) < 3:
        assert time.monotonic() < deadline
        for out in engine.get_outputs(0.05):
            assert out.group_id == request
            per_sequence[out.index].extend(out.new_token_ids)
            if out.finished:
                finished.append(out.index)
    assert sorted(finished) == [0, 1, 2]
    assert all(len(tokens) == 5 for tokens in per_sequence.values())


def test_invalid_requests_raise_at_once(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy(4))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([1, 320], greedy(4))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request([1] * 256, greedy(4))
    with pytest.raises(ValueError, match="timeout"):
        engine.get_outputs(-1.0)
    with pytest.raises(ValueError, match="timeout"):
        engine.get_outputs(math.nan)
    assert engine.num_unfinished() == 0
    assert engine.get_outputs(0.0) == []


def test_properties(engine):
    assert engine.spec.vocab_size == 320
    assert engine.config.block_size == 8
    assert engine.config.num_kv_blocks == engine.stats().num_kv_blocks


def test_blocking_calls_release_the_gil(engine):
    waiter = threading.Thread(target=engine.get_outputs, args=(0.5,))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.05)  # returns on time only if get_outputs let go of the GIL
    assert time.monotonic() - start < 0.3
    waiter.join()


def test_shutdown_finishing_in_flight(llama_dir):
    engine = make_async_engine(llama_dir)
    ids = [engine.add_request([3 + i, 4, 5], greedy(6)) for i in range(5)]
    engine.shutdown(finish_in_flight=True)
    assert engine.num_unfinished() == 0
    collector = Collector()
    collector.add(engine.get_outputs(0.0))
    for request in ids:
        assert collector.finished[request] == ["length"]
        assert len(collector.tokens[request]) == 6
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request([1, 2], greedy(2))
    start = time.monotonic()
    assert engine.get_outputs(10.0) == []  # a stopped engine does not wait
    assert time.monotonic() - start < 5.0
    engine.shutdown()  # idempotent


def test_shutdown_aborts_in_flight(llama_dir):
    engine = make_async_engine(llama_dir)
    ids = [engine.add_request(list(range(3, 10 + i)), greedy(240)) for i in range(5)]
    engine.shutdown(finish_in_flight=False)
    collector = Collector()
    collector.add(engine.get_outputs(0.0))
    for request in ids:
        assert collector.finished[request] == ["abort"]
        assert len(collector.tokens[request]) < 240
    assert engine.num_unfinished() == 0
    stats = engine.stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
