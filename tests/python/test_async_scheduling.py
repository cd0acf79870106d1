"""Async scheduling: step N + 1 is scheduled and launched before step N's tokens reach the host, its
decode rows reading their input tokens on the device. It must not change any output: the same
requests give the same tokens, logprobs and finish reasons with it on and off, through chunked
prefill, preemption, stops, forks, beams, penalties and aborts."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from octavo import _C  # noqa: E402
from octavo.engine_core import EngineArgs, create_engine  # noqa: E402

EOS = 1  # the tiny checkpoints' eos_token_id


def params(**fields) -> _C.SamplingParams:
    p = _C.SamplingParams()
    p.max_tokens = 12
    for name, value in fields.items():
        setattr(p, name, value)
    if fields.get("logprobs") is not None:
        p.want_logprobs = True
    return p


def mixed_requests(stop_token: int):
    """(prompt, params) pairs covering every kind of row a step can hold."""
    return [
        (list(range(3, 40)), params(temperature=0.0, logprobs=3)),
        (list(range(50, 61)), params(temperature=1.0, seed=11, top_p=0.9, max_tokens=20)),
        (list(range(7, 90)), params(temperature=0.8, seed=12, top_k=20, min_tokens=4)),
        # Stops on a token the greedy run produces mid-way, or on EOS made likely by a bias.
        (list(range(3, 40)), params(temperature=0.0, stop_token_ids=[stop_token], max_tokens=30)),
        (list(range(100, 117)), params(temperature=1.0, seed=13, logit_bias=[(EOS, 4.0)],
                                       max_tokens=40)),
        (list(range(20, 45)), params(temperature=0.0, prompt_logprobs=2, logprobs=1)),
        (list(range(60, 66)), params(temperature=1.0, seed=14, repetition_penalty=1.3,
                                     presence_penalty=0.5)),
        # Greedy under strong penalties: a token counted wrongly on the device changes its choice.
        (list(range(8, 20)), params(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.5,
                                    max_tokens=30, ignore_eos=True)),
        (list(range(5, 30)), params(n=3, temperature=1.0, seed=15)),
        (list(range(70, 95)), params(beam_width=2, temperature=0.0, max_tokens=6)),
        (list(range(120, 200)), params(temperature=0.0, ignore_eos=True, max_tokens=25)),
        (list(range(30, 34)), params(temperature=1.0, seed=16, max_tokens=1)),
        (list(range(200, 231)), params(temperature=0.0, ignore_eos=True, max_tokens=17)),
    ]


def run(model_dir, requests, async_scheduling, num_kv_blocks=None, late_from=None):
    """Every request's sequences: (group, index) -> (tokens, logprobs, finish, prompt logprobs).
    Requests from `late_from` on are added after the third step, while steps are in flight."""
    engine, _, _ = create_engine(EngineArgs(
        model=model_dir, dtype="float32", block_size=8, max_num_seqs=6, max_model_len=128,
        max_num_batched_tokens=48, num_gpu_blocks_override=num_kv_blocks,
        enable_prefix_caching=True, async_scheduling=async_scheduling))
    late_from = len(requests) if late_from is None else late_from
    for prompt, p in requests[:late_from]:
        engine.add_request(prompt, p)
    sequences = {}
    steps = 0
    while engine.has_unfinished() or late_from < len(requests):
        if steps == 3:
            for prompt, p in requests[late_from:]:
                engine.add_request(prompt, p)
            late_from = len(requests)
        for out in engine.step():
            tokens, logprobs, finish, prompt_lps = sequences.setdefault(
                (out.group_id, out.index), ([], [], [None], []))
            tokens += out.new_token_ids
            logprobs += [(lp.logprob, lp.rank, list(lp.top_ids)) for lp in out.new_logprobs]
            prompt_lps += [(lp.logprob, lp.rank, list(lp.top_ids)) for lp in out.new_prompt_logprobs]
            if out.finished:
                finish[0] = (out.finish_reason, out.stop_token_id, out.error)
        steps += 1
    stats = engine.stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, "blocks leaked"
    return sequences, stats


def assert_same_outputs(expected, actual):
    assert expected.keys() == actual.keys()
    for key, (tokens, logprobs, finish, prompt_lps) in expected.items():
        got_tokens, got_logprobs, got_finish, got_prompt_lps = actual[key]
        assert got_tokens == tokens, key
        assert got_finish == finish, key
        for (a, rank_a, top_a), (b, rank_b, top_b) in zip(got_logprobs + got_prompt_lps,
                                                           logprobs + prompt_lps, strict=True):
            assert a == pytest.approx(b, abs=1e-5) and rank_a == rank_b and top_a == top_b, key


@pytest.fixture(scope="module")
def stop_token(llama_dir):
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32"))
    engine.add_request(list(range(3, 40)), params(temperature=0.0, max_tokens=8, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens[5]


@pytest.mark.parametrize("num_kv_blocks", [None, 24], ids=["roomy", "preempting"])
@pytest.mark.parametrize("late", [False, True], ids=["at-once", "late-arrivals"])
def test_async_scheduling_changes_no_output(llama_dir, stop_token, num_kv_blocks, late):
    requests = mixed_requests(stop_token)
    late_from = len(requests) // 2 if late else None
    expected, sync_stats = run(llama_dir, requests, False, num_kv_blocks, late_from)
    actual, async_stats = run(llama_dir, requests, True, num_kv_blocks, late_from)
    assert_same_outputs(expected, actual)
    assert sync_stats.async_steps == 0
    assert async_stats.async_steps > async_stats.num_steps // 3, "steps were not overlapped"
    if num_kv_blocks:
        assert async_stats.num_preemptions > 0 and sync_stats.num_preemptions > 0
    # The stop token and the EOS bias end their sequences early in both runs.
    finishes = [finish[0] for finish in (v[2] for v in expected.values())]
    assert ("stop", stop_token, "") in finishes
    assert ("stop", -1, "") in finishes


def test_plain_decode_overlaps_every_step(llama_dir):
    requests = [(list(range(3 + i, 20 + i)), params(temperature=0.0, ignore_eos=True,
                                                    max_tokens=10 + i)) for i in range(4)]
    expected, _ = run(llama_dir, requests, False)
    actual, stats = run(llama_dir, requests, True)
    assert_same_outputs(expected, actual)
    # One step (the first) runs alone; every later one is launched behind its predecessor, and
    # a sequence that ends by length is never scheduled past its last token.
    assert stats.async_steps == stats.num_steps - 1
    assert stats.generation_tokens == sum(10 + i for i in range(4))


def test_abort_while_a_step_is_in_flight_frees_everything(llama_dir):
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32", block_size=8,
                                            async_scheduling=True))
    total = engine.stats().num_kv_blocks
    first = engine.add_request(list(range(3, 30)), params(temperature=0.0, ignore_eos=True,
                                                          max_tokens=50))
    second = engine.add_request(list(range(40, 52)), params(temperature=0.0, ignore_eos=True,
                                                            max_tokens=20))
    seen = {first: 0, second: 0}
    for _ in range(4):
        for out in engine.step():
            seen[out.id] += len(out.new_token_ids)
    engine.abort(first)  # its next token is being computed: it is dropped, never reported
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.id, []).append(out)
    assert [o.finish_reason for o in outputs[first]] == ["abort"]
    assert outputs[first][0].new_token_ids == []
    assert seen[second] + sum(len(o.new_token_ids) for o in outputs[second]) == 20
    assert engine.stats().num_free_kv_blocks == total


def test_deferred_token_ids_read_the_previous_steps_samples():
    import numpy as np

    table = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    deferred = np.array([3, 0, 9], np.int32)  # 9 is outside the vocabulary: a flagged row
    out = np.full((4, 4), -1.0, np.float32)
    _C.ops.embedding(np.array([2, -1, -2, -3], np.int32), table, out, 1.0,
                     deferred_token_ids=deferred)
    np.testing.assert_array_equal(out, np.stack([table[2], table[3], table[0], np.zeros(4)]))
    with pytest.raises(ValueError, match="defers to entry 3 of 3"):
        _C.ops.embedding(np.array([-4], np.int32), table, out[:1], 1.0,
                         deferred_token_ids=deferred)


def test_server_flag_and_the_default_per_backend(llama_dir):
    pytest.importorskip("fastapi")
    from octavo.entrypoints.openai import api_server

    parser = api_server.make_arg_parser()
    args = lambda *flags: api_server.engine_args_from_cli(parser.parse_args(["--model", "m", *flags]))
    assert args().async_scheduling is None
    assert args("--async-scheduling").async_scheduling is True
    assert args("--no-async-scheduling").async_scheduling is False
    # Unset, it follows the backend: the CPU's ops finish on return, so it stays off there.
    engine, _, _ = create_engine(EngineArgs(model=llama_dir, dtype="float32"))
    assert engine.config.async_scheduling is False
