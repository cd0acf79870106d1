"""The few-row GEMM (cuda/gemv.cu, what decode steps of <= 2 rows run) against the CPU reference
gemm on the same bf16/fp16 values: out = x . weight^T (+ bias) (+ out)."""

import numpy as np
import pytest
import torch

from gpu_testing import assert_close_to_reference
from octavo import _C

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 sums of k products; an act-dtype output adds one rounding.
FP32_OUT = dict(atol=1e-3, rtol=1e-4, frobenius=1e-5)
HALF_OUT = {"bf16": dict(atol=2e-2, rtol=1e-2, frobenius=5e-3),
            "fp16": dict(atol=2e-3, rtol=2e-3, frobenius=1e-3)}


def reference(x, weight, bias, out_start, accumulate):
    """The CPU backend's gemm on the GPU inputs' exact values (fp32 activations)."""
    out = out_start.float().cpu().numpy().copy()
    _C.ops.gemv(x.float().cpu().numpy(), weight.float().cpu().numpy(), out,
                None if bias is None else bias.float().cpu().numpy(), accumulate)
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1027, 1024), (6144, 4096), (4096, 14336),
                                 (3, 8), (517, 2056)])
def test_gemv_matches_cpu(dtype, m, n, k):
    gen = torch.Generator("cuda").manual_seed(m * 1000 + n + k)
    t = TORCH_DTYPES[dtype]
    x = torch.randn(m, k, device="cuda", generator=gen).to(t)
    weight = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(t)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=t)
    _C.ops.gemv(x, weight, out)
    torch.cuda.synchronize()
    expected = reference(x, weight, None, torch.zeros(m, n), False)
    assert_close_to_reference(out.float().cpu().numpy(), expected, HALF_OUT[dtype], "gemv")


@pytest.mark.parametrize("bias_kind", ["none", "weight dtype", "fp32"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_bias_accumulate_and_fp32_out(bias_kind, accumulate, m):
    """The LM head's form (fp32 logits, an fp32 bias) and the residual's (accumulate)."""
    gen = torch.Generator("cuda").manual_seed(7 + m)
    n, k = 2053, 1024
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(n, k, device="cuda", generator=gen) * 0.03).to(torch.bfloat16)
    bias = None
    if bias_kind != "none":
        bias = torch.randn(n, device="cuda", generator=gen)
        bias = bias if bias_kind == "fp32" else bias.to(torch.bfloat16)
    start = torch.randn(m, n, device="cuda", generator=gen)
    out = start.clone()
    _C.ops.gemv(x, weight, out, bias, accumulate)
    torch.cuda.synchronize()
    expected = reference(x, weight, bias, start if accumulate else torch.zeros(m, n), accumulate)
    assert_close_to_reference(out.cpu().numpy(), expected, FP32_OUT, "gemv fp32 out")

    # The same in the activation dtype (a bf16 bias; accumulate reads the bf16 out).
    if bias_kind != "fp32":
        out16 = start.to(torch.bfloat16)
        start16 = out16.clone()
        _C.ops.gemv(x, weight, out16, bias, accumulate)
        torch.cuda.synchronize()
        expected = reference(x, weight, bias, start16 if accumulate else torch.zeros(m, n),
                             accumulate)
        assert_close_to_reference(out16.float().cpu().numpy(), expected, HALF_OUT["bf16"],
                                  "gemv bf16 out")


def test_gemv_refuses_what_it_does_not_run():
    x = torch.zeros(3, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.zeros(16, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="m <= 2"):
        _C.ops.gemv(x, weight, torch.zeros(3, 16, device="cuda", dtype=torch.bfloat16))
    x = torch.zeros(1, 12, device="cuda", dtype=torch.bfloat16)
    weight = torch.zeros(16, 12, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of 8"):
        _C.ops.gemv(x, weight, torch.zeros(1, 16, device="cuda", dtype=torch.bfloat16))
    x = torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.zeros(16, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="one dtype"):
        _C.ops.gemv(x, weight, torch.zeros(1, 16, device="cuda", dtype=torch.bfloat16))
