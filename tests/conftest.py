"""Fixtures shared by the test modules."""

import pytest
import torch

from tests.factories import tiny_shapes_fcln


@pytest.fixture
def single_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fcln_dir(tmp_path_factory):
    """A saved random FCLN with the ShapesDLC words (tests.factories.tiny_shapes_fcln)."""
    path = tmp_path_factory.mktemp("fcln") / "final"
    tiny_shapes_fcln().save_pretrained(path)
    return path
