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
