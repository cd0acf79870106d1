"""octavo._C.KVCacheManager through the bindings: a thin check that the conversions work and the
behaviour the scheduler relies on shows through. The C++ tests (tests/cpp/test_kv_cache_*.cc) carry
the weight."""

import random

import pytest

from octavo import _C

BLOCK_SIZE = 16


def admit(manager, request, prompt, extra_key=0):
    prefix = manager.get_computed_blocks(prompt, extra_key)
    return manager.allocate_slots(request, prompt, len(prompt) - prefix.num_computed_tokens, prefix)


def test_allocate_and_slot_mapping():
    manager = _C.KVCacheManager(8, block_size=4)
    assert manager.block_size == 4 and manager.num_blocks == 8
    allocation = admit(manager, 1, list(range(6)))
    assert allocation.new_blocks == [0, 1] and allocation.copies == []
    assert manager.block_table(1) == [0, 1]
    assert manager.num_tokens(1) == 6
    assert manager.slot_mapping(1, 0, 6) == [0, 1, 2, 3, 4, 5]
    assert admit(manager, 2, [9] * 3).new_blocks == [2]
    assert manager.slot_mapping(2, 1, 2) == [9, 10]
    assert manager.num_free_blocks == 5
    assert manager.usage == pytest.approx(3 / 8)
    assert 1 in manager and 3 not in manager
    with pytest.raises(ValueError, match="outside its 3 reserved slots"):
        manager.slot_mapping(2, 2, 2)
    manager.check_invariants()


def test_fork_copy_on_write_and_free():
    manager = _C.KVCacheManager(8, block_size=BLOCK_SIZE)
    tokens = list(range(20))
    admit(manager, 1, tokens)
    manager.fork(1, 2)
    assert manager.block_table(2) == manager.block_table(1) == [0, 1]
    assert manager.block_pool.ref_count(1) == 2
    step = manager.allocate_slots(1, tokens + [7], 1)
    assert step.copies == [(1, 2)]
    assert step.new_blocks == [2]
    assert manager.block_table(1) == [0, 2]
    # The child is now the only holder of block 1: no copy.
    assert manager.allocate_slots(2, tokens + [8], 1).copies == []
    manager.free(1)
    manager.free(2)
    assert manager.num_free_blocks == 8
    with pytest.raises(ValueError, match="holds no blocks"):
        manager.free(2)
    manager.check_invariants()


def test_prefix_hit_is_capped_and_keyed():
    manager = _C.KVCacheManager(16, block_size=BLOCK_SIZE)
    prompt = list(range(48))
    admit(manager, 1, prompt, extra_key=5)
    manager.cache_blocks(1, prompt, 48)
    manager.free(1)
    assert manager.block_pool.num_evictable_blocks == 3
    # The whole prompt is cached, but its last token must be computed: 2 blocks, not 3.
    prefix = manager.get_computed_blocks(prompt, 5)
    assert prefix.num_computed_tokens == 32 and prefix.blocks == [0, 1]
    assert manager.get_computed_blocks(prompt, 6).num_computed_tokens == 0
    allocation = manager.allocate_slots(2, prompt, 16, prefix)
    assert manager.block_table(2)[:2] == [0, 1] and len(allocation.new_blocks) == 1
    assert manager.block_pool.num_evictable_blocks == 1  # the hit revived two blocks
    stats = manager.prefix_cache_stats
    assert (stats.queries, stats.hits) == (48 + 48 + 48, 32)
    manager.check_invariants()


def test_exhaustion_returns_none_and_takes_nothing():
    manager = _C.KVCacheManager(2, block_size=BLOCK_SIZE)
    assert admit(manager, 1, list(range(20))) is not None
    assert admit(manager, 2, list(range(100, 120))) is None
    assert 2 not in manager
    assert manager.num_free_blocks == 0
    with pytest.raises(ValueError, match="token ids"):
        manager.allocate_slots(1, list(range(20)), 5)
    manager.check_invariants()


def test_block_pool_directly():
    pool = _C.BlockPool(4, 2)
    block = pool.allocate(1)[0]
    tokens = [3, 4]
    h = _C.BlockPool.hash_block(_C.BlockPool.ROOT_HASH, tokens)
    assert pool.cache_block(block, h, _C.BlockPool.ROOT_HASH, tokens)
    assert pool.lookup(h, _C.BlockPool.ROOT_HASH, tokens) == block
    assert pool.lookup(h, _C.BlockPool.ROOT_HASH, [3, 5]) is None  # a collision is a miss
    assert pool.cached_hash(block) == h
    pool.decref(block)
    with pytest.raises(ValueError, match="freed twice"):
        pool.decref(block)
    with pytest.raises(MemoryError):
        pool.allocate(5)
    pool.check_invariants()


def test_wasted_slots_under_one_block_per_request():
    rng = random.Random(7)
    num_requests = 1000
    manager = _C.KVCacheManager(num_requests * 2048 // BLOCK_SIZE, block_size=BLOCK_SIZE)
    for request in range(num_requests):
        tokens = [rng.randrange(32000) for _ in range(rng.randint(100, 1024))]
        assert admit(manager, request, tokens) is not None
        output_left = rng.randint(100, 1024)
        while output_left:  # decode in chunks: the final table is the same as one token at a time
            n = min(output_left, rng.randint(1, 128))
            tokens += [rng.randrange(32000) for _ in range(n)]
            assert manager.allocate_slots(request, tokens, n) is not None
            output_left -= n
    waste = manager.waste()
    assert waste.wasted_slots < num_requests * BLOCK_SIZE
    assert all(manager.waste(r).wasted_slots < BLOCK_SIZE for r in range(num_requests))
    print(f"\nwasted KV slots: {waste.wasted_slots} of {waste.allocated_slots} allocated "
          f"({100 * waste.wasted_fraction:.3f}%), {waste.wasted_slots / num_requests:.2f} per request "
          f"(block_size {BLOCK_SIZE}, {num_requests} requests, prompt and output U[100, 1024])")
    manager.check_invariants()


def test_seeded_random_operations():
    """Admit / decode / fork / free at random with a shadow KV pool: every request reads back, through
    its block table, the tokens it wrote, and no write lands in a shared or cached block."""
    rng = random.Random(1234)
    block_size, num_blocks = 4, 64
    manager = _C.KVCacheManager(num_blocks, block_size=block_size)
    pool = manager.block_pool
    content = [None] * (num_blocks * block_size)
    shared = [[rng.randrange(20) for _ in range(rng.randint(4, 24))] for _ in range(3)]
    requests, next_id, copies = {}, 0, 0

    def write(request, tokens, start, n, allocation):
        nonlocal copies
        for src, dst in allocation.copies:
            content[dst * block_size:(dst + 1) * block_size] = content[src * block_size:(src + 1) * block_size]
            copies += 1
        for i, slot in enumerate(manager.slot_mapping(request, start, n)):
            assert pool.ref_count(slot // block_size) == 1 and not pool.is_cached(slot // block_size)
            content[slot] = tokens[start + i]

    def free(request):
        tokens = requests.pop(request)
        assert [content[s] for s in manager.slot_mapping(request, 0, manager.num_tokens(request))] == \
            tokens[:manager.num_tokens(request)]
        manager.cache_blocks(request, tokens, manager.num_tokens(request))
        manager.free(request)

    for _ in range(3000):
        op = rng.random()
        if op < 0.25 and len(requests) < 12:
            tokens = list(rng.choice(shared)) + [rng.randrange(20) for _ in range(rng.randint(1, 10))]
            prefix = manager.get_computed_blocks(tokens)
            n = len(tokens) - prefix.num_computed_tokens
            allocation = manager.allocate_slots(next_id, tokens, n, prefix)
            if allocation is not None:
                requests[next_id] = tokens
                write(next_id, tokens, prefix.num_computed_tokens, n, allocation)
            next_id += 1
        elif op < 0.7 and requests:
            request = rng.choice(list(requests))
            tokens = requests[request]
            start = manager.num_tokens(request)
            if start == len(tokens):
                tokens.append(rng.randrange(20))
            allocation = manager.allocate_slots(request, tokens, 1)
            if allocation is None:
                free(rng.choice(list(requests)))
            else:
                write(request, tokens, start, 1, allocation)
        elif op < 0.8 and requests:
            parent = rng.choice(list(requests))
            manager.fork(parent, next_id)
            requests[next_id] = list(requests[parent])
            next_id += 1
        elif requests:
            free(rng.choice(list(requests)))
        manager.check_invariants()
        assert sum(pool.ref_count(b) for b in range(num_blocks)) == \
            sum(len(manager.block_table(r)) for r in requests)
    for request in list(requests):
        free(request)
    assert pool.num_used_blocks == 0 and manager.num_free_blocks == num_blocks
    assert copies > 0 and manager.prefix_cache_stats.hits > 0
