"""The evaluation's tests: tiny tensors, one torch thread each module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors here are tiny: with two threads on a busy 2-core machine, OpenMP's spinning made
    # them 10-20x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
