"""Shared setup of the generation tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models are dominated by per-op overhead; two OpenMP threads on a busy 2-core box are slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
