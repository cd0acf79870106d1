"""The engine driven directly (octavo._C.Engine through engine_core): abort, stats, block release."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from octavo import SamplingParams  # noqa: E402
from octavo.engine_core import EngineArgs, create_engine, to_cpp_sampling_params  # noqa: E402


def test_abort_frees_blocks_and_reports_abort(llama_dir):
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32", block_size=8,
                                            enable_prefix_caching=False))
    total = engine.stats().num_kv_blocks
    params = to_cpp_sampling_params(SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    a = engine.add_request(list(range(3, 30)), params)
    b = engine.add_request(list(range(3, 12)), params)
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 2
    assert engine.stats().num_free_kv_blocks < total
    engine.abort(a)
    outputs = engine.step()
    aborted = [o for o in outputs if o.id == a]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert all(o.id == b for o in outputs if o.id != a)
    engine.abort(a)  # already gone: ignored
    engine.abort(12345)  # unknown: ignored
    while engine.has_unfinished():
        for o in engine.step():
            assert o.id == b
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_kv_blocks == total
    assert stats.generation_tokens == 50 + 3
    assert stats.prompt_tokens == 27 + 9


def test_waiting_request_can_be_aborted(llama_dir):
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32", max_num_seqs=1,
                                            max_num_batched_tokens=64))
    params = to_cpp_sampling_params(SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    first = engine.add_request([5, 6, 7], params)
    second = engine.add_request([8, 9], params)
    engine.step()
    assert engine.stats().num_waiting == 1
    engine.abort(second)
    finished = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finished[o.id] = o.finish_reason
    assert finished == {first: "length", second: "abort"}
