"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
