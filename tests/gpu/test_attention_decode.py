"""paged_attention decode (max_query_len == 1) on the GPU equals the CPU reference.

The GPU result comes from octavo._C.ops.paged_attention on torch CUDA tensors (bf16/fp16), which
runs the decode kernel (cuda/attention_decode.cu) when max_query_len == 1; the reference is the
same op on fp32 numpy copies of the same rounded inputs (the CPU backend, backend/cpu/attention.cc).

Inputs: random q and K/V, block tables a random permutation of the pool, every unused block and
the unused tail of each partially filled last block set to NaN, block-table padding pointing at a
NaN block, and the output and workspace filled with NaN before the run: any read outside a
request's keys or any output element left unwritten shows up as NaN, which never passes.

Tolerance: both sides compute in fp32 from identical rounded inputs, so the difference is the
rounding of the GPU output to bf16/fp16 (relative 2^-9 / 2^-12 at most) plus fp32 summation order
and the fast exp; relative Frobenius error < 1e-2 (bf16) / 2e-3 (fp16), and every element within
atol + rtol * |ref|.
"""

import math
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from octavo import _C

from gpu_testing import assert_close_to_reference  # noqa: E402

TOLERANCES = {
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-4, frobenius=1e-2),
    torch.float16: dict(rtol=2e-3, atol=3e-5, frobenius=2e-3),
}


def _alibi_slopes(num_heads):
    return np.array([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)], dtype=np.float32)


def _make_case(seed, context_lens, num_heads, num_kv_heads, head_dim, block_size, spare_blocks=3,
               table_padding=2, q_stride=None):
    """A random decode batch in fp32 (rounded to the test dtype in _run), one query per request."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    context_lens = np.asarray(context_lens, dtype=np.int32)
    num_requests = len(context_lens)
    blocks_per_request = [(int(c) + block_size - 1) // block_size for c in context_lens]
    used = sum(blocks_per_request)
    num_blocks = used + spare_blocks + 1  # the last block is the NaN padding target
    cache = torch.randn((num_blocks, 2, num_kv_heads, block_size, head_dim), generator=gen)
    order = rng.permutation(num_blocks - 1)  # shuffled ids; the last stays the padding block
    max_blocks = max(blocks_per_request) + table_padding
    block_tables = np.full((num_requests, max_blocks), num_blocks - 1, dtype=np.int32)
    poisoned = torch.ones(num_blocks, dtype=torch.bool)
    next_id = 0
    for r, (ctx, n) in enumerate(zip(context_lens, blocks_per_request)):
        ids = order[next_id:next_id + n]
        next_id += n
        block_tables[r, :n] = ids
        poisoned[torch.from_numpy(ids.astype(np.int64))] = False
        tail = n * block_size - int(ctx)  # unused slots of the last block
        if tail > 0:
            cache[int(ids[-1]), :, :, block_size - tail:, :] = float("nan")
    cache[poisoned] = float("nan")
    row = num_heads * head_dim
    stride = q_stride or row
    q = torch.randn((num_requests, stride), generator=gen)
    return dict(q=q, cache=cache, context_lens=context_lens, block_tables=block_tables,
                query_start=np.arange(num_requests + 1, dtype=np.int32), q_stride=stride)


def _request_order(context_lens, order):
    """The launch order a test asks for: None, "longest_first" (the executor's) or "shuffled"."""
    if order is None:
        return None
    if order == "longest_first":
        return np.argsort(-context_lens, kind="stable").astype(np.int32)
    return np.random.default_rng(len(context_lens)).permutation(len(context_lens)).astype(np.int32)


def _calls(case, num_heads, num_kv_heads, head_dim, block_size, dtype, window=0, softcap=0.0,
           alibi=False, scale=None, order=None):
    """(a closure that runs the GPU op into `out`, `out` (NaN), the CPU reference as fp32 numpy)."""
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    num_requests = len(case["context_lens"])
    request_order = _request_order(case["context_lens"], order)
    max_context_len = int(case["context_lens"].max())
    slopes = _alibi_slopes(num_heads) if alibi else None
    q = case["q"].to(dtype)
    cache = case["cache"].to(dtype)
    scalars = (num_heads, num_kv_heads, head_dim, block_size, scale)
    options = dict(sliding_window=window, softcap=softcap, q_stride=case["q_stride"])

    expected = np.full((num_requests, num_heads * head_dim), np.nan, dtype=np.float32)
    _C.ops.paged_attention(q.float().numpy(), cache.float().numpy(), expected, case["query_start"],
                           case["context_lens"], case["block_tables"], slopes, *scalars, **options,
                           request_order=request_order)

    workspace_bytes = _C.ops.decode_workspace_bytes(num_requests, num_heads, num_kv_heads, head_dim,
                                                    block_size, max_context_len, window)
    workspace = torch.full((max(workspace_bytes, 16),), 0xFF, dtype=torch.uint8, device="cuda")  # NaN
    out = torch.full((num_requests, num_heads * head_dim), float("nan"), dtype=dtype, device="cuda")
    inputs = [q.cuda(), cache.cuda(), out, torch.from_numpy(case["query_start"]).cuda(),
              torch.from_numpy(case["context_lens"]).cuda(),
              torch.from_numpy(case["block_tables"]).cuda(),
              torch.from_numpy(slopes).cuda() if alibi else None, *scalars]
    order_tensor = None if request_order is None else torch.from_numpy(request_order).cuda()

    def call():
        _C.ops.paged_attention(*inputs, **options, stream=torch.cuda.current_stream().cuda_stream,
                               max_query_len=1, max_context_len=max_context_len,
                               workspace=workspace, request_order=order_tensor)
    return call, out, expected


def _run(case, num_heads, num_kv_heads, head_dim, block_size, dtype, **options):
    """(gpu output as fp32 numpy, CPU reference as fp32 numpy)."""
    call, out, expected = _calls(case, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                 **options)
    call()
    torch.cuda.synchronize()
    return out.float().cpu().numpy(), expected


def _graph_replays(case, num_heads, num_kv_heads, head_dim, block_size, dtype, replays,
                   eager_first):
    """Outputs of `replays` replays of one op captured in a CUDA graph, the output set to NaN
    before each, and the CPU reference. With eager_first, one eager call precedes the capture."""
    call, out, expected = _calls(case, num_heads, num_kv_heads, head_dim, block_size, dtype)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        if eager_first:
            call()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            call()
    outputs = []
    for _ in range(replays):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        outputs.append(out.float().cpu().numpy())
    return outputs, expected


DTYPES = [torch.bfloat16, torch.float16]
MIXED = [1, 15, 16, 17, 100, 777, 2049]  # partial and exactly full last blocks, in one batch

# (name, context_lens, num_heads, num_kv_heads, head_dim, block_size, options)
CASES = [
    ("one_token", [1], 4, 4, 128, 16, {}),
    ("partial_blocks_gqa4", [17, 33, 15, 16, 31, 1, 32, 47], 8, 2, 128, 16, {}),
    # Every head dim x GQA ratio 1, 3, 4, 8, block sizes 16 and 32.
    *[(f"hd{hd}_gqa{heads // kv}_bs{bs}", MIXED, heads, kv, hd, bs, {})
      for hd in (64, 80, 96, 128, 256)
      for (heads, kv) in ((4, 4), (6, 2), (8, 2), (16, 2))
      for bs in ((16, 32) if hd in (80, 128) else ((16,) if hd in (64, 256) else (32,)))],
    # Group tiles: GQA 2 (a pair instance at head dim 128; elsewhere the instance of 4 with heads
    # masked), 5, 7, 12 and 16 (two CTAs per KV head).
    ("gqa2", MIXED, 8, 4, 128, 16, {}),
    ("gqa2_hd128_pairs_long_split", [8192, 33, 1], 16, 8, 128, 16, {}),  # the pair instance
    ("gqa2_hd64_masked", MIXED, 8, 4, 64, 16, {}),
    ("gqa2_hd128_window_softcap_alibi", [3000, 100, 1], 16, 8, 128, 32,
     {"window": 500, "softcap": 20.0, "alibi": True}),
    ("gqa5", MIXED, 10, 2, 64, 32, {}),
    ("gqa7", MIXED, 28, 4, 128, 16, {}),
    ("gqa12_mqa", MIXED, 12, 1, 64, 16, {}),
    ("gqa16", [5, 300, 1234], 32, 2, 128, 32, {}),
    # Group tile 8 runs on tensor cores at head dims 64 and 128: with window, softcap and ALiBi.
    ("gqa8_tensor_cores_window_softcap_alibi", [3000, 100, 1, 700], 16, 2, 128, 16,
     {"window": 500, "softcap": 20.0, "alibi": True}),
    ("gqa6_tensor_cores_hd64_window", MIXED, 12, 2, 64, 32, {"window": 64}),
    # Long requests: few CTAs, so the keys are split (FlashDecoding) and reduced.
    ("long_8192", [8192], 32, 8, 128, 16, {}),
    ("long_8191_hd256", [8191], 8, 1, 256, 32, {}),
    ("long_4097_hd80_gqa3", [4097, 3], 12, 4, 80, 16, {}),
    ("long_mixed_short", [8000, 1, 17, 250, 5000], 16, 4, 96, 32, {}),
    # Batches up to 64 with uneven lengths (some requests split, some written directly).
    ("batch64_uneven", list(np.random.default_rng(7).integers(1, 2049, 64)), 16, 4, 128, 16, {}),
    ("batch33_uneven_gqa8", list(np.random.default_rng(8).integers(1, 1500, 33)), 16, 2, 128, 32, {}),
    # Launch orders (request_order): the executor's longest first, and any permutation.
    ("batch64_uneven_longest_first", list(np.random.default_rng(9).integers(1, 2049, 64)), 16, 8,
     128, 16, {"order": "longest_first"}),
    ("long_mixed_short_shuffled", [8000, 1, 17, 250, 5000, 3], 16, 4, 96, 32, {"order": "shuffled"}),
    # A block size that is not a power of two (the division path).
    ("block_size_24", [1, 23, 24, 25, 1000], 8, 2, 128, 24, {}),
    # Sliding window: shorter and longer than the contexts, split and unsplit.
    ("window_64", MIXED, 8, 2, 128, 16, {"window": 64}),
    ("window_1", [1, 2, 50], 8, 2, 128, 16, {"window": 1}),
    ("window_1000_long", [8192, 999, 1000, 1001], 32, 8, 128, 16, {"window": 1000}),
    ("window_4096_split", [6000], 8, 8, 64, 32, {"window": 4096}),
    # Logit softcap (scale 1 makes the scores large enough for tanh to bend them), ALiBi, all.
    ("softcap", MIXED, 8, 2, 128, 16, {"softcap": 5.0, "scale": 1.0}),
    ("softcap_gemma", [3000, 7], 16, 8, 256, 16, {"softcap": 50.0}),
    ("alibi", MIXED, 8, 2, 128, 16, {"alibi": True}),
    ("alibi_long", [6000, 40], 16, 16, 128, 32, {"alibi": True}),
    ("window_softcap_alibi", [3000, 100, 1], 24, 8, 96, 16,
     {"window": 500, "softcap": 20.0, "alibi": True}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,context_lens,num_heads,num_kv_heads,head_dim,block_size,options",
                         CASES, ids=[c[0] for c in CASES])
def test_decode_matches_cpu(name, context_lens, num_heads, num_kv_heads, head_dim, block_size,
                            options, dtype):
    case = _make_case(zlib.crc32(name.encode()) % 10_000, context_lens, num_heads, num_kv_heads, head_dim, block_size)
    got, expected = _run(case, num_heads, num_kv_heads, head_dim, block_size, dtype, **options)
    assert_close_to_reference(got, expected, TOLERANCES[dtype], name, "request")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_decode_q_stride(dtype):
    """q rows inside a wider buffer (the q part of a fused qkv projection)."""
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 128, 16
    row = num_heads * head_dim
    case = _make_case(11, MIXED, num_heads, num_kv_heads, head_dim, block_size,
                      q_stride=row + 2 * num_kv_heads * head_dim)
    got, expected = _run(case, num_heads, num_kv_heads, head_dim, block_size, dtype)
    assert_close_to_reference(got, expected, TOLERANCES[dtype], "q_stride", "request")


def test_decode_rejects_bad_calls():
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 128, 16
    case = _make_case(3, [40, 8000], num_heads, num_kv_heads, head_dim, block_size)
    q = case["q"].to(torch.bfloat16).cuda()
    cache = case["cache"].to(torch.bfloat16).cuda()
    out = torch.empty((2, num_heads * head_dim), dtype=torch.bfloat16, device="cuda")
    args = (q, cache, out, torch.from_numpy(case["query_start"]).cuda(),
            torch.from_numpy(case["context_lens"]).cuda(), torch.from_numpy(case["block_tables"]).cuda(),
            None, num_heads, num_kv_heads)
    needed = _C.ops.decode_workspace_bytes(2, num_heads, num_kv_heads, head_dim, block_size, 8000)
    assert needed > 0, "two requests of 8,000 keys on 2 KV heads should be split"
    workspace = torch.empty((needed,), dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="max_query_len"):  # CUDA needs the host maxima
        _C.ops.paged_attention(*args, head_dim, block_size, 0.1, workspace=workspace)
    with pytest.raises(ValueError, match="workspace"):
        _C.ops.paged_attention(*args, head_dim, block_size, 0.1, max_query_len=1, max_context_len=8000)
    with pytest.raises(ValueError, match="workspace"):
        _C.ops.paged_attention(*args, head_dim, block_size, 0.1, max_query_len=1, max_context_len=8000,
                               workspace=workspace[: needed - 1])
    with pytest.raises(ValueError, match="head_dim"):
        _C.ops.decode_workspace_bytes(2, num_heads, num_kv_heads, 72, block_size, 8000)
    with pytest.raises(ValueError, match="num_kv_heads"):
        _C.ops.decode_workspace_bytes(2, 9, 2, head_dim, block_size, 8000)
    with pytest.raises(ValueError, match="block table"):  # max_context_len beyond the table
        _C.ops.paged_attention(*args, head_dim, block_size, 0.1, max_query_len=1,
                               max_context_len=100_000, workspace=torch.empty(
                                   (_C.ops.decode_workspace_bytes(2, num_heads, num_kv_heads, head_dim,
                                                                  block_size, 100_000),),
                                   dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()


def test_decode_workspace_bound_is_monotone():
    """The engine reserves decode_workspace_bytes(max_num_seqs, ..., max_model_len) once; every
    smaller batch (fewer requests get more splits each) must fit in it."""
    for heads, kv, hd in ((32, 8, 128), (8, 1, 256), (64, 8, 128), (12, 12, 64)):
        reserved = _C.ops.decode_workspace_bytes(256, heads, kv, hd, 16, 32768)
        for batch in (1, 2, 3, 5, 8, 17, 64, 255):
            for context in (1, 300, 4096, 32768):
                needed = _C.ops.decode_workspace_bytes(batch, heads, kv, hd, 16, context)
                assert needed <= reserved, (heads, kv, hd, batch, context, needed, reserved)
        assert _C.ops.decode_workspace_bytes(1, heads, kv, hd, 16, 32768) > 0  # batch 1 splits


# Split requests beside requests written directly. Batches planned at most 8 splits merge in the
# split kernel (its last split per request and KV head): one CTA per KV head (GQA 4), two (GQA
# 16), one query head per CTA (MHA, head dim 64). The last batch splits 22 ways, which the
# reduction kernel merges.
MERGED_IN_KERNEL = [3000] * 12 + [5, 17, 700, 2049]
SPLIT_BATCHES = [(MERGED_IN_KERNEL, 32, 8, 128), ([2500] * 20 + [17, 3, 900, 1300], 32, 2, 128),
                 ([3000] * 30 + [40] * 10, 4, 4, 64), ([8192, 3000, 5], 32, 8, 128)]


@pytest.mark.parametrize("context_lens,num_heads,num_kv_heads,head_dim", SPLIT_BATCHES)
def test_decode_split_merge_over_graph_replays(context_lens, num_heads, num_kv_heads, head_dim):
    """The last split of a request's KV head merges the splits and leaves its counter at zero for
    the next launch: every replay of a captured call (output reset to NaN before each) writes the
    whole output, close to the CPU reference, with the same bits; and so do eager calls past the
    counters' 8 regions. (The batch merged by the reduction kernel checks the same of it.)"""
    case = _make_case(5, context_lens, num_heads, num_kv_heads, head_dim, 16)
    outputs, expected = _graph_replays(case, num_heads, num_kv_heads, head_dim, 16,
                                       torch.bfloat16, replays=5, eager_first=True)
    for got in outputs:
        assert_close_to_reference(got, expected, TOLERANCES[torch.bfloat16], "replay", "request")
        assert np.array_equal(got, outputs[0])
    call, out, _ = _calls(case, num_heads, num_kv_heads, head_dim, 16, torch.bfloat16)
    for _ in range(12):
        out.fill_(float("nan"))
        call()
        torch.cuda.synchronize()
        assert np.array_equal(out.float().cpu().numpy(), outputs[0])


def test_decode_first_split_launch_captured_in_a_graph():
    """A process whose first launch that would merge its splits in the split kernel is captured
    into a CUDA graph cannot allocate the counters there: that launch merges with the reduction
    kernel instead, and the replays match the CPU reference (in a fresh process, whose counters
    are unallocated)."""
    script = textwrap.dedent("""
        import sys
        sys.path[:0] = [{tests!r}, {here!r}]
        import numpy as np, torch
        import test_attention_decode as t
        case = t._make_case(5, t.MERGED_IN_KERNEL, 32, 8, 128, 16)
        outputs, expected = t._graph_replays(case, 32, 8, 128, 16, torch.bfloat16, replays=3,
                                             eager_first=False)
        for got in outputs:
            t.assert_close_to_reference(got, expected, t.TOLERANCES[torch.bfloat16], "captured",
                                        "request")
        print("ok")
    """).format(tests=str(Path(__file__).parent.parent), here=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_decode_plan_keeps_few_splits_for_one_long_request():
    """Past 32 splits a request's reduction costs more than a fourth CTA per SM gains, so one
    request of 32k keys is planned at 3 CTAs per SM (at least 32 splits), not 4. The
    workspace of a batch of one request holds its splits' partial results (before their
    rounding to whole tiles), so its size tells the plan."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    heads, kv, hd = 32, 8, 128
    slot_bytes = heads * (hd * 4 + 8)  # per split: partial output and (max, sum) of every head

    def rounded(ctas):
        return (ctas + kv // 2) // kv

    splits = _C.ops.decode_workspace_bytes(1, heads, kv, hd, 16, 32768) // slot_bytes
    expected = rounded(4 * sms)
    if expected > 32:
        expected = max(32, rounded(3 * sms))
    assert splits == expected, (sms, splits, expected)


# Decode timings over BENCH.md's shapes are bench/kernels.py's (tests/gpu/test_bench_kernels.py
# runs it); this file holds the kernel to the CPU reference.
