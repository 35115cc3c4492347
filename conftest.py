"""Fixtures shared by the test files: one torch thread, and the reference's tiny checkpoint with its I/O."""

import os

import pytest
import torch
from safetensors.torch import load_file

from policy import SmolVLAPolicy

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "smolvla_tiny")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: on a busy 2-core machine, thread hand-offs cost 10-50x the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The reference's tiny SmolVLA checkpoint (fp32, eval), one per test file: some files modify it."""
    return SmolVLAPolicy.from_pretrained(os.path.join(TINY, "checkpoint"), vlm=os.path.join(TINY, "vlm"))


@pytest.fixture(scope="module")
def io():
    """Inputs and the reference's outputs for the tiny checkpoint (testdata/README.md)."""
    return load_file(os.path.join(TINY, "io.safetensors"))
