"""Paged attention with many query tokens per request (cuda/attention_prefill.cu) equals the CPU
reference (backend/cpu/attention.cc) on the same bf16/fp16-rounded inputs.

The GPU result comes from octavo._C.ops.paged_attention on torch CUDA tensors, which dispatches to
the tensor-core prefill kernel whenever max_query_len > 1; the reference is the same op on fp32
numpy copies. Every case has max_query_len > 1 (a batch of one-token requests is forced onto the
prefill kernel by passing max_query_len=2: an over-estimate only launches empty query tiles).

Poisoning: the output starts as NaN (unwritten rows fail), and every cache slot no request may
read (the tail of a partially filled last block, spare blocks) is NaN, so a kernel that reads
past a context or outside its block table turns its rows into NaN instead of passing by luck.

Tolerances: inputs are identical (already rounded), so the differences are the rounding of P to
the input dtype before the P.V MMA (2^-9 relative for bf16, 2^-12 for fp16), the output rounding
(the same) and fp32 summation order. Outputs are convex combinations of N(0, 1) values (|y| < ~4):
per element |gpu - ref| <= atol + rtol * |ref| with (atol, rtol) = (2e-2, 2e-2) for bf16 and
(3e-3, 3e-3) for fp16, and the relative Frobenius error below 1e-2 (bf16) / 2e-3 (fp16).
"""

import math
import zlib

import numpy as np
import pytest
import torch

from octavo import _C

from gpu_testing import assert_close_to_reference, cuda_seconds  # noqa: E402

TOLERANCES = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2, frobenius=1e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3, frobenius=2e-3),
}


def _alibi_slopes(num_heads):
    """The ALiBi paper's geometric slopes (the exact values do not matter to the test)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    extra = 2.0 ** (-4.0 / closest)
    slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return np.asarray(slopes, dtype=np.float32)


def _make_case(seed, q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
               q_scale=1.0):
    """Random q and a paged cache with shuffled block tables; unreadable slots are NaN."""
    assert len(q_lens) == len(context_lens)
    assert all(0 <= q <= c for q, c in zip(q_lens, context_lens))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    blocks_per_request = [-(-c // block_size) for c in context_lens]
    spare_blocks = 3
    num_blocks = sum(blocks_per_request) + spare_blocks
    max_blocks = max(max(blocks_per_request), 1) + 2  # wider than needed: tail entries unused
    permutation = rng.permutation(num_blocks).astype(np.int32)
    # Unused table entries name a block id far outside the pool: reading one faults loudly.
    block_tables = np.full((len(q_lens), max_blocks), 1 << 28, dtype=np.int32)
    next_block = 0
    for r, n in enumerate(blocks_per_request):
        block_tables[r, :n] = permutation[next_block : next_block + n]
        next_block += n

    cache = torch.randn((num_blocks, 2, num_kv_heads, block_size, head_dim), generator=gen)
    cache = cache.to(dtype).float()
    readable = torch.zeros((num_blocks, block_size), dtype=torch.bool)
    for r, c in enumerate(context_lens):
        for pos in range(c):
            readable[block_tables[r, pos // block_size], pos % block_size] = True
    cache[~readable[:, None, None, :, None].expand_as(cache)] = float("nan")

    num_tokens = sum(q_lens)
    q = (q_scale * torch.randn((num_tokens, num_heads * head_dim), generator=gen)).to(dtype).float()
    query_start = np.zeros(len(q_lens) + 1, dtype=np.int32)
    query_start[1:] = np.cumsum(q_lens)
    return dict(
        q=q,
        cache=cache,
        query_start=query_start,
        context_lens=np.asarray(context_lens, dtype=np.int32),
        block_tables=block_tables,
    )


def _run(case, num_heads, num_kv_heads, head_dim, block_size, dtype, window=0, softcap=0.0,
         alibi=False, max_query_len=None, fused_qkv=False, request_order=None,
         num_decode_prefix=0, workspace=None):
    """(gpu output as fp32 numpy, CPU reference). fused_qkv: q is the first num_heads * head_dim
    columns of a [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] buffer whose K and V
    columns are NaN (q_stride > the row; the kernel must read only q's columns)."""
    q_lens = np.diff(case["query_start"])
    if max_query_len is None:
        max_query_len = int(q_lens.max())
    assert max_query_len > 1, "the prefill kernel runs only for max_query_len > 1"
    max_context_len = int(case["context_lens"].max())
    scale = 1.0 / math.sqrt(head_dim)
    slopes = _alibi_slopes(num_heads) if alibi else None
    num_tokens = case["q"].shape[0]
    scalars = (num_heads, num_kv_heads, head_dim, block_size, scale)
    options = dict(sliding_window=window, softcap=softcap, max_query_len=max_query_len,
                   max_context_len=max_context_len)
    q = case["q"]
    if fused_qkv:
        row = num_heads * head_dim
        q = torch.cat([q, torch.full((num_tokens, 2 * num_kv_heads * head_dim), float("nan"))], 1)
        options["q_stride"] = row + 2 * num_kv_heads * head_dim

    expected = np.zeros((num_tokens, num_heads * head_dim), dtype=np.float32)
    _C.ops.paged_attention(q.numpy(), case["cache"].numpy(), expected, case["query_start"],
                           case["context_lens"], case["block_tables"], slopes, *scalars, **options,
                           request_order=request_order, num_decode_prefix=num_decode_prefix)
    if request_order is not None:
        request_order = torch.from_numpy(request_order).cuda()
    options.update(request_order=request_order, num_decode_prefix=num_decode_prefix,
                   workspace=workspace)

    out = torch.full((num_tokens, num_heads * head_dim), float("nan"), dtype=dtype, device="cuda")
    _C.ops.paged_attention(
        q.to(dtype).cuda(), case["cache"].to(dtype).cuda(), out,
        torch.from_numpy(case["query_start"]).cuda(), torch.from_numpy(case["context_lens"]).cuda(),
        torch.from_numpy(case["block_tables"]).cuda(),
        torch.from_numpy(slopes).cuda() if alibi else None, *scalars, **options)
    torch.cuda.synchronize()
    return out.float().cpu().numpy(), expected


# (name, q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, options)
# context_len == q_len is a fresh prompt; context_len > q_len is a chunk after cached tokens (a
# later chunk or a prefix-cache hit); q_len 1 with a long context is a decode mixed into the batch.
CASES = [
    # Whole prompts, 1 to 2,048 tokens, every head dim.
    ("prompt_2", [2], [2], 4, 4, 128, 16, {}),
    ("prompt_17", [17], [17], 4, 1, 64, 16, {}),
    ("prompt_65", [65], [65], 6, 2, 80, 32, {}),
    ("prompt_127", [127], [127], 8, 2, 96, 16, {}),
    ("prompt_300", [300], [300], 8, 1, 256, 16, {}),
    ("prompt_1000", [1000], [1000], 4, 4, 64, 32, {}),
    ("prompt_2048", [2048], [2048], 4, 1, 128, 16, {}),
    ("one_token_prompts", [1, 1, 1], [1, 1, 1], 4, 2, 128, 16, {"max_query_len": 2}),
    # Batches of uneven prompts (partial last blocks everywhere).
    ("uneven_prompts", [5, 130, 64, 1, 777], [5, 130, 64, 1, 777], 12, 4, 128, 16, {}),
    ("uneven_prompts_hd256", [33, 97, 2, 160], [33, 97, 2, 160], 8, 8, 256, 32, {}),
    # Chunked prefill: cached prefix longer than the chunk.
    ("chunk_after_prefix", [100], [1000], 8, 2, 128, 16, {}),
    ("chunk_block_aligned", [64], [576], 4, 4, 64, 32, {}),
    ("chunk_short_long_prefix", [33, 7], [2000, 1500], 16, 2, 80, 16, {}),
    ("chunks_hd96_hd256", [48, 200], [300, 250], 6, 2, 96, 32, {}),
    ("chunks_hd256", [70, 9], [400, 1029], 4, 1, 256, 16, {}),
    # Mixed batches: decodes, chunks, prompts and a request with no new tokens.
    ("mixed", [1, 37, 1, 0, 250, 1, 64], [3000, 500, 17, 50, 250, 1, 64], 32, 8, 128, 16, {}),
    ("mixed_gqa3", [1, 1, 90, 5], [700, 33, 90, 129], 12, 4, 64, 32, {}),
    ("mixed_hd80", [1, 128, 1, 3], [1, 300, 2048, 3], 8, 1, 80, 32, {}),
    # Sliding window: the window edge inside the chunk, at one token, wider than the context.
    ("window_37", [150, 1, 40], [150, 400, 1000], 8, 2, 128, 16, {"window": 37}),
    ("window_1", [20, 65], [20, 300], 4, 4, 64, 16, {"window": 1}),
    ("window_256_chunk", [300], [1300], 8, 1, 96, 32, {"window": 256}),
    ("window_wide", [100, 1], [100, 50], 4, 2, 256, 16, {"window": 4096}),
    # Softcap (large q so it bites) and ALiBi, alone and together, with and without windows.
    ("softcap", [200, 1, 31], [200, 80, 500], 8, 2, 128, 16, {"softcap": 5.0, "q_scale": 3.0}),
    ("alibi", [129, 1, 64], [129, 300, 640], 8, 8, 64, 32, {"alibi": True}),
    ("alibi_softcap_window", [96, 17], [96, 400], 16, 2, 80, 16,
     {"alibi": True, "softcap": 10.0, "window": 50, "q_scale": 2.0}),
    ("softcap_hd256_window", [90, 1], [900, 90], 4, 1, 256, 32, {"softcap": 20.0, "window": 128}),
    ("alibi_hd96", [70, 2], [70, 1000], 6, 6, 96, 16, {"alibi": True}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_matches_cpu(case, dtype):
    name, q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, options = case
    options = dict(options)
    q_scale = options.pop("q_scale", 1.0)
    data = _make_case(zlib.crc32(name.encode()), q_lens, context_lens, num_heads, num_kv_heads,
                      head_dim, block_size, dtype, q_scale=q_scale)
    got, expected = _run(data, num_heads, num_kv_heads, head_dim, block_size, dtype, **options)
    assert_close_to_reference(got, expected, TOLERANCES[dtype], name, "token")


# Every head dim x GQA ratio x block size once, on a small mixed batch (chunk + prompt + decode).
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (16, 2)], ids=["gqa1", "gqa3", "gqa4", "gqa8"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_head_dims_gqa_block_sizes(head_dim, heads, block_size):
    num_heads, num_kv_heads = heads
    dtype = torch.bfloat16 if (head_dim + block_size + num_heads) % 2 == 0 else torch.float16
    q_lens, context_lens = [67, 1, 16, 130], [67, 95, 300, 131]
    data = _make_case(head_dim * 1000 + num_heads * 10 + block_size, q_lens, context_lens,
                      num_heads, num_kv_heads, head_dim, block_size, dtype)
    got, expected = _run(data, num_heads, num_kv_heads, head_dim, block_size, dtype)
    assert_close_to_reference(got, expected, TOLERANCES[dtype],
                              f"hd{head_dim} heads{heads} bs{block_size}", "token")


# Mixed steps whose leading requests decode (as the scheduler packs them: running requests first):
# from kMinDecodePrefix (16) of them on, CUDA sends them through the decode kernel and the rest
# through the prefill kernel. (name, decodes, chunks as (q_len, context_len), heads, kv heads,
# head dim, block size, options)
DECODE_PREFIX_CASES = [
    ("gqa4_hd128", 40, [(300, 300), (37, 900)], 32, 8, 128, 16, {}),
    ("gqa2_hd128", 100, [(64, 64), (1, 5), (200, 1200)], 16, 8, 128, 16, {}),
    ("gqa8_hd64", 16, [(90, 90)], 64, 8, 64, 32, {}),
    ("gqa1_hd256_window", 20, [(150, 400)], 4, 4, 256, 16, {"window": 100}),
    ("gqa3_hd80_alibi_softcap", 24, [(33, 33), (70, 2000)], 12, 4, 80, 16,
     {"alibi": True, "softcap": 10.0}),
    ("below_the_threshold", 15, [(50, 50)], 8, 2, 128, 16, {}),
]


@pytest.mark.parametrize("case", DECODE_PREFIX_CASES, ids=[c[0] for c in DECODE_PREFIX_CASES])
def test_decode_prefix_through_the_decode_kernel(case):
    name, decodes, chunks, num_heads, num_kv_heads, head_dim, block_size, options = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    decode_contexts = rng.integers(1, 3000, decodes).tolist()
    q_lens = [1] * decodes + [q for q, _ in chunks]
    context_lens = decode_contexts + [c for _, c in chunks]
    dtype = torch.bfloat16
    data = _make_case(zlib.crc32(name.encode()) + 1, q_lens, context_lens, num_heads, num_kv_heads,
                      head_dim, block_size, dtype)
    window = options.get("window", 0)
    # The decode part reads its rows longest context first; any permutation of the prefix gives
    # the same result.
    order = np.concatenate([np.argsort(-np.asarray(decode_contexts), kind="stable"),
                            np.arange(decodes, len(q_lens))]).astype(np.int32)
    workspace_bytes = _C.ops.decode_workspace_bytes(decodes, num_heads, num_kv_heads, head_dim,
                                                    block_size, max(context_lens), window)
    extra = dict(num_decode_prefix=decodes,
                 workspace=torch.empty(max(workspace_bytes, 16), dtype=torch.uint8, device="cuda"))
    got, expected = _run(data, num_heads, num_kv_heads, head_dim, block_size, dtype,
                         request_order=order, **options, **extra)
    assert_close_to_reference(got, expected, TOLERANCES[dtype], name, "token")


def _on_sm90():
    return torch.cuda.get_device_capability() == (9, 0)


def test_prefill_kernel_choice():
    """Head dim 128 chunks longer than 64 tokens take the wgmma kernel on an H100/H200 (a build
    with sm_90a code, which the default architectures include); everything else mma.sync."""
    wgmma = "wgmma" if _on_sm90() else "mma.sync"
    assert _C.ops.prefill_kernel(128, 65) == wgmma
    assert _C.ops.prefill_kernel(128, 4096) == wgmma
    assert _C.ops.prefill_kernel(128, 64) == "mma.sync"
    for head_dim in (64, 80, 96, 256):
        assert _C.ops.prefill_kernel(head_dim, 4096) == "mma.sync"


# Head dim 128 with a chunk past 64 tokens: the wgmma kernel on compute capability 9.0 (128-row
# tiles of 128 / group query positions x the group's heads, 128-key tiles, the diagonal and the
# context end anywhere inside them), mma.sync elsewhere. (name, q_lens, context_lens, num_heads, num_kv_heads, block_size, options)
WGMMA_CASES = [
    ("one_tile", [65], [65], 4, 4, 16, {}),
    ("tile_edges", [127, 128, 129, 255, 256, 257], [127, 128, 129, 255, 256, 257], 8, 2, 16, {}),
    ("long_prompt_gqa8", [1500], [1500], 16, 2, 16, {}),
    ("chunk_after_prefix", [300, 77], [5000, 1077], 8, 1, 32, {}),
    ("chunk_block_aligned", [256], [1280], 4, 4, 32, {}),
    ("mixed_decodes_and_empty", [1, 200, 0, 1, 90, 1], [4000, 700, 30, 1, 90, 129], 12, 4, 16, {}),
    ("window_inside_tiles", [700, 1], [900, 600], 8, 2, 16, {"window": 200}),
    ("window_1", [150], [400], 4, 2, 16, {"window": 1}),
    ("window_wider_than_context", [300], [300], 4, 1, 16, {"window": 100000}),
    ("softcap", [400, 33], [400, 900], 8, 2, 16, {"softcap": 5.0, "q_scale": 3.0}),
    ("alibi", [333, 1], [1000, 300], 8, 8, 32, {"alibi": True}),
    ("alibi_softcap_window", [260], [600], 16, 4, 16,
     {"alibi": True, "softcap": 10.0, "window": 130, "q_scale": 2.0}),
    ("large_scores", [200], [200], 4, 4, 16, {"q_scale": 8.0}),
    ("gqa16_eight_positions_a_tile", [100, 9], [100, 300], 16, 1, 16, {}),
    ("gqa3_idle_rows", [130, 43], [130, 500], 6, 2, 16, {"alibi": True}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", WGMMA_CASES, ids=[c[0] for c in WGMMA_CASES])
def test_prefill_hd128_long_chunks_match_cpu(case, dtype):
    name, q_lens, context_lens, num_heads, num_kv_heads, block_size, options = case
    options = dict(options)
    q_scale = options.pop("q_scale", 1.0)
    data = _make_case(zlib.crc32(name.encode()) + 7, q_lens, context_lens, num_heads,
                      num_kv_heads, 128, block_size, dtype, q_scale=q_scale)
    assert _C.ops.prefill_kernel(128, max(q_lens)) == ("wgmma" if _on_sm90() else "mma.sync")
    got, expected = _run(data, num_heads, num_kv_heads, 128, block_size, dtype, **options)
    assert_close_to_reference(got, expected, TOLERANCES[dtype], name, "token")


def test_prefill_hd128_repeats_exactly():
    """Two runs of one long batch give identical bits (a race between the warpgroups or the
    load pipeline would move them)."""
    q_lens, context_lens = [900, 300], [900, 2000]
    data = _make_case(5, q_lens, context_lens, 8, 2, 128, 16, torch.bfloat16)
    first, _ = _run(data, 8, 2, 128, 16, torch.bfloat16)
    for _ in range(3):
        again, _ = _run(data, 8, 2, 128, 16, torch.bfloat16)
        assert np.array_equal(first, again, equal_nan=True)


def test_prefill_hd128_launches_reuse_the_scheduler():
    """The wgmma kernel's CTAs draw work items from counters that each launch leaves zeroed for
    a later one (64 pairs per device, used in turn): 70 launches of a batch whose short requests
    leave runs of empty items all give the first launch's bits, and that matches the CPU."""
    q_lens, context_lens = [1000, 70, 0, 333, 129], [1000, 900, 5, 333, 129]
    num_heads, num_kv_heads, block_size, dtype = 8, 2, 16, torch.bfloat16
    data = _make_case(11, q_lens, context_lens, num_heads, num_kv_heads, 128, block_size, dtype)
    first, expected = _run(data, num_heads, num_kv_heads, 128, block_size, dtype)
    assert_close_to_reference(first, expected, TOLERANCES[dtype], "scheduler", "token")
    scalars = (num_heads, num_kv_heads, 128, block_size, 1.0 / math.sqrt(128))
    args = [data["q"].to(dtype).cuda(), data["cache"].to(dtype).cuda(), None,
            torch.from_numpy(data["query_start"]).cuda(),
            torch.from_numpy(data["context_lens"]).cuda(),
            torch.from_numpy(data["block_tables"]).cuda(), None, *scalars]
    out = torch.empty((data["q"].shape[0], num_heads * 128), dtype=dtype, device="cuda")
    args[2] = out
    for _ in range(70):
        out.fill_(float("nan"))
        _C.ops.paged_attention(*args, max_query_len=max(q_lens), max_context_len=max(context_lens))
        torch.cuda.synchronize()
        assert np.array_equal(out.float().cpu().numpy(), first, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prefill_q_in_fused_qkv_rows(dtype):
    """q read out of a fused QKV projection (q_stride = (heads + 2 kv heads) * head_dim)."""
    q_lens, context_lens = [40, 1, 100], [40, 77, 260]
    data = _make_case(11, q_lens, context_lens, 8, 2, 128, 16, dtype)
    got, expected = _run(data, 8, 2, 128, 16, dtype, fused_qkv=True)
    assert_close_to_reference(got, expected, TOLERANCES[dtype], "fused qkv", "token")


def test_prefill_rejects_unsupported_head_dim():
    data = _make_case(7, [4], [4], 2, 2, 48, 16, torch.bfloat16)
    with pytest.raises(Exception, match="head_dim"):
        _run(data, 2, 2, 48, 16, torch.bfloat16)


def test_prefill_throughput_report():
    """Times batch 4 x 4,096 causal prompts, head_dim 128, 32 q / 8 kv heads, block 16, bf16
    (not a pass/fail figure), beside torch SDPA on contiguous tensors; also checks the output
    against SDPA's at this length, where no CPU reference would be quick."""
    batch, seq, num_heads, num_kv_heads, head_dim, block_size = 4, 4096, 32, 8, 128, 16
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn((batch, seq, num_heads, head_dim), device="cuda", generator=gen).to(dtype)
    k = torch.randn((batch, seq, num_kv_heads, head_dim), device="cuda", generator=gen).to(dtype)
    v = torch.randn((batch, seq, num_kv_heads, head_dim), device="cuda", generator=gen).to(dtype)

    blocks_per_seq = seq // block_size
    num_blocks = batch * blocks_per_seq
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    # cache[block, 0|1, kv_head, slot, d] from k/v[b, pos, kv_head, d].
    cache = torch.empty((num_blocks, 2, num_kv_heads, block_size, head_dim), device="cuda", dtype=dtype)
    paged = lambda x: x.view(batch, blocks_per_seq, block_size, num_kv_heads, head_dim).permute(0, 1, 3, 2, 4)
    cache[block_tables.flatten().long(), 0] = paged(k).reshape(num_blocks, num_kv_heads, block_size, head_dim)
    cache[block_tables.flatten().long(), 1] = paged(v).reshape(num_blocks, num_kv_heads, block_size, head_dim)
    q_flat = q.reshape(batch * seq, num_heads * head_dim)
    query_start = torch.arange(0, (batch + 1) * seq, seq, device="cuda", dtype=torch.int32)
    context_lens = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
    out = torch.full_like(q_flat, float("nan"))
    scale = 1.0 / math.sqrt(head_dim)
    stream = torch.cuda.current_stream().cuda_stream

    def ours():
        _C.ops.paged_attention(q_flat, cache, out, query_start, context_lens, block_tables, None,
                               num_heads, num_kv_heads, head_dim, block_size, scale,
                               sliding_window=0, softcap=0.0, stream=stream, max_query_len=seq,
                               max_context_len=seq)

    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    try:
        torch.nn.functional.scaled_dot_product_attention(qt[:, :, :8], kt[:, :, :8], vt[:, :, :8],
                                                         is_causal=True, enable_gqa=True)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                        enable_gqa=True)
        sdpa_note = "enable_gqa"
    except TypeError:  # torch < 2.5: expand the KV heads instead
        group = num_heads // num_kv_heads
        ke, ve = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, ke, ve, is_causal=True)
        sdpa_note = "expanded KV heads"

    flops = 4 * batch * (seq * (seq + 1) // 2) * head_dim * num_heads
    ours_s, sdpa_s = cuda_seconds(ours), cuda_seconds(sdpa)
    print(f"\npaged_attention prefill ({_C.ops.prefill_kernel(head_dim, seq)}), {batch} x {seq} "
          f"causal, hd {head_dim}, {num_heads}/{num_kv_heads} "
          f"heads, block {block_size}, bf16 on {torch.cuda.get_device_name()}:\n"
          f"  octavo  {ours_s * 1e3:8.3f} ms  {flops / ours_s / 1e12:6.1f} TFLOP/s\n"
          f"  SDPA    {sdpa_s * 1e3:8.3f} ms  {flops / sdpa_s / 1e12:6.1f} TFLOP/s ({sdpa_note})")

    ours()
    reference = sdpa().transpose(1, 2).reshape(batch * seq, num_heads * head_dim).float()
    got = out.float()
    assert torch.isfinite(got).all(), "non-finite output at batch 4 x 4096"
    relative = (torch.linalg.norm(got - reference) / torch.linalg.norm(reference)).item()
    assert relative < 1e-2, f"relative difference to SDPA {relative:.3g} at batch 4 x 4096"
