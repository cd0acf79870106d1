"""Shared fixtures: tiny random-weight Hugging Face checkpoints built offline with transformers."""

from __future__ import annotations

import os

import pytest

from checkpoints import ARCHITECTURES, build_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """architecture -> (directory, transformers model in fp32)."""
    pytest.importorskip("torch")
    out = {}
    for i, architecture in enumerate(ARCHITECTURES):
        directory = str(tmp_path_factory.mktemp(architecture))
        out[architecture] = (directory, build_checkpoint(directory, architecture, seed=i))
    return out


@pytest.fixture(scope="session")
def llama_dir(tiny_checkpoints):
    return tiny_checkpoints["LlamaForCausalLM"][0]


def pytest_report_header(config):
    return f"octavo tests, cpu count {os.cpu_count()}"
