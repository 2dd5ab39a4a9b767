import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Data tests run small, overhead-bound tensor ops; on a busy 2-core machine a thread pool mostly
    waits on itself, so run them single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
