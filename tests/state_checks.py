"""Assertions on optimizer state shared by the test modules."""

import torch


def assert_same_state(a: dict, b: dict):
    """Two per-parameter state dicts hold the same keys, and bit-identical tensors of the same dtype."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
