"""The row-wise GPU ops (cuda/elementwise.cu) against the CPU reference, through octavo._C.ops.

Pattern: random inputs made on the CPU in fp32 and rounded to the test dtype (bf16 or fp16); the
CPU reference runs on fp32 numpy copies of exactly those rounded values; the GPU runs on torch
CUDA tensors in the test dtype, with every output buffer poisoned with NaN first so an element the
kernel forgot to write fails (NaN never passes a comparison here).

Tolerances: the kernels compute in fp32 and round once when storing, the reference computes in
fp32/double and is compared before rounding. One rounding to bf16 (8-bit significand) is a relative
error of at most 2^-9 ~ 2e-3 per element, so ||gpu - ref|| / ||ref|| stays well below 1e-2 for
bf16; fp16 (11-bit significand, 2^-11 ~ 4.9e-4) gets 2e-3. Where a result is rounded twice
(the fused residual is stored rounded, then normalised) the same bounds still hold with margin.
Pure data movement (gather_rows, write_kv, embedding without scaling) must be bit-exact.
"""

import math
import zlib

import numpy as np
import pytest
import torch

from octavo import _C

from gpu_testing import cuda_seconds  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DT_ID = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# Enum values (octavo/model_spec.h).
RMS, RMS_PLUS_ONE, LAYER_NORM, LAYER_NORM_NO_WEIGHT = 0, 1, 2, 3
SILU_GLU, GELU_GLU, GELU_TANH_GLU, GELU, GELU_TANH, RELU = 0, 1, 2, 3, 4, 5
NEOX, GPTJ = 0, 1

HEAD_DIMS = [48, 64, 80, 96, 128, 256]
# (num_heads, num_kv_heads): GQA ratios 4, 2, 3, 8 and 1.
HEAD_CONFIGS = [(32, 8), (16, 8), (6, 2), (8, 1), (8, 8)]


# ---- helpers ---------------------------------------------------------------------------------


def seed_of(*params):
    """Seeds torch and returns a numpy generator, both from the test's parameters (stable across runs)."""
    seed = zlib.crc32(repr(params).encode())
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def rand(shape, dtype, scale=1.0, shift=0.0):
    """(tensor in `dtype` on the CPU, the same values as fp32 numpy)."""
    t = (torch.randn(shape, dtype=torch.float32) * scale + shift).to(dtype)
    return t, t.float().numpy().copy()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def to_np(t):
    return t.float().cpu().numpy()


def assert_close(got, ref, dtype, what=""):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert not np.isnan(got).any(), f"{what}: {np.isnan(got).sum()} NaN (unwritten?) of {got.size}"
    denom = max(np.linalg.norm(ref), 1e-30)
    err = np.linalg.norm(got - ref) / denom
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]}"


def assert_same_bits(got, ref, what=""):
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref, err_msg=what)  # NaN equals NaN here: compare masks too


def cos_sin_table(max_position, rotary_dim, theta=10000.0):
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    angles = np.arange(max_position, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.ascontiguousarray(np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32))


def cuda_i32(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).cuda()


def cuda_i64(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).cuda()


def count_kernels(fn):
    """Number of GPU kernels `fn` launches (torch profiler / CUPTI), or None if unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception:  # no CUPTI, profiler already active, ...
        return None
    events = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return len(kernels)


# ---- embedding -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("hidden", [48, 96, 1024, 4096, 100, 7])
@pytest.mark.parametrize("learned_positions", [False, True])
def test_embedding(dtype, hidden, learned_positions):
    rng = seed_of("embedding", dtype, hidden, learned_positions)
    vocab, num_tokens = 1000, 37
    table, table_np = rand((vocab, hidden), dtype)
    ids = rng.integers(0, vocab, num_tokens).astype(np.int32)
    ids[0], ids[-1] = 0, vocab - 1
    scale = 1.0 if not learned_positions else math.sqrt(hidden)
    ref = np.zeros((num_tokens, hidden), np.float32)
    out = poisoned((num_tokens, hidden), dtype)
    if learned_positions:
        num_positions, offset = 300, 2  # OPT stores 2 extra rows
        positions, positions_np = rand((num_positions, hidden), dtype)
        pos_ids = rng.integers(0, num_positions - offset, num_tokens).astype(np.int32)
        _C.ops.embedding(ids, table_np, ref, scale, positions_np, pos_ids, offset)
        _C.ops.embedding(cuda_i32(ids), table.cuda(), out, scale, positions.cuda(), cuda_i32(pos_ids), offset)
    else:
        _C.ops.embedding(ids, table_np, ref, scale)
        _C.ops.embedding(cuda_i32(ids), table.cuda(), out, scale)
    torch.cuda.synchronize()
    if learned_positions:
        assert_close(to_np(out), ref, dtype, "embedding")
    else:  # a pure copy: bit-exact
        assert_same_bits(to_np(out), ref, "embedding")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_embedding_deferred_ids_match_the_reference(dtype):
    """Async scheduling's deferred ids (-1 - i reads deferred_token_ids[i], the previous step's
    sampled tokens on the device) against the CPU reference, a flagged row (outside the
    vocabulary) included: bit-exact copies."""
    rng = seed_of("deferred", dtype)
    vocab, hidden, num_tokens = 1000, 128, 300
    table, table_np = rand((vocab, hidden), dtype)
    deferred = rng.integers(0, vocab, 256).astype(np.int32)
    deferred[17] = -5  # a row the sampler flagged
    ids = rng.integers(0, vocab, num_tokens).astype(np.int32)
    pick = rng.random(num_tokens) < 0.7
    ids[pick] = -1 - rng.integers(0, len(deferred), int(pick.sum())).astype(np.int32)
    ids[0] = -18
    ref = np.full((num_tokens, hidden), -3.0, np.float32)
    _C.ops.embedding(ids, table_np, ref, 1.0, deferred_token_ids=deferred)
    out = poisoned((num_tokens, hidden), dtype)
    _C.ops.embedding(cuda_i32(ids), table.cuda(), out, 1.0, deferred_token_ids=cuda_i32(deferred))
    got = to_np(out)
    np.testing.assert_array_equal(got[0], 0.0)
    assert_same_bits(got, ref, "embedding with deferred ids")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_embedding_invalid_ids_give_zero_rows(dtype):
    """The GPU cannot throw on a bad id without a sync: it writes a zero row and reads nothing."""
    vocab, hidden = 50, 64
    table, table_np = rand((vocab, hidden), dtype)
    ids = np.array([3, -1, vocab, 7, 2**30], np.int32)
    out = poisoned((len(ids), hidden), dtype)
    _C.ops.embedding(cuda_i32(ids), table.cuda(), out)
    got = to_np(out)
    np.testing.assert_array_equal(got[[1, 2, 4]], 0.0)
    np.testing.assert_array_equal(got[0], table_np[3])
    np.testing.assert_array_equal(got[3], table_np[7])
    # A learned position past the table also gives a zero row.
    positions, _ = rand((10, hidden), dtype)
    out = poisoned((2, hidden), dtype)
    _C.ops.embedding(cuda_i32([1, 2]), table.cuda(), out, 1.0, positions.cuda(), cuda_i32([9, 3]), 1)
    got = to_np(out)
    np.testing.assert_array_equal(got[0], 0.0)
    assert not np.isnan(got[1]).any()


# ---- norm ------------------------------------------------------------------------------------


def norm_inputs(kind, hidden, dtype, with_bias):
    weight = bias = None
    if kind == RMS:
        weight = rand((hidden,), dtype, 0.2, 1.0)
    elif kind == RMS_PLUS_ONE:
        weight = rand((hidden,), dtype, 0.2)  # Gemma stores w; the op uses 1 + w
    elif kind == LAYER_NORM:
        weight = rand((hidden,), dtype, 0.2, 1.0)
        if with_bias:
            bias = rand((hidden,), dtype, 0.5)
    return weight, bias


def run_norm(kind, rows, hidden, dtype, with_residual, with_bias=True, row_stride=None, in_place=False):
    row_stride = row_stride or hidden
    shift = 3.0 if kind in (LAYER_NORM, LAYER_NORM_NO_WEIGHT) else 0.0  # a mean to subtract
    x, x_np = rand((rows, row_stride), dtype, 1.0, shift)
    weight, bias = norm_inputs(kind, hidden, dtype, with_bias)
    residual = rand((rows, hidden), dtype) if with_residual else None
    eps = 1e-5

    ref_out = x_np.copy() if in_place else np.full_like(x_np, np.nan)
    ref_res = residual[1].copy() if with_residual else None
    _C.ops.norm(x_np.copy() if not in_place else ref_out, ref_out,
                weight[1] if weight else None, bias[1] if bias else None, ref_res, kind, eps,
                hidden, row_stride)

    x_gpu = x.cuda()
    out = x_gpu if in_place else poisoned((rows, row_stride), dtype)
    res_gpu = residual[0].cuda() if with_residual else None
    _C.ops.norm(x_gpu, out, weight[0].cuda() if weight else None, bias[0].cuda() if bias else None,
                res_gpu, kind, eps, hidden, row_stride)
    torch.cuda.synchronize()
    got = to_np(out)
    assert_close(got[:, :hidden], ref_out[:, :hidden], dtype, "norm out")
    if row_stride > hidden:  # past `hidden` each row is untouched
        expected_tail = x_np[:, hidden:] if in_place else np.full_like(x_np[:, hidden:], np.nan)
        assert_same_bits(got[:, hidden:], expected_tail, "norm row tail")
    if with_residual:
        assert_close(to_np(res_gpu), ref_res, dtype, "norm residual")


NORM_HIDDENS = [48, 96, 128, 1024, 1056, 4096, 16384, 100, 33]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("hidden", NORM_HIDDENS)
@pytest.mark.parametrize("kind", [RMS, RMS_PLUS_ONE, LAYER_NORM, LAYER_NORM_NO_WEIGHT])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_norm(dtype, hidden, kind, with_residual):
    seed_of("norm", dtype, hidden, kind, with_residual)
    rows = max(1, min(67, (1 << 19) // hidden))
    run_norm(kind, rows, hidden, dtype, with_residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (1, 48), (5, 16384), (4096, 1024), (3000, 64)])
def test_norm_row_counts(dtype, rows, hidden):
    """Decode (one row), many rows of a small hidden (QK norm), a prefill of a small model."""
    seed_of("norm_rows", dtype, rows, hidden)
    run_norm(RMS, rows, hidden, dtype, with_residual=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_layer_norm_without_bias(dtype):
    seed_of("ln_nobias", dtype)
    run_norm(LAYER_NORM, 9, 2048, dtype, with_residual=False, with_bias=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden,row_stride", [(4096, 4096), (128, 384), (64, 200), (48, 50), (2048, 2056)])
def test_norm_in_place_and_strided(dtype, with_residual, hidden, row_stride):
    """out aliases x; rows at row_stride (QK norm on a head of a wider row): the rest untouched."""
    seed_of("norm_inplace", dtype, with_residual, hidden, row_stride)
    run_norm(RMS, 13, hidden, dtype, with_residual, row_stride=row_stride, in_place=True)
    run_norm(LAYER_NORM, 13, hidden, dtype, with_residual, row_stride=row_stride, in_place=True)


def run_grouped_norm(tokens, heads, kv_heads, head_dim, hidden, dtype, in_place, with_residual):
    """The executor's QK norm: q's heads, then k's, of a fused [tokens, q | k | v] matrix, each a
    group of rows head_dim apart inside a qkv row; the first `hidden` of each head are normalised."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    width = q_size + 2 * kv_size
    qkv, qkv_np = rand((tokens, width), dtype)
    ref = qkv_np.copy()  # the CPU reference runs in place
    x_gpu = qkv.cuda()
    out = x_gpu if in_place else poisoned((tokens, width), dtype)
    normalised = np.zeros((tokens, width), bool)
    for offset, group in ((0, heads), (q_size, kv_heads)):
        weight, weight_np = rand((head_dim,), dtype, 0.2, 1.0)
        residual = rand((tokens * group, hidden), dtype) if with_residual else None
        layout = dict(kind=RMS, eps=1e-6, hidden=hidden, row_stride=head_dim, rows_per_group=group,
                      group_stride=width)
        ref_res = residual[1].copy() if with_residual else None
        ref_view = ref.reshape(-1)[offset:]
        _C.ops.norm(ref_view, ref_view, weight_np, None, ref_res, **layout)
        res_gpu = residual[0].cuda() if with_residual else None
        _C.ops.norm(x_gpu.view(-1)[offset:], out.view(-1)[offset:], weight.cuda(), None, res_gpu, **layout)
        torch.cuda.synchronize()
        if with_residual:
            assert_close(to_np(res_gpu), ref_res, dtype, "grouped norm residual")
        for h in range(group):
            normalised[:, offset + h * head_dim:offset + h * head_dim + hidden] = True
    got = to_np(out)
    assert_close(got[normalised], ref[normalised], dtype, "grouped norm heads")
    # v, and the tail of each head past `hidden`: untouched (in place) or never written (poison).
    untouched = qkv_np if in_place else np.full_like(qkv_np, np.nan)
    assert_same_bits(got[~normalised], untouched[~normalised], "grouped norm outside the heads")


GROUPED_NORM_CASES = [
    # tokens, heads, kv_heads, head_dim, hidden
    (37, 16, 8, 128, 128),  # Qwen3-0.6B's heads, a prefill
    (1, 32, 8, 128, 128),   # one decode token of a GQA model
    (5, 6, 2, 64, 64),
    (7, 4, 1, 33, 33),      # odd head_dim: the scalar (one element per chunk) path
    (3, 4, 2, 128, 96),     # rows narrower than their stride: gaps inside a group too
    (2, 2, 1, 2048, 2048),  # rows long enough for one thread block each
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,hidden", GROUPED_NORM_CASES)
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out_of_place"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_norm_grouped_rows_of_a_fused_qkv(dtype, tokens, heads, kv_heads, head_dim, hidden, in_place,
                                          with_residual):
    seed_of("norm_grouped", dtype, tokens, heads, kv_heads, head_dim, hidden, in_place, with_residual)
    run_grouped_norm(tokens, heads, kv_heads, head_dim, hidden, dtype, in_place, with_residual)


def test_norm_rejects_bad_grouping():
    x = torch.zeros((2, 64), dtype=torch.bfloat16, device="cuda")
    w = torch.ones(16, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="rows_per_group is -1"):
        _C.ops.norm(x, x, w, row_stride=16, rows_per_group=-1)
    with pytest.raises(ValueError, match="group_stride is 64 but rows_per_group is 0"):
        _C.ops.norm(x, x, w, row_stride=16, group_stride=64)
    with pytest.raises(ValueError, match="group_stride 40 is below the 64 elements"):
        _C.ops.norm(x, x, w, row_stride=16, rows_per_group=4, group_stride=40)


def test_norm_rejects_mixed_dtypes_and_huge_rows():
    x = torch.zeros((2, 64), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="weight dtype float16 differs"):
        _C.ops.norm(x, x, torch.ones(64, dtype=torch.float16, device="cuda"))
    big = torch.zeros((1, 32768), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="hidden is 32768"):
        _C.ops.norm(big, big, torch.ones(32768, dtype=torch.bfloat16, device="cuda"))
    x32 = torch.zeros((2, 64), dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        _C.ops.norm(x32, x32, torch.ones(64, dtype=torch.float32, device="cuda"))


# ---- rotary ----------------------------------------------------------------------------------

ROTARY_CASES = (
    [(d, h, kv, d, NEOX) for d in HEAD_DIMS for (h, kv) in HEAD_CONFIGS]
    + [(d, 32, 8, d, GPTJ) for d in HEAD_DIMS]
    + [(d, 6, 2, d, GPTJ) for d in HEAD_DIMS]
    # partial rotary: GPT-NeoX/Phi (32 of 128 / 80), half, and shapes that take the scalar path
    + [(128, 16, 8, 32, NEOX), (80, 32, 8, 32, NEOX), (64, 8, 1, 32, GPTJ), (256, 8, 8, 64, GPTJ),
       (80, 32, 32, 20, NEOX), (80, 32, 32, 20, GPTJ), (96, 6, 2, 24, NEOX), (96, 6, 2, 24, GPTJ),
       (64, 8, 2, 2, NEOX)]
)


def case_id(case):
    d, h, kv, rot, pairing = case
    return f"d{d}-h{h}-kv{kv}-rot{rot}-{'neox' if pairing == NEOX else 'gptj'}"


def qkv_buffer(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """A fused qkv projection output [tokens, (H + 2 KV) * D]: q, k, v are strided views."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    return rand((num_tokens, width), dtype) + (width,)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", ROTARY_CASES, ids=case_id)
def test_rotary_strided_in_qkv(dtype, case):
    head_dim, num_heads, num_kv_heads, rotary_dim, pairing = case
    rng = seed_of("rotary", dtype, case)
    num_tokens, max_position = 67, 4096
    qkv, qkv_np, width = qkv_buffer(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    positions = rng.integers(0, max_position, num_tokens).astype(np.int32)
    positions[:3] = [0, 1, max_position - 1]
    cos_sin = cos_sin_table(max_position, rotary_dim)
    k_offset = num_heads * head_dim
    args = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                rotary_dim=rotary_dim, pairing=pairing, q_stride=width, k_stride=width, k_offset=k_offset)
    ref = qkv_np.copy()
    _C.ops.rotary(ref, ref, positions, cos_sin, **args)
    gpu = qkv.cuda()
    _C.ops.rotary(gpu, gpu, cuda_i32(positions), torch.from_numpy(cos_sin).cuda(), **args)
    torch.cuda.synchronize()
    got = to_np(gpu)
    kv_end = k_offset + num_kv_heads * head_dim
    assert_close(got[:, :k_offset], ref[:, :k_offset], dtype, "rotary q")
    assert_close(got[:, k_offset:kv_end], ref[:, k_offset:kv_end], dtype, "rotary k")
    # v and every head's elements past rotary_dim are not touched (bit-exact).
    assert_same_bits(got[:, kv_end:], qkv_np[:, kv_end:], "v")
    heads = got[:, :kv_end].reshape(num_tokens, -1, head_dim)
    assert_same_bits(heads[:, :, rotary_dim:], qkv_np[:, :kv_end].reshape(num_tokens, -1, head_dim)[:, :, rotary_dim:], "tail")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_rotary_dense_q_only_k_only_and_bad_positions(dtype):
    seed_of("rotary_dense", dtype)
    num_tokens, h, kv, d, max_position = 9, 16, 4, 128, 64
    q, q_np = rand((num_tokens, h * d), dtype)
    k, k_np = rand((num_tokens, kv * d), dtype)
    positions = np.arange(num_tokens, dtype=np.int32) * 7
    positions[4] = -1           # out of the table: left unrotated on the GPU
    positions[5] = max_position  # likewise
    cos_sin = cos_sin_table(max_position, d)
    good = np.array([t for t in range(num_tokens) if t not in (4, 5)])
    ref_q, ref_k = q_np[good].copy(), k_np[good].copy()
    _C.ops.rotary(ref_q, ref_k, positions[good], cos_sin, h, kv, d)
    q_gpu, k_gpu = q.cuda(), k.cuda()
    table = torch.from_numpy(cos_sin).cuda()
    _C.ops.rotary(q_gpu, None, cuda_i32(positions), table, h, kv, d)  # q only
    _C.ops.rotary(None, k_gpu, cuda_i32(positions), table, h, kv, d)  # k only
    got_q, got_k = to_np(q_gpu), to_np(k_gpu)
    assert_close(got_q[good], ref_q, dtype, "q")
    assert_close(got_k[good], ref_k, dtype, "k")
    assert_same_bits(got_q[[4, 5]], q_np[[4, 5]], "q at bad positions")
    assert_same_bits(got_k[[4, 5]], k_np[[4, 5]], "k at bad positions")


# ---- write_kv and the fused rotary + write_kv ------------------------------------------------


def make_batch(rng, context_lens, block_size, decode, extra_blocks=5):
    """Slots and positions of a batch: request r has context_lens[r] tokens; prefill writes them
    all, decode only the last one. Blocks are a random permutation of the pool (for decode only
    the block of the last token is given one, so long contexts stay cheap). A padding (-1) entry
    follows each request."""
    blocks_needed = [1 if decode else (n + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(blocks_needed) + extra_blocks
    perm = rng.permutation(num_blocks)
    slots, positions, start = [], [], 0
    for n, nb in zip(context_lens, blocks_needed):
        table = perm[start:start + nb]
        start += nb
        if decode:  # only the last block is real
            table = np.full((n + block_size - 1) // block_size, -10**9, np.int64)
            table[-1] = perm[start - 1]
        first = n - 1 if decode else 0
        for pos in range(first, n):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
        slots.append(-1)  # padding token
        positions.append(0)
    return num_blocks, np.array(slots, np.int64), np.array(positions, np.int32)


def kv_cases():
    cases = []
    for i, d in enumerate(HEAD_DIMS):
        for j, (h, kv) in enumerate(HEAD_CONFIGS):
            bs = (16, 32)[(i + j) % 2]
            cases.append((d, h, kv, bs))
    cases += [(128, 32, 8, 32), (128, 8, 8, 16), (64, 6, 2, 32), (48, 8, 1, 16)]
    return cases


def kv_id(case):
    d, h, kv, bs = case
    return f"d{d}-h{h}-kv{kv}-bs{bs}"


CONTEXTS = {"prefill": [1, 15, 16, 33, 300], "decode": [1, 2, 17, 32, 1000, 4000, 257, 64, 3, 16, 48, 2049]}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("case", kv_cases(), ids=kv_id)
def test_write_kv(dtype, mode, case):
    head_dim, num_heads, num_kv_heads, block_size = case
    rng = seed_of("write_kv", dtype, mode, case)
    num_blocks, slots, _ = make_batch(rng, CONTEXTS[mode], block_size, mode == "decode")
    num_tokens = len(slots)
    qkv, qkv_np, width = qkv_buffer(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    k_off, v_off = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    shape = (num_blocks, 2, num_kv_heads, block_size, head_dim)
    args = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                k_stride=width, v_stride=width, k_offset=k_off, v_offset=v_off)
    ref = np.full(shape, np.nan, np.float32)
    _C.ops.write_kv(qkv_np, qkv_np, ref, slots, **args)
    cache = poisoned(shape, dtype)
    gpu = qkv.cuda()
    _C.ops.write_kv(gpu, gpu, cache, cuda_i64(slots), **args)
    torch.cuda.synchronize()
    # A copy: bit-exact, and slots nobody wrote stay NaN.
    assert_same_bits(to_np(cache), ref, "cache")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("head_dim", [64, 80, 6])
def test_write_kv_dense(dtype, head_dim):
    """Dense k and v (separate arrays); head_dim 6 takes the scalar path."""
    rng = seed_of("write_kv_dense", dtype, head_dim)
    kv, bs = 2, 16
    num_blocks, slots, _ = make_batch(rng, [40, 1, 17], bs, decode=False)
    k, k_np = rand((len(slots), kv * head_dim), dtype)
    v, v_np = rand((len(slots), kv * head_dim), dtype)
    shape = (num_blocks, 2, kv, bs, head_dim)
    ref = np.full(shape, np.nan, np.float32)
    _C.ops.write_kv(k_np, v_np, ref, slots, kv, head_dim, bs)
    cache = poisoned(shape, dtype)
    _C.ops.write_kv(k.cuda(), v.cuda(), cache, cuda_i64(slots), kv, head_dim, bs)
    assert_same_bits(to_np(cache), ref, "cache")


def fused_cases():
    cases = [(d, h, kv, bs, d, NEOX) for (d, h, kv, bs) in kv_cases()]
    cases += [(d, 32, 8, 16, d, GPTJ) for d in HEAD_DIMS]
    cases += [(128, 16, 8, 32, 32, NEOX), (80, 32, 8, 16, 32, NEOX), (80, 32, 32, 16, 20, NEOX),
              (80, 32, 32, 32, 20, GPTJ), (64, 8, 1, 16, 32, GPTJ)]
    return cases


def fused_id(case):
    d, h, kv, bs, rot, pairing = case
    return f"d{d}-h{h}-kv{kv}-bs{bs}-rot{rot}-{'neox' if pairing == NEOX else 'gptj'}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("case", fused_cases(), ids=fused_id)
@pytest.mark.parametrize("qk_norm", [None, "rms", "rms_plus_one"])
def test_rotary_write_kv(dtype, mode, case, qk_norm):
    """With QK norm: in the kernel when every element rotates, else two norm launches first."""
    head_dim, num_heads, num_kv_heads, block_size, rotary_dim, pairing = case
    rng = seed_of("fused", dtype, mode, case, qk_norm)
    num_blocks, slots, positions = make_batch(rng, CONTEXTS[mode], block_size, mode == "decode")
    num_tokens = len(slots)
    qkv, qkv_np, width = qkv_buffer(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    cos_sin = cos_sin_table(4096, rotary_dim)
    k_off, v_off = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    shape = (num_blocks, 2, num_kv_heads, block_size, head_dim)
    args = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                block_size=block_size, rotary_dim=rotary_dim, pairing=pairing, q_stride=width,
                k_stride=width, v_stride=width, k_offset=k_off, v_offset=v_off)
    gpu_norm = {}
    if qk_norm:
        q_w, q_w_np = rand((head_dim,), dtype)
        k_w, k_w_np = rand((head_dim,), dtype)
        flags = dict(qk_norm_eps=1e-5, qk_norm_plus_one=qk_norm == "rms_plus_one")
        args.update(q_norm_weight=q_w_np, k_norm_weight=k_w_np, **flags)
        gpu_norm = dict(q_norm_weight=q_w.cuda(), k_norm_weight=k_w.cuda())
    ref_qkv = qkv_np.copy()
    ref_cache = np.full(shape, np.nan, np.float32)
    _C.ops.rotary_write_kv(ref_qkv, ref_qkv, ref_qkv, positions, cos_sin, ref_cache, slots, **args)

    gpu = qkv.cuda()
    cache = poisoned(shape, dtype)
    _C.ops.rotary_write_kv(gpu, gpu, gpu, cuda_i32(positions), torch.from_numpy(cos_sin).cuda(),
                           cache, cuda_i64(slots), **{**args, **gpu_norm})
    torch.cuda.synchronize()
    got_qkv, got_cache = to_np(gpu), to_np(cache)
    assert_close(got_qkv[:, :k_off], ref_qkv[:, :k_off], dtype, "q")
    assert_close(got_qkv[:, k_off:v_off], ref_qkv[:, k_off:v_off], dtype, "k")
    assert_same_bits(got_qkv[:, v_off:], qkv_np[:, v_off:], "v untouched")
    # The same cache slots are written (NaN elsewhere), with the reference's values.
    np.testing.assert_array_equal(np.isnan(got_cache), np.isnan(ref_cache))
    written = ~np.isnan(ref_cache)
    assert_close(got_cache[written], ref_cache[written], dtype, "cache")
    # The cache holds exactly the rotated k the kernel left in place, and v bit for bit.
    cache_t = got_cache.transpose(0, 3, 1, 2, 4).reshape(num_blocks * block_size, 2, num_kv_heads * head_dim)
    valid = slots >= 0
    assert_same_bits(cache_t[slots[valid], 0], got_qkv[valid, k_off:v_off], "cache k vs in-place k")
    assert_same_bits(cache_t[slots[valid], 1], qkv_np[valid, v_off:], "cache v")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_rotary_write_kv_long_context(dtype):
    """One prompt of several thousand tokens plus short ones, both block sizes."""
    for block_size in (16, 32):
        rng = seed_of("fused_long", dtype, block_size)
        d, h, kv = 128, 32, 8
        num_blocks, slots, positions = make_batch(rng, [3500, 1, 700], block_size, decode=False)
        num_tokens = len(slots)
        qkv, qkv_np, width = qkv_buffer(num_tokens, h, kv, d, dtype)
        cos_sin = cos_sin_table(4096, d)
        shape = (num_blocks, 2, kv, block_size, d)
        args = dict(num_heads=h, num_kv_heads=kv, head_dim=d, block_size=block_size, q_stride=width,
                    k_stride=width, v_stride=width, k_offset=h * d, v_offset=(h + kv) * d)
        ref_qkv, ref_cache = qkv_np.copy(), np.full(shape, np.nan, np.float32)
        _C.ops.rotary_write_kv(ref_qkv, ref_qkv, ref_qkv, positions, cos_sin, ref_cache, slots, **args)
        gpu, cache = qkv.cuda(), poisoned(shape, dtype)
        _C.ops.rotary_write_kv(gpu, gpu, gpu, cuda_i32(positions), torch.from_numpy(cos_sin).cuda(),
                               cache, cuda_i64(slots), **args)
        got_cache = to_np(cache)
        assert_close(to_np(gpu), ref_qkv, dtype, "qkv")
        np.testing.assert_array_equal(np.isnan(got_cache), np.isnan(ref_cache))
        written = ~np.isnan(ref_cache)
        assert_close(got_cache[written], ref_cache[written], dtype, "cache")


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_write_kv_is_one_kernel(qk_norm):
    d, h, kv, bs = 128, 32, 8, 16
    num_tokens = 64
    qkv = torch.randn((num_tokens, (h + 2 * kv) * d), device="cuda").to(torch.bfloat16)
    cache = torch.zeros((8, 2, kv, bs, d), dtype=torch.bfloat16, device="cuda")
    slots = cuda_i64(np.arange(num_tokens))
    positions = cuda_i32(np.arange(num_tokens))
    table = torch.from_numpy(cos_sin_table(128, d)).cuda()
    width = qkv.shape[1]
    weights = {}
    if qk_norm:
        weights = dict(q_norm_weight=torch.ones(d, dtype=torch.bfloat16, device="cuda"),
                       k_norm_weight=torch.ones(d, dtype=torch.bfloat16, device="cuda"))

    def call():
        _C.ops.rotary_write_kv(qkv, qkv, qkv, positions, table, cache, slots, h, kv, d, bs,
                               q_stride=width, k_stride=width, v_stride=width, k_offset=h * d,
                               v_offset=(h + kv) * d, **weights)

    call()
    n = count_kernels(call)
    if n is None:
        pytest.skip("torch.profiler unavailable")
    assert n == 1, f"rotary_write_kv launched {n} kernels; it must be one fused kernel"


def test_rotary_write_kv_rejects_mismatched_k():
    d, h, kv, bs = 64, 4, 2, 16
    q = torch.zeros((3, h * d), dtype=torch.bfloat16, device="cuda")
    k = torch.zeros((3, kv * d), dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros((2, 2, kv, bs, d), dtype=torch.float16, device="cuda")
    table = torch.from_numpy(cos_sin_table(16, d)).cuda()
    with pytest.raises(ValueError, match="cache dtype float16 differs"):
        _C.ops.rotary_write_kv(q, k, k, cuda_i32([0, 1, 2]), table, cache, cuda_i64([0, 1, 2]), h, kv, d, bs)


# ---- activation ------------------------------------------------------------------------------

ACTIVATIONS = {SILU_GLU: "silu_glu", GELU_GLU: "gelu_glu", GELU_TANH_GLU: "gelu_tanh_glu",
               GELU: "gelu", GELU_TANH: "gelu_tanh", RELU: "relu"}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("act", list(ACTIVATIONS), ids=ACTIVATIONS.get)
@pytest.mark.parametrize("num_tokens,inter", [(1, 11008), (33, 48), (7, 14336), (65, 96), (5, 100), (3, 7), (300, 1024)])
def test_activation(dtype, act, num_tokens, inter):
    seed_of("act", dtype, act, num_tokens, inter)
    glu = act in (SILU_GLU, GELU_GLU, GELU_TANH_GLU)
    x, x_np = rand((num_tokens, 2 * inter if glu else inter), dtype, 2.0)
    ref = np.full((num_tokens, inter), np.nan, np.float32)
    _C.ops.activation(x_np, ref, act)
    out = poisoned((num_tokens, inter), dtype)
    _C.ops.activation(x.cuda(), out, act)
    assert_close(to_np(out), ref, dtype, ACTIVATIONS[act])


@pytest.mark.parametrize("act", [GELU, GELU_TANH, RELU], ids=lambda a: ACTIVATIONS[a])
def test_activation_in_place(act):
    dtype = torch.bfloat16
    seed_of("act_inplace", act)
    x, x_np = rand((17, 4096), dtype, 2.0)
    ref = np.empty_like(x_np)
    _C.ops.activation(x_np, ref, act)
    gpu = x.cuda()
    _C.ops.activation(gpu, gpu, act)
    assert_close(to_np(gpu), ref, dtype, "in place")


# ---- row scales: an RMSNorm folded into the projection before the op -------------------------

# (head_dim, heads, kv heads, pairing, QK norm, stream width): QK norm from the items' registers
# (128 NeoX, 64 and 256 GPT-J) and from the first pass (80 NeoX: 5 items a head); stream rows of
# 16-byte chunks (1024, 4096) and scalar ones (100, 1001).
ROW_SCALE_CASES = [(128, 16, 8, NEOX, True, 1024), (128, 32, 8, NEOX, False, 4096),
                   (64, 8, 1, GPTJ, True, 100), (80, 32, 8, NEOX, True, 1001),
                   (256, 8, 2, GPTJ, True, 4096)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("case", ROW_SCALE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rotary_write_kv_row_scale(dtype, mode, case):
    """Each token's q, k and v times its stream row's 1 / RMS, before QK norm and rotation."""
    head_dim, num_heads, num_kv_heads, pairing, qk_norm, hidden = case
    rng = seed_of("fused_row_scale", dtype, mode, case)
    block_size = 16
    num_blocks, slots, positions = make_batch(rng, CONTEXTS[mode], block_size, mode == "decode")
    num_tokens = len(slots)
    qkv, qkv_np, width = qkv_buffer(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    stream, stream_np = rand((num_tokens, hidden), dtype, 3.0)
    cos_sin = cos_sin_table(4096, head_dim)
    k_off, v_off = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    shape = (num_blocks, 2, num_kv_heads, block_size, head_dim)
    args = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                block_size=block_size, pairing=pairing, q_stride=width, k_stride=width,
                v_stride=width, k_offset=k_off, v_offset=v_off, row_scale_eps=1e-5)
    cpu_extra, gpu_extra = dict(row_scale_source=stream_np), dict(row_scale_source=stream.cuda())
    if qk_norm:
        q_w, q_w_np = rand((head_dim,), dtype)
        k_w, k_w_np = rand((head_dim,), dtype)
        cpu_extra.update(q_norm_weight=q_w_np, k_norm_weight=k_w_np, qk_norm_eps=1e-6)
        gpu_extra.update(q_norm_weight=q_w.cuda(), k_norm_weight=k_w.cuda(), qk_norm_eps=1e-6)
    ref_qkv, ref_cache = qkv_np.copy(), np.full(shape, np.nan, np.float32)
    _C.ops.rotary_write_kv(ref_qkv, ref_qkv, ref_qkv, positions, cos_sin, ref_cache, slots,
                           **args, **cpu_extra)
    gpu, cache = qkv.cuda(), poisoned(shape, dtype)
    _C.ops.rotary_write_kv(gpu, gpu, gpu, cuda_i32(positions), torch.from_numpy(cos_sin).cuda(),
                           cache, cuda_i64(slots), **args, **gpu_extra)
    got_qkv, got_cache = to_np(gpu), to_np(cache)
    assert_close(got_qkv[:, :v_off], ref_qkv[:, :v_off], dtype, "q and k")
    assert_same_bits(got_qkv[:, v_off:], qkv_np[:, v_off:], "v in the buffer untouched")
    np.testing.assert_array_equal(np.isnan(got_cache), np.isnan(ref_cache))
    written = ~np.isnan(ref_cache)
    assert_close(got_cache[written], ref_cache[written], dtype, "cache (k and the scaled v)")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("act", [SILU_GLU, GELU_TANH_GLU, GELU], ids=lambda a: ACTIVATIONS[a])
@pytest.mark.parametrize("num_tokens, inter, hidden",
                         [(1, 3072, 1024), (7, 14336, 4096), (300, 100, 1001), (33, 3072, 100),
                          (600, 14336, 4096), (150, 6144, 700), (70000, 8, 64)])
def test_activation_row_scale(dtype, act, num_tokens, inter, hidden):
    """Each input row times its stream row's 1 / RMS first; 70,000 rows pass gridDim.y's limit;
    on up to 150 SMs 600 rows get one block a row (many chunks a thread), 150 rows a few."""
    seed_of("act_row_scale", dtype, act, num_tokens, inter, hidden)
    glu = act in (SILU_GLU, GELU_GLU, GELU_TANH_GLU)
    x, x_np = rand((num_tokens, 2 * inter if glu else inter), dtype, 2.0)
    stream, stream_np = rand((num_tokens, hidden), dtype, 3.0)
    ref = np.full((num_tokens, inter), np.nan, np.float32)
    _C.ops.activation(x_np, ref, act, row_scale_source=stream_np, row_scale_eps=1e-5)
    out = poisoned((num_tokens, inter), dtype)
    _C.ops.activation(x.cuda(), out, act, row_scale_source=stream.cuda(), row_scale_eps=1e-5)
    assert_close(to_np(out), ref, dtype, ACTIVATIONS[act])


# ---- gather_rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("width", [48, 96, 4096, 100, 7, 16384])
def test_gather_rows(dtype, width):
    rng = seed_of("gather", dtype, width)
    x, x_np = rand((300, width), dtype)
    rows = rng.integers(0, 300, 41).astype(np.int32)
    rows[:3] = [299, 0, 299]  # repeats and the ends
    ref = np.full((len(rows), width), np.nan, np.float32)
    _C.ops.gather_rows(x_np, rows, ref)
    out = poisoned((len(rows), width), dtype)
    _C.ops.gather_rows(x.cuda(), cuda_i32(rows), out)
    assert_same_bits(to_np(out), ref, "gather")


def test_gather_rows_negative_index_gives_zero_row():
    x = torch.randn((4, 64), device="cuda").to(torch.float16)
    out = poisoned((2, 64), torch.float16)
    _C.ops.gather_rows(x, cuda_i32([-1, 2]), out)
    got = to_np(out)
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_array_equal(got[1], to_np(x)[2])


# ---- add_logit_bias --------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [32000, 151936, 97])
def test_add_logit_bias(vocab):
    rng = seed_of("bias", vocab)
    num_rows = 37
    logits = rng.standard_normal((num_rows, vocab)).astype(np.float32)
    counts = rng.integers(0, 6, num_rows)
    counts[0], counts[1] = 0, min(300, vocab)  # an empty row and a long one
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ids = np.concatenate([rng.choice(vocab, c, replace=False) for c in counts]).astype(np.int32)
    bias = rng.standard_normal(len(ids)).astype(np.float32) * 5
    bias[::7] = -np.inf  # suppressed tokens
    # A row naming one token twice (EOS suppressed and biased): both add.
    ids[offsets[2]:offsets[2] + 2] = vocab - 1
    ref = logits.copy()
    _C.ops.add_logit_bias(ref, offsets, ids, bias)
    gpu = torch.from_numpy(logits).cuda()
    _C.ops.add_logit_bias(gpu, cuda_i32(offsets), cuda_i32(ids), torch.from_numpy(bias).cuda())
    got = gpu.cpu().numpy()
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert not np.isnan(got).any()
    # Exact except where a row adds twice to one logit (order of two fp32 additions).
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-6, atol=1e-6)


def test_add_logit_bias_skips_invalid_token():
    logits = torch.zeros((2, 10), device="cuda")
    _C.ops.add_logit_bias(logits, cuda_i32([0, 2, 3]), cuda_i32([10, 3, -1]),
                          torch.tensor([1.0, 2.0, 3.0], device="cuda"))
    got = logits.cpu().numpy()
    expected = np.zeros((2, 10), np.float32)
    expected[0, 3] = 2.0
    np.testing.assert_array_equal(got, expected)


# ---- bandwidth report (printed, not pass/fail) -----------------------------------------------


def test_elementwise_bandwidth_report():
    bf16 = torch.bfloat16
    lines = []
    # Fused residual add + RMSNorm, 4096 tokens x 4096: reads x, residual, writes residual, out.
    rows, hidden = 4096, 4096
    x = torch.randn((rows, hidden), device="cuda").to(bf16)
    res = torch.randn((rows, hidden), device="cuda").to(bf16)
    out = torch.empty_like(x)
    w = torch.ones(hidden, dtype=bf16, device="cuda")
    s = cuda_seconds(lambda: _C.ops.norm(x, out, w, None, res, RMS, 1e-6))
    lines.append(f"norm+residual {rows}x{hidden}: {s * 1e6:.1f} us, {4 * x.numel() * 2 / s / 1e12:.2f} TB/s")
    for hidden in (128, 16384):  # QK norm shape; the widest row
        rows = (1 << 24) // hidden
        x = torch.randn((rows, hidden), device="cuda").to(bf16)
        w = torch.ones(hidden, dtype=bf16, device="cuda")
        s = cuda_seconds(lambda: _C.ops.norm(x, x, w, None, None, RMS, 1e-6))
        lines.append(f"norm {rows}x{hidden} in place: {s * 1e6:.1f} us, {2 * x.numel() * 2 / s / 1e12:.2f} TB/s")
    # SiLU-GLU, 4096 tokens x 14336.
    x = torch.randn((4096, 2 * 14336), device="cuda").to(bf16)
    out = torch.empty((4096, 14336), dtype=bf16, device="cuda")
    s = cuda_seconds(lambda: _C.ops.activation(x, out, SILU_GLU))
    lines.append(f"silu_glu 4096x14336: {s * 1e6:.1f} us, {(x.numel() + out.numel()) * 2 / s / 1e12:.2f} TB/s")
    # Fused rotary + write_kv, 4096 tokens of Llama-3-8B (32/8 heads, 128): q, k read+written,
    # v read, k and v written to the cache.
    h, kv, d, bs, n = 32, 8, 128, 16, 4096
    qkv = torch.randn((n, (h + 2 * kv) * d), device="cuda").to(bf16)
    cache = torch.empty((n // bs, 2, kv, bs, d), dtype=bf16, device="cuda")
    slots, positions = cuda_i64(np.arange(n)), cuda_i32(np.arange(n))
    table = torch.from_numpy(cos_sin_table(n, d)).cuda()
    width = qkv.shape[1]
    s = cuda_seconds(lambda: _C.ops.rotary_write_kv(qkv, qkv, qkv, positions, table, cache, slots, h, kv, d, bs,
                                             q_stride=width, k_stride=width, v_stride=width,
                                             k_offset=h * d, v_offset=(h + kv) * d))
    moved = n * d * 2 * (2 * h + 2 * kv + kv + 2 * kv)
    lines.append(f"rotary_write_kv {n} tokens 32/8x128: {s * 1e6:.1f} us, {moved / s / 1e12:.2f} TB/s")
    print("\n" + "\n".join(lines))
