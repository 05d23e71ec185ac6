"""Fixtures shared by test files that ask for them (none is autouse), and one setting for the whole run."""

from __future__ import annotations

import os

# The suite forks processes (tests/dist_utils.py) after tests that compile (compiled=True, torch.compile): with its
# default compile workers inductor leaves a thread pool in the process, and a fork of a process with threads can
# corrupt the child's heap (seen once: "free(): invalid size" in a forked rank). Compiling in the main thread
# leaves no thread behind.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

torch._inductor.config.compile_threads = 1  # (also where torch was imported before this file)


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for the test, restored after it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
