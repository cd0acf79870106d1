"""bench/kernels.py's command line on any machine: a section name it does not know is refused
before anything needs a GPU (the timings themselves are tests/gpu/test_bench_kernels.py's)."""

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
