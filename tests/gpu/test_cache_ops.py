"""copy_blocks on the GPU equals the CPU reference, on random caches of several shapes and dtypes."""

import numpy as np
import pytest
import torch

from octavo import _C


def _random_copies(rng, num_blocks, num_copies):
    blocks = rng.permutation(num_blocks)[: 2 * num_copies]
    return np.ascontiguousarray(blocks.reshape(num_copies, 2).astype(np.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "num_layers,num_blocks,kv_heads,block_size,head_dim,num_copies",
    [(1, 4, 1, 16, 64, 1), (2, 64, 8, 16, 128, 17), (28, 33, 8, 32, 128, 16), (3, 300, 2, 16, 80, 100)],
)
def test_copy_blocks_matches_cpu(dtype, num_layers, num_blocks, kv_heads, block_size, head_dim, num_copies):
    rng = np.random.default_rng(num_blocks * 1000 + num_copies)
    shape = (num_layers, num_blocks, 2, kv_heads, block_size, head_dim)
    cache_cpu = torch.randn(shape, dtype=torch.float32).to(dtype)
    copies = _random_copies(rng, num_blocks, num_copies)

    cache_gpu = cache_cpu.cuda()
    _C.ops.copy_blocks(cache_gpu, torch.from_numpy(copies).cuda(), num_layers, num_blocks)
    torch.cuda.synchronize()

    expected = cache_cpu.view(torch.int16 if dtype != torch.float32 else torch.int32).numpy().copy()
    _C.ops.copy_blocks(expected, copies, num_layers, num_blocks)
    got = cache_gpu.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32).numpy()
    np.testing.assert_array_equal(got, expected)
    # Blocks that were neither source nor destination are untouched.
    untouched = np.setdiff1d(np.arange(num_blocks), copies[:, 1])
    original = cache_cpu.view(torch.int16 if dtype != torch.float32 else torch.int32).numpy()
    np.testing.assert_array_equal(got[:, untouched], original[:, untouched])


def test_copy_blocks_bandwidth_report():
    """Times a copy-on-write burst (not a pass/fail figure): 256 pairs x 28 layers of 64 KiB."""
    num_layers, num_blocks = 28, 1024
    cache = torch.randn((num_layers, num_blocks, 2, 8, 16, 128), device="cuda").to(torch.bfloat16)
    copies = torch.from_numpy(_random_copies(np.random.default_rng(0), num_blocks, 256)).cuda()
    for _ in range(3):
        _C.ops.copy_blocks(cache, copies, num_layers, num_blocks)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    repeats = 50
    for _ in range(repeats):
        _C.ops.copy_blocks(cache, copies, num_layers, num_blocks)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    moved = 2 * 256 * num_layers * cache[0, 0].numel() * 2
    print(f"copy_blocks: {seconds * 1e6:.1f} us, {moved / seconds / 1e12:.2f} TB/s (read + write)")
