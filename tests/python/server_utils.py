"""The OpenAI server as a real subprocess on 127.0.0.1, for the server tests (tests/python/
test_server*.py) and bench/serving.py's smoke test."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# Enough KV blocks for the tests' 200 concurrent streams on the tiny models, far below the CPU
# default of 4 GiB (four engineers' servers share the test machine).
KV_CACHE_BYTES = 96 << 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m octavo.entrypoints.openai.api_server --model MODEL ...` on a free port; ready
    once /health answers. Use as a context manager."""

    def __init__(self, model: str, *args: str, startup_timeout: float = 120.0):
        self.model = model
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.process = None
        self.port = None
        handle, self.log_path = tempfile.mkstemp(prefix="octavo-server-", suffix=".log")
        os.close(handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def __enter__(self) -> ServerProcess:
        import httpx

        for _ in range(3):  # another process may take the free port first
            self.port = _free_port()
            command = [sys.executable, "-m", "octavo.entrypoints.openai.api_server",
                       "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                       "--device", "cpu", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
                       "--disable-log-stats", "--disable-uvicorn-access-log", *self.args]
            with open(self.log_path, "w") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                self.stop()
                pytest.fail(f"the server did not answer /health in {self.startup_timeout} s:\n"
                            f"{self.output()[-4000:]}")
            if "cannot listen" not in self.output():
                break
        pytest.fail(f"the server exited with {self.process.returncode}:\n{self.output()[-4000:]}")

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
        os.unlink(self.log_path)


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value} (histogram buckets included)."""
    import httpx

    response = httpx.get(f"{url}/metrics", timeout=10.0)
    assert response.status_code == 200
    values = {}
    for line in response.text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    pattern = re.compile(re.escape(name) + r"(\{.*\})?$")
    found = [v for key, v in values.items() if pattern.match(key)
             and all(f'{k}="{val}"' in key for k, val in labels.items())]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]
