"""bench/kernels.py on any machine: its command line refuses an unknown section before anything
needs a GPU, and its layer-ops calls run on the CPU reference (the timings themselves are
tests/gpu/test_bench_kernels.py's)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernels_bench_refuses_unknown_section():
    command = [sys.executable, os.path.join(REPO, "bench", "kernels.py"), "--sections",
               "decode,nope"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "unknown sections ['nope']" in run.stderr
    assert "nano-run" in run.stderr  # the choices are listed


def test_layer_op_calls_run_on_the_cpu_reference():
    """The layer-ops section's calls (argument names, shapes, strides) go through octavo._C.ops;
    on the CPU they run the reference ops, so a wrong call fails here, not only on a GPU."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("kernels", os.path.join(REPO, "bench",
                                                                         "kernels.py"))
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    for model in kernels.LAYER_MODELS:
        for op in kernels.LAYER_OPS:
            call, moved = kernels.layer_op_call(op, 3, model, device="cpu", dtype=torch.float32)
            call()
            assert moved > 0
