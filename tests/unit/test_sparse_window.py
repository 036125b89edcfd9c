"""The token-granular sliding window (attention.window_tokens) against an independent
construction of its rule, and the block table it runs on.

    pytest tests/unit/test_sparse_window.py

The brute force below writes Longformer's / Mistral's rule token pair by token pair; it does not
call SparsityConfig.token_rule (which dense_mask, the oracle, evaluates), so the two can disagree.
Exactness of the kernels over token windows is in test_sparse.py (PATTERNS, the hypothesis
test, any length) and test_sparse_flex.py (CASES).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from model.sparse import SparsityConfig, count_pairs
from model.sparse_plan import build_block_table


def brute_force_window(n: int, w: int, d: int, causal: bool) -> torch.Tensor:
    """bool [n, n]: bidirectional |i - j| <= w/2 * d, causal 0 <= i - j < w * d, and
    (i - j) % d == 0 (Longformer's dilated attention_window; Mistral's sliding_window)."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            diff = i - j
            if diff % d:
                continue
            mask[i, j] = 0 <= diff < w * d if causal else abs(diff) <= (w // 2) * d
    return mask


def window_only(**kwargs) -> SparsityConfig:
    return SparsityConfig(global_blocks=0, random_blocks=0, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_token_window_is_the_brute_force_rule(causal):
    """Block sizes that do and do not divide w, dilation, windows wider than the sequence, any
    length (a partial last block); count_pairs agrees with the rule too."""
    for block, w, d, n in itertools.product((4, 5, 8), (2, 6, 10, 80), (1, 2, 3), (29, 40)):
        cfg = window_only(block_size=block, window_tokens=w, dilation=d, causal=causal)
        expected = brute_force_window(n, w, d, causal)
        assert torch.equal(cfg.dense_mask(n)[0], expected), (block, w, d, n)
        assert count_pairs(cfg, n) == int(expected.sum()), (block, w, d, n)


def test_per_head_dilation_is_per_head():
    cfg = window_only(block_size=4, window_tokens=6, dilation=(1, 3), causal=True)
    mask = cfg.dense_mask(30, n_heads=2)
    assert torch.equal(mask[0], brute_force_window(30, 6, 1, True))
    assert torch.equal(mask[1], brute_force_window(30, 6, 3, True))
    assert count_pairs(cfg, 30, n_heads=2) == int(mask.sum())


@pytest.mark.parametrize(
    "kwargs, reach",
    [
        (dict(block_size=8, window_tokens=10), (1, 1)),  # 5 tokens each side
        (dict(block_size=4, window_tokens=10), (2, 2)),
        (dict(block_size=5, window_tokens=10), (1, 1)),  # exactly one block
        (dict(block_size=8, window_tokens=10, causal=True), (2, 0)),  # 9 tokens back
        (dict(block_size=8, window_tokens=10, dilation=2), (2, 2)),  # 10 tokens each side
        (dict(block_size=8, window_tokens=4, dilation=(1, 3), causal=True), (2, 0)),  # 9 back
        (dict(block_size=8, window_blocks=5, dilation=2), (4, 4)),  # the block window
    ],
)
def test_reach_is_ceil_of_the_band_over_the_block(kwargs, reach):
    assert SparsityConfig(**kwargs).reach_blocks == reach


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block, w", [(8, 10), (4, 6), (5, 20), (8, 2)])
def test_window_entries_are_exactly_the_blocks_the_band_touches(causal, block, w):
    """The kernel reads no block outside the band: a valid window entry of query block I is a
    key block holding some allowed pair, and every such block is an entry."""
    n = 12 * block
    cfg = window_only(block_size=block, window_tokens=w, causal=causal)
    nb = n // block
    touched = brute_force_window(n, w, 1, causal).view(nb, block, nb, block).any(3).any(1)
    table = build_block_table(cfg, n, 1)
    listed = torch.zeros(nb, nb, dtype=torch.bool)
    q, e = table.valid[0].nonzero(as_tuple=True)
    listed[q, table.index[0, q, e]] = True
    assert torch.equal(listed, touched)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_tokens=10, random_blocks=3, global_blocks=1),
        dict(window_tokens=10, random_blocks=3, global_blocks=1, causal=True),
        dict(window_tokens=6, random_blocks=3, dilation=(1, 3), random_per_head=True),
        dict(window_tokens=7, random_blocks=3, dilation=2, causal=True, random_pool_blocks=6),
        dict(window_tokens=20, random_blocks=4, global_blocks=0, random_per_head=True),
        dict(window_blocks=3, random_blocks=3, dilation=(1, 2), random_per_head=True),
    ],
)
def test_the_table_never_lists_a_key_block_twice(kwargs):
    """A block in the table twice would be attended twice (counted twice in the softmax): the
    random draw must avoid every block the window touches, for every head."""
    cfg = SparsityConfig(block_size=4, **kwargs)
    for layer, step in itertools.product(range(3), range(3)):
        table = build_block_table(cfg, 96, 2, layer, step)
        hx, nq, _ = table.index.shape
        for h, row in itertools.product(range(hx), range(nq)):
            blocks = table.index[h, row][table.valid[h, row]].tolist()
            assert len(blocks) == len(set(blocks)), (kwargs, layer, step, h, row, blocks)


def test_window_tokens_is_checked():
    with pytest.raises(ValueError, match=r"window_tokens=7 must be even for bidirectional"):
        SparsityConfig(window_tokens=7)
    with pytest.raises(ValueError, match=r"window_tokens=-2 must be a non-negative integer"):
        SparsityConfig(window_tokens=-2)
    assert SparsityConfig(window_tokens=7, causal=True).reach_blocks == (1, 0)
