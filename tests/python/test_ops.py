"""The CPU reference ops through the bindings: results and error paths."""

import numpy as np
import pytest

from octavo import _C


def test_copy_blocks_copies_every_layer_and_nothing_else():
    rng = np.random.default_rng(0)
    num_layers, num_blocks = 3, 8
    cache = rng.standard_normal((num_layers, num_blocks, 2, 2, 4, 8)).astype(np.float32)
    original = cache.copy()
    copies = np.array([[1, 5], [2, 6]], dtype=np.int32)
    _C.ops.copy_blocks(cache, copies, num_layers, num_blocks)
    for src, dst in copies:
        np.testing.assert_array_equal(cache[:, dst], original[:, src])
    untouched = [b for b in range(num_blocks) if b not in copies[:, 1]]
    np.testing.assert_array_equal(cache[:, untouched], original[:, untouched])


def test_copy_blocks_rejects_out_of_range_block():
    cache = np.zeros((1, 4, 2, 1, 4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="outside the pool of 4 blocks"):
        _C.ops.copy_blocks(cache, np.array([[0, 4]], dtype=np.int32), 1, 4)


def test_copy_blocks_rejects_shape_that_does_not_split():
    cache = np.zeros((10,), dtype=np.float32)
    with pytest.raises(ValueError, match="does not split"):
        _C.ops.copy_blocks(cache, np.zeros((0, 2), dtype=np.int32), 3, 4)


def _decode_batch(rng, context_lens, heads=4, kv_heads=2, head_dim=8, block=4):
    blocks = [(c + block - 1) // block for c in context_lens]
    cache = rng.standard_normal((sum(blocks), 2, kv_heads, block, head_dim)).astype(np.float32)
    tables = np.zeros((len(context_lens), max(blocks)), dtype=np.int32)
    first = 0
    for r, n in enumerate(blocks):
        tables[r, :n] = np.arange(first, first + n)
        first += n
    q = rng.standard_normal((len(context_lens), heads * head_dim)).astype(np.float32)
    return (q, cache, np.zeros_like(q), np.arange(len(context_lens) + 1, dtype=np.int32),
            np.asarray(context_lens, dtype=np.int32), tables, None, heads, kv_heads, head_dim,
            block, 0.3)


def test_paged_attention_decode_prefix_is_a_launch_hint_checked_against_the_rows():
    args = list(_decode_batch(np.random.default_rng(2), [5, 17, 9]))
    args[3] = np.array([0, 1, 2, 6], dtype=np.int32)  # the third request: a 4-token chunk
    args[0] = np.random.default_rng(3).standard_normal((6, 4 * 8)).astype(np.float32)
    args[2] = np.zeros_like(args[0])
    _C.ops.paged_attention(*args)
    plain = args[2].copy()
    _C.ops.paged_attention(*args, num_decode_prefix=2)
    np.testing.assert_array_equal(args[2], plain)
    with pytest.raises(ValueError, match="request 2 of the decode prefix of 3"):
        _C.ops.paged_attention(*args, num_decode_prefix=3)
    with pytest.raises(ValueError, match="num_decode_prefix 4 is outside"):
        _C.ops.paged_attention(*args, num_decode_prefix=4)


def test_paged_attention_request_order_is_a_launch_hint_checked_as_a_permutation():
    args = _decode_batch(np.random.default_rng(1), [5, 17, 9])
    _C.ops.paged_attention(*args)
    in_index_order = args[2].copy()
    _C.ops.paged_attention(*args, request_order=np.array([1, 2, 0], dtype=np.int32))
    np.testing.assert_array_equal(args[2], in_index_order)
    for bad, message in (([1, 1, 0], r"request_order\[1\] is 1"),
                         ([0, 3, 1], r"request_order\[1\] is 3.*permutation of \[0, 3\)")):
        with pytest.raises(ValueError, match=message):
            _C.ops.paged_attention(*args, request_order=np.array(bad, dtype=np.int32))
    with pytest.raises(ValueError, match="request_order"):
        _C.ops.paged_attention(*args, request_order=np.array([0, 1], dtype=np.int32))
