"""Fixtures shared by test files that ask for them (none is autouse)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for the test, restored after it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
