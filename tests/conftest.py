"""Fixtures several test files share."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
