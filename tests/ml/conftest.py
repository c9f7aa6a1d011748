"""Every computation test under tests/ml runs torch on one thread: tiny tensors run fastest
that way, and the test processes do not fight each other (or a study) for the cores."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
