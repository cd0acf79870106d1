"""The row-wise op bindings (cpp/src/python/bind_ops_elementwise.cc) on the CPU path, with numpy:
known values, so CI exercises how the bindings turn shapes, strides and offsets into op params.
The GPU kernels are held to these same ops in tests/gpu/test_elementwise.py."""

import math

import numpy as np
import pytest

from octavo import _C

RMS, RMS_PLUS_ONE, LAYER_NORM, LAYER_NORM_NO_WEIGHT = 0, 1, 2, 3
SILU_GLU, GELU_GLU, GELU_TANH_GLU, GELU, GELU_TANH, RELU = 0, 1, 2, 3, 4, 5
NEOX, GPTJ = 0, 1


def test_embedding_picks_scales_and_adds_positions():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = np.zeros((2, 3), np.float32)
    _C.ops.embedding(np.array([2, 0], np.int32), table, out, 2.0)
    np.testing.assert_array_equal(out, [[12, 14, 16], [0, 2, 4]])
    positions = np.full((5, 3), 100.0, np.float32)
    positions[3] = 1000.0
    _C.ops.embedding(np.array([1], np.int32), table, out[:1], 1.0, positions, np.array([1], np.int32), 2)
    np.testing.assert_array_equal(out[0], [1003, 1004, 1005])


def test_embedding_rejects_bad_id():
    table = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="outside the vocabulary of 4"):
        _C.ops.embedding(np.array([4], np.int32), table, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="int32"):
        _C.ops.embedding(np.array([1], np.int64), table, np.zeros((1, 3), np.float32))


def test_rms_norm_of_ones_is_the_weight():
    x = np.ones((3, 8), np.float32)
    out = np.zeros_like(x)
    weight = np.full(8, 2.0, np.float32)
    _C.ops.norm(x, out, weight, eps=0.0)
    np.testing.assert_allclose(out, 2.0, rtol=1e-6)
    _C.ops.norm(x, out, weight, kind=RMS_PLUS_ONE, eps=0.0)  # Gemma: 1 + w
    np.testing.assert_allclose(out, 3.0, rtol=1e-6)


def test_layer_norm_known_values():
    x = np.array([[1, 2, 3, 4]], np.float32)
    out = np.zeros_like(x)
    _C.ops.norm(x, out, kind=LAYER_NORM_NO_WEIGHT, eps=0.0)
    expected = (x - 2.5) / math.sqrt(1.25)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    _C.ops.norm(x, out, np.full(4, 2.0, np.float32), np.ones(4, np.float32), kind=LAYER_NORM, eps=0.0)
    np.testing.assert_allclose(out, expected * 2 + 1, rtol=1e-6)


def test_norm_residual_and_stride():
    # Two rows of 6 of which the first 4 are normalised, in place; the residual is updated.
    x = np.ones((2, 6), np.float32)
    residual = np.ones((2, 4), np.float32)
    _C.ops.norm(x, x, np.ones(4, np.float32), None, residual, RMS, 0.0, hidden=4)
    np.testing.assert_array_equal(residual, 2.0)
    np.testing.assert_allclose(x[:, :4], 1.0, rtol=1e-6)  # 2 / rms(2) = 1
    np.testing.assert_array_equal(x[:, 4:], 1.0)          # past `hidden`: untouched
    with pytest.raises(ValueError, match="not a whole number of rows"):
        _C.ops.norm(np.ones(7, np.float32), np.ones(7, np.float32), np.ones(2, np.float32), row_stride=2)


def rms_norm_heads(heads, weight, eps):
    """numpy RMSNorm of each head (last axis), in float64."""
    heads = heads.astype(np.float64)
    return heads / np.sqrt((heads**2).mean(-1, keepdims=True) + eps) * weight


def test_norm_grouped_rows_are_the_heads_of_a_fused_qkv_row():
    # QK norm in place inside [tokens, q | k | v]: q is x itself (group_stride defaults to its last
    # dim); k is a flat view starting at k, whose last group ends with one token's v.
    rng = np.random.default_rng(0)
    tokens, h, kv, d, eps = 3, 2, 1, 4, 1e-6
    width = (h + 2 * kv) * d
    qkv = rng.standard_normal((tokens, width)).astype(np.float32)
    q_weight, k_weight = (rng.uniform(0.5, 1.5, d).astype(np.float32) for _ in range(2))
    before = qkv.copy()
    _C.ops.norm(qkv, qkv, q_weight, kind=RMS, eps=eps, row_stride=d, rows_per_group=h)
    _C.ops.norm(qkv.reshape(-1)[h * d:], qkv.reshape(-1)[h * d:], k_weight, kind=RMS, eps=eps,
                row_stride=d, rows_per_group=kv, group_stride=width)
    q = before[:, :h * d].reshape(tokens, h, d)
    k = before[:, h * d:(h + kv) * d].reshape(tokens, kv, d)
    np.testing.assert_allclose(qkv[:, :h * d].reshape(tokens, h, d), rms_norm_heads(q, q_weight, eps),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qkv[:, h * d:(h + kv) * d].reshape(tokens, kv, d),
                               rms_norm_heads(k, k_weight, eps), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(qkv[:, (h + kv) * d:], before[:, (h + kv) * d:])  # v untouched
    with pytest.raises(ValueError, match="holds no group of 5 rows"):
        _C.ops.norm(qkv[0], qkv[0], q_weight, row_stride=d, rows_per_group=5, group_stride=width)
    with pytest.raises(ValueError, match="groups would overlap"):
        _C.ops.norm(qkv, qkv, q_weight, row_stride=d, rows_per_group=h, group_stride=h * d - 1)


def test_rotary_quarter_turn_neox_and_gptj():
    # cos_sin row p: [cos..., sin...]; position 1 is a quarter turn for every pair.
    cos_sin = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.float32)
    q = np.array([[1, 2, 3, 4]], np.float32)  # one head of 4
    _C.ops.rotary(q, None, np.array([1], np.int32), cos_sin, 1, 1, 4, pairing=NEOX)
    np.testing.assert_array_equal(q, [[-3, -4, 1, 2]])  # (x1, x2) -> (-x2, x1) for (0,2), (1,3)
    k = np.array([[1, 2, 3, 4]], np.float32)
    _C.ops.rotary(None, k, np.array([1], np.int32), cos_sin, 1, 1, 4, pairing=GPTJ)
    np.testing.assert_array_equal(k, [[-2, 1, -4, 3]])  # pairs (0,1), (2,3)


def test_rotary_strided_q_and_k_in_one_buffer():
    # qkv = [q (2 heads) | k (1 head) | v (1 head)], head_dim 2, rotary_dim 2, position 1.
    cos_sin = np.array([[1, 0], [0, 1]], np.float32)
    qkv = np.arange(16, dtype=np.float32).reshape(2, 8)
    positions = np.array([0, 1], np.int32)
    _C.ops.rotary(qkv, qkv, positions, cos_sin, 2, 1, 2, q_stride=8, k_stride=8, k_offset=4)
    np.testing.assert_array_equal(qkv[0], np.arange(8))  # position 0: identity
    np.testing.assert_array_equal(qkv[1], [-9, 8, -11, 10, -13, 12, 14, 15])  # v untouched


@pytest.mark.parametrize("plus_one", [False, True])
def test_rotary_qk_norm_normalises_each_head_first(plus_one):
    """QK norm (Qwen3): every q and k head RMS-normalised with its weights, then rotated; v and
    the gaps of the fused row untouched."""
    rng = np.random.default_rng(5)
    h, kv, d = 2, 1, 4
    qkv = rng.standard_normal((3, (h + 2 * kv) * d)).astype(np.float32)
    q_w, k_w = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    angles = np.arange(8)[:, None] * np.array([1.0, 0.1])[None, :]
    cos_sin = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    positions = np.array([0, 3, 7], np.int32)
    expected = qkv.copy()

    def rms(x, w):
        scale = (1.0 + w) if plus_one else w
        return x / np.sqrt(np.mean(x * x) + 1e-5) * scale

    for t, p in enumerate(positions):
        cos, sin = cos_sin[p, :2], cos_sin[p, 2:]
        for head, w in [(0, q_w), (1, q_w), (2, k_w)]:
            x = rms(qkv[t, head * d:(head + 1) * d], w)
            x1, x2 = x[:2].copy(), x[2:].copy()
            expected[t, head * d:(head + 1) * d] = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin])
    _C.ops.rotary(qkv, qkv, positions, cos_sin, h, kv, d, q_stride=16, k_stride=16, k_offset=h * d,
                  q_norm_weight=q_w, k_norm_weight=k_w, qk_norm_eps=1e-5, qk_norm_plus_one=plus_one)
    np.testing.assert_allclose(qkv, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="together"):
        _C.ops.rotary(qkv, qkv, positions, cos_sin, h, kv, d, q_stride=16, k_stride=16,
                      k_offset=h * d, q_norm_weight=q_w)


def test_write_kv_layout_and_padding():
    kv_heads, head_dim, block_size, num_blocks = 2, 3, 4, 2
    k = np.arange(12, dtype=np.float32).reshape(2, 6)
    v = -k
    cache = np.zeros((num_blocks, 2, kv_heads, block_size, head_dim), np.float32)
    _C.ops.write_kv(k, v, cache, np.array([5, -1], np.int64), kv_heads, head_dim, block_size)
    # slot 5 = block 1, offset 1; token 1 is padding.
    np.testing.assert_array_equal(cache[1, 0, :, 1], k[0].reshape(2, 3))
    np.testing.assert_array_equal(cache[1, 1, :, 1], v[0].reshape(2, 3))
    assert np.count_nonzero(cache) == 10  # 12 values written; k[0, 0] and v[0, 0] are 0
    with pytest.raises(ValueError, match="int64"):
        _C.ops.write_kv(k, v, cache, np.array([5, -1], np.int32), kv_heads, head_dim, block_size)


def test_rotary_write_kv_is_rotary_then_write_kv():
    rng = np.random.default_rng(0)
    h, kv, d, bs = 2, 1, 4, 4
    qkv = rng.standard_normal((3, (h + 2 * kv) * d)).astype(np.float32)
    angles = np.arange(8)[:, None] * np.array([1.0, 0.1])[None, :]
    cos_sin = np.concatenate([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    positions = np.array([0, 5, 7], np.int32)
    slots = np.array([3, -1, 4], np.int64)
    width = qkv.shape[1]
    strides = dict(q_stride=width, k_stride=width, v_stride=width, k_offset=h * d, v_offset=(h + kv) * d)

    fused_qkv, fused_cache = qkv.copy(), np.zeros((2, 2, kv, bs, d), np.float32)
    _C.ops.rotary_write_kv(fused_qkv, fused_qkv, fused_qkv, positions, cos_sin, fused_cache, slots,
                           h, kv, d, bs, **strides)
    two_qkv, two_cache = qkv.copy(), np.zeros_like(fused_cache)
    _C.ops.rotary(two_qkv, two_qkv, positions, cos_sin, h, kv, d, q_stride=width, k_stride=width,
                  k_offset=h * d)
    _C.ops.write_kv(two_qkv, two_qkv, two_cache, slots, kv, d, bs, k_stride=width, v_stride=width,
                    k_offset=h * d, v_offset=(h + kv) * d)
    np.testing.assert_array_equal(fused_qkv, two_qkv)
    np.testing.assert_array_equal(fused_cache, two_cache)
    assert not np.array_equal(fused_qkv, qkv)


def row_inv_rms(rows, eps):
    return 1.0 / np.sqrt(np.mean(rows.astype(np.float64) ** 2, axis=1) + eps)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_write_kv_row_scale_scales_q_k_and_v_first(qk_norm):
    """A row scale (an RMSNorm folded into the qkv projection): token t's q, k and v times
    rsqrt(mean(stream_t^2) + eps), before the QK norm and the rotation; the cache gets the scaled
    v, the buffer's own v stays as it was."""
    rng = np.random.default_rng(3)
    h, kv, d, bs, hidden = 2, 1, 4, 4, 6
    qkv = rng.standard_normal((3, (h + 2 * kv) * d)).astype(np.float32)
    stream = (rng.standard_normal((3, hidden)) * [[0.5], [3.0], [40.0]]).astype(np.float32)
    angles = np.arange(8)[:, None] * np.array([1.0, 0.1])[None, :]
    cos_sin = np.concatenate([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    positions, slots = np.array([0, 5, 7], np.int32), np.array([3, -1, 4], np.int64)
    width = qkv.shape[1]
    args = dict(q_stride=width, k_stride=width, v_stride=width, k_offset=h * d,
                v_offset=(h + kv) * d)
    norms = {}
    if qk_norm:
        norms = dict(q_norm_weight=rng.standard_normal(d).astype(np.float32),
                     k_norm_weight=rng.standard_normal(d).astype(np.float32), qk_norm_eps=1e-5)

    scaled = qkv * row_inv_rms(stream, 1e-5)[:, None].astype(np.float32)
    want_qkv, want_cache = scaled.copy(), np.zeros((2, 2, kv, bs, d), np.float32)
    _C.ops.rotary_write_kv(want_qkv, want_qkv, want_qkv, positions, cos_sin, want_cache, slots,
                           h, kv, d, bs, **args, **norms)
    got_qkv, got_cache = qkv.copy(), np.zeros_like(want_cache)
    _C.ops.rotary_write_kv(got_qkv, got_qkv, got_qkv, positions, cos_sin, got_cache, slots,
                           h, kv, d, bs, **args, **norms, row_scale_source=stream,
                           row_scale_eps=1e-5)
    k_end = (h + kv) * d
    np.testing.assert_allclose(got_qkv[:, :k_end], want_qkv[:, :k_end], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_qkv[:, k_end:], qkv[:, k_end:])
    np.testing.assert_allclose(got_cache, want_cache, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="row_scale_source"):
        _C.ops.rotary_write_kv(got_qkv, got_qkv, got_qkv, positions, cos_sin, got_cache, slots,
                               h, kv, d, bs, **args, row_scale_source=stream[:2])
    with pytest.raises(ValueError, match="every element to rotate"):
        _C.ops.rotary_write_kv(got_qkv, got_qkv, got_qkv, positions, cos_sin[:, [0, 2]].copy(),
                               got_cache, slots, h, kv, d, bs, rotary_dim=2, **args,
                               row_scale_source=stream)


@pytest.mark.parametrize("act", [SILU_GLU, GELU])
def test_activation_row_scale_scales_the_input_rows_first(act):
    rng = np.random.default_rng(4)
    glu = act == SILU_GLU
    x = rng.standard_normal((3, 10 if glu else 5)).astype(np.float32)
    stream = (rng.standard_normal((3, 7)) * [[0.1], [1.0], [25.0]]).astype(np.float32)
    want = np.zeros((3, 5), np.float32)
    _C.ops.activation(x * row_inv_rms(stream, 1e-6)[:, None].astype(np.float32), want, act)
    got = np.zeros_like(want)
    _C.ops.activation(x, got, act, row_scale_source=stream, row_scale_eps=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="eps"):
        _C.ops.activation(x, got, act, row_scale_source=stream, row_scale_eps=-1.0)


def test_activation_known_values():
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    out = np.zeros_like(x)
    _C.ops.activation(x, out, RELU)
    np.testing.assert_array_equal(out, [[0, 0, 2]])
    _C.ops.activation(x, out, GELU)
    np.testing.assert_allclose(out, [[-0.15865525, 0.0, 1.9544997]], rtol=1e-6)
    # GLU: x = [gate | up] is twice as wide as out.
    glu_in = np.array([[0.0, 1.0, 3.0, 4.0]], np.float32)
    glu_out = np.zeros((1, 2), np.float32)
    _C.ops.activation(glu_in, glu_out, SILU_GLU)
    np.testing.assert_allclose(glu_out, [[0.0, 4.0 / (1 + math.exp(-1))]], rtol=1e-6)
    with pytest.raises(ValueError, match="twice out's"):
        _C.ops.activation(glu_in, np.zeros((1, 4), np.float32), SILU_GLU)


def test_gather_rows_and_logit_bias():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = np.zeros((3, 3), np.float32)
    _C.ops.gather_rows(x, np.array([3, 0, 3], np.int32), out)
    np.testing.assert_array_equal(out, x[[3, 0, 3]])

    logits = np.zeros((2, 5), np.float32)
    _C.ops.add_logit_bias(logits, np.array([0, 1, 3], np.int32), np.array([4, 0, 0], np.int32),
                          np.array([-np.inf, 1.5, 2.0], np.float32))
    np.testing.assert_array_equal(logits, [[0, 0, 0, 0, -np.inf], [3.5, 0, 0, 0, 0]])


def test_gemv_binding_runs_the_reference_gemm():
    """ops.gemv on numpy arrays is the CPU gemm: x . weight^T (+ bias) (+ out)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    weight = rng.standard_normal((5, 16)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    out = np.zeros((3, 5), np.float32)
    _C.ops.gemv(x, weight, out)
    np.testing.assert_allclose(out, x @ weight.T, rtol=1e-5, atol=1e-5)
    start = rng.standard_normal((3, 5)).astype(np.float32)
    out = start.copy()
    _C.ops.gemv(x, weight, out, bias, True)
    np.testing.assert_allclose(out, start + x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x \[m, k\], weight \[n, k\] and out \[m, n\]"):
        _C.ops.gemv(x, weight[:, :8], np.zeros((3, 5), np.float32))
