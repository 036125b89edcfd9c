"""Exact equality of nested dicts / lists / tuples of tensors and plain values (checkpoint
states, optimizer states), for tests that require a skipped or resumed step to change nothing.

    from tests.nested import same_nested
    assert same_nested(before, after)
"""

from __future__ import annotations

import torch


def same_nested(a, b) -> bool:
    """Equal structure, bit-equal tensors (torch.equal), equal other values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_nested(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_nested(x, y) for x, y in zip(a, b, strict=True))
    return a == b
