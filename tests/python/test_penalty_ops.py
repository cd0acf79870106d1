"""The penalty ops and prompt-token logprobs on fixed logits, against plain numpy references of
vLLM's definitions (the CPU backend is the oracle the GPU kernels are held to)."""

from __future__ import annotations

import numpy as np
import pytest

from octavo import _C

from references import apply_penalties as reference_penalties

PROMPT_BIT = 1 << 30


def count_entries(slot, prompt, output):
    entries = [(slot, t, PROMPT_BIT) for t in sorted(set(prompt))]
    entries += [(slot, t, 1) for t in output]
    return np.array(entries, dtype=np.int32).reshape(-1, 3)


@pytest.mark.parametrize("repetition, frequency, presence", [
    (1.0, 0.0, 0.0), (1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.9, 0.0), (1.0, 0.0, -1.5),
    (1.8, -0.4, 0.6),
])
def test_penalties_match_the_reference(repetition, frequency, presence):
    rng = np.random.default_rng(0)
    vocab, slots = 257, 5
    counts = np.full((slots, vocab), 12345, dtype=np.int32)  # garbage: the reset must clear it
    rows = []
    for slot in (3, 0, 4):
        prompt = rng.integers(0, vocab, size=int(rng.integers(1, 40))).tolist()
        output = rng.integers(0, vocab, size=int(rng.integers(0, 60))).tolist()
        rows.append((slot, prompt, output))
    resets = np.array([slot for slot, _, _ in rows], dtype=np.int32)
    entries = np.concatenate([count_entries(*row) for row in rows])
    _C.ops.update_token_counts(counts, resets, entries)

    logits = rng.normal(0, 3, size=(4, vocab)).astype(np.float32)
    slots_of_rows = np.array([3, -1, 0, 4], dtype=np.int32)  # row 1 has no penalties
    packed = _C.ops.pack_penalty_rows(slots_of_rows, np.full(4, repetition, np.float32),
                                      np.full(4, frequency, np.float32),
                                      np.full(4, presence, np.float32))
    expected = logits.copy()
    for row, slot in enumerate(slots_of_rows):
        if slot >= 0:
            _, prompt, output = next(r for r in rows if r[0] == slot)
            expected[row] = reference_penalties(logits[row], prompt, output, repetition,
                                                frequency, presence)
    _C.ops.apply_penalties(logits, counts, packed)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_counts_kept_incrementally_equal_a_rebuild():
    rng = np.random.default_rng(1)
    vocab = 100
    prompt = rng.integers(0, vocab, size=30).tolist()
    output = rng.integers(0, vocab, size=50).tolist()
    incremental = np.zeros((2, vocab), dtype=np.int32)
    _C.ops.update_token_counts(incremental, np.array([1], np.int32), count_entries(1, prompt, []))
    for start in range(0, len(output), 7):  # a few tokens per step, as the engine adds them
        _C.ops.update_token_counts(incremental, np.zeros(0, np.int32),
                                   count_entries(1, [], output[start:start + 7]))
    rebuilt = np.zeros((2, vocab), dtype=np.int32)
    _C.ops.update_token_counts(rebuilt, np.array([1], np.int32), count_entries(1, prompt, output))
    np.testing.assert_array_equal(incremental, rebuilt)
    assert rebuilt[1].sum() == PROMPT_BIT * len(set(prompt)) + len(output)


def test_count_entries_out_of_range_raise():
    counts = np.zeros((2, 10), dtype=np.int32)
    with pytest.raises(ValueError, match="outside the table of 2 slots x 10 tokens"):
        _C.ops.update_token_counts(counts, np.zeros(0, np.int32),
                                   np.array([[0, 10, 1]], dtype=np.int32))
    with pytest.raises(ValueError, match="reset slot 2"):
        _C.ops.update_token_counts(counts, np.array([2], np.int32), np.zeros((0, 3), np.int32))


def reference_token_logprobs(logits, targets, num_top, softcap=0.0):
    values = logits.astype(np.float64)
    if softcap:
        values = softcap * np.tanh(values / softcap)
    values = values.astype(np.float32).astype(np.float64)
    logprobs = values - (values.max(1, keepdims=True) +
                         np.log(np.exp(values - values.max(1, keepdims=True)).sum(1, keepdims=True)))
    rows = np.arange(len(targets))
    target_values = values[rows, targets]
    ranks = (values > target_values[:, None]).sum(1) + 1
    # Descending, ties to the lower id.
    order = np.lexsort((np.broadcast_to(np.arange(values.shape[1]), values.shape), -values))
    top = order[:, :num_top]
    return logprobs[rows, targets], ranks, top, np.take_along_axis(logprobs, top, 1)


@pytest.mark.parametrize("num_top, softcap", [(0, 0.0), (1, 0.0), (5, 0.0), (20, 0.0), (3, 2.5)])
def test_token_logprobs_match_the_reference(num_top, softcap):
    rng = np.random.default_rng(num_top)
    rows, vocab = 6, 301
    logits = rng.normal(0, 2, size=(rows, vocab)).astype(np.float32)
    logits[2, :] = np.round(logits[2, :])  # many ties: ranks count strictly larger logits only
    targets = rng.integers(0, vocab, size=rows).astype(np.int32)
    targets[0] = int(np.argmax(logits[0]))  # rank 1
    out_lp = np.zeros(rows, np.float32)
    out_rank = np.zeros(rows, np.int32)
    top_ids = np.zeros((rows, num_top), np.int32)
    top_lp = np.zeros((rows, num_top), np.float32)
    before = logits.copy()
    _C.ops.token_logprobs(logits, targets, out_lp, out_rank, top_ids, top_lp, final_softcap=softcap)
    np.testing.assert_array_equal(logits, before)
    lp, rank, ids, ids_lp = reference_token_logprobs(logits, targets, num_top, softcap)
    np.testing.assert_allclose(out_lp, lp, atol=1e-5)
    np.testing.assert_array_equal(out_rank, rank)
    assert out_rank[0] == 1
    np.testing.assert_array_equal(top_ids, ids)
    np.testing.assert_allclose(top_lp, ids_lp, atol=1e-5)


def test_token_logprobs_rejects_a_target_outside_the_vocabulary():
    logits = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="target 8 is outside the vocabulary of 8"):
        _C.ops.token_logprobs(logits, np.array([8], np.int32), np.zeros(1, np.float32),
                              np.zeros(1, np.int32))
