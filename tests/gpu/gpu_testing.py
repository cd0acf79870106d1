"""Helpers shared by the GPU tests: comparing a kernel's output with the CPU reference, timing."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from kernels import event_seconds as cuda_seconds  # noqa: E402,F401  (one timer, bench's)


def assert_close_to_reference(got, expected, tolerance: dict, what: str, row_name: str = "row"):
    """Every element within atol + rtol * |ref| and the whole within a relative Frobenius error;
    a non-finite element never passes. `tolerance` has keys atol, rtol and frobenius."""
    assert np.isfinite(expected).all(), f"{what}: the CPU reference itself is not finite"
    bad_rows = np.unique(np.nonzero(~np.isfinite(got))[0])
    assert bad_rows.size == 0, f"{what}: non-finite output in {row_name}s {bad_rows[:20].tolist()}"
    diff = np.abs(got - expected)
    limit = tolerance["atol"] + tolerance["rtol"] * np.abs(expected)
    if (diff > limit).any():
        row, col = np.unravel_index(np.argmax(diff - limit), diff.shape)
        pytest.fail(f"{what}: |gpu - ref| = {diff[row, col]:.3g} at {row_name} {row}, column "
                    f"{col} (ref {expected[row, col]:.4g}, gpu {got[row, col]:.4g}); "
                    f"{int((diff > limit).sum())} elements over the tolerance")
    frobenius = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
    assert frobenius < tolerance["frobenius"], f"{what}: relative error {frobenius:.3g}"
