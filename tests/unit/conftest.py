from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Unit-test models are tiny: a second intra-op thread only adds spinning, which on a shared 2-core
    machine multiplies wall time. Restored for the integration tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
