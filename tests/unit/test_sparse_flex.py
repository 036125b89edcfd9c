"""The FlexAttention backend's BlockMask and mask_mod against the dense oracle, on CPU.

FlexAttention runs forward only on CPU, so this checks the block lists and the token rule of
the GPU path without a GPU; tests/gpu/test_sparse_gpu.py checks gradients and speed on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from model.sparse import SparsityConfig, reference_attention, sparse_attention

CASES = [
    dict(window_blocks=3, global_blocks=2, random_blocks=2),
    dict(window_blocks=2, global_blocks=1, random_blocks=2, causal=True),
    dict(window_blocks=3, global_blocks=0, random_blocks=1, dilation=(1, 2)),
    dict(
        window_blocks=1,
        global_blocks=0,
        random_blocks=2,
        random_per_head=True,
        global_tokens=(3, 50),
    ),
    dict(window_tokens=20, global_blocks=1, random_blocks=1),  # 10 tokens each side, b=16
    dict(window_tokens=7, global_blocks=0, random_blocks=2, causal=True, dilation=(1, 3)),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_flex_forward_matches_dense_on_cpu(kwargs):
    cfg = SparsityConfig(block_size=16, **kwargs)
    gen = torch.Generator().manual_seed(0)
    batch, heads, seq_len = 2, 2, 128
    q, k, v = (torch.randn(batch, heads, seq_len, 16, generator=gen) for _ in range(3))
    padding = torch.zeros(batch, seq_len, dtype=torch.bool)
    padding[1, -20:] = True
    marks = torch.zeros(batch, seq_len, dtype=torch.bool)
    marks[0, 70] = True
    out = sparse_attention(
        q, k, v, cfg, layer=1, step=2, padding_mask=padding, global_mask=marks, backend="flex"
    )
    ref = reference_attention(q, k, v, cfg, 1, 2, padding, marks)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs", CASES)
def test_block_lists_cover_every_allowed_pair(kwargs):
    # Eager FlexAttention applies mask_mod densely and ignores the block lists, so check the
    # lists themselves: every block pair holding an allowed (query, key) must be listed, or the
    # fused GPU kernel would silently drop it.
    from model.sparse_flex import build_block_mask

    cfg = SparsityConfig(block_size=16, **kwargs)
    batch, heads, seq_len = 2, 2, 128
    marks = torch.zeros(batch, seq_len, dtype=torch.bool)
    marks[0, 70] = True
    block_mask = build_block_mask(cfg, batch, heads, seq_len, 1, 2, None, marks, "cpu")
    listed = block_mask.to_dense().bool()  # [B, H, nq, nk]
    dense = cfg.dense_mask(seq_len, layer=1, step=2, global_mask=marks, n_heads=heads)
    needed = dense.view(batch, -1, 8, 16, 8, 16).any(dim=(3, 5)).expand(batch, heads, -1, -1)
    assert not (needed & ~listed).any()
    assert listed.sum() < listed.numel()  # and it is really sparse
