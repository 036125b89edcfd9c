"""Longformer's separate global projections (attention.global_projections): the global
queries attend every key through their own q, k, v; everything else is unchanged.

    pytest tests/unit/test_global_projections.py
"""

from __future__ import annotations

import pytest
import torch

from model.layers import LocalLinears
from model.sparse import SparsityConfig, reference_attention, sparse_attention
from model.transformer import Attention, ModelArgs

PATTERN = dict(block_size=8, window_blocks=3, global_blocks=1, random_blocks=1, seed=2)


def _inputs(seq_len, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, seq_len, 8, generator=gen, dtype=dtype) for _ in range(7)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [96, 91])  # any length: a partial last block
def test_blocked_kernel_matches_dense_forward_and_backward(causal, seq_len):
    cfg = SparsityConfig(**PATTERN, causal=causal, global_tokens=(30,))
    *qkv6, d_out = _inputs(seq_len)
    padding = torch.zeros(2, seq_len, dtype=torch.bool)
    padding[1, -13:] = True
    marks = torch.zeros(2, seq_len, dtype=torch.bool)
    marks[0, 50] = True
    ours = [t.clone().requires_grad_() for t in qkv6]
    ref = [t.clone().requires_grad_() for t in qkv6]
    out = sparse_attention(*ours[:3], cfg, 1, 3, padding, marks, global_qkv=tuple(ours[3:]))
    expect = reference_attention(*ref[:3], cfg, 1, 3, padding, marks, global_qkv=tuple(ref[3:]))
    (out * d_out).sum().backward()
    (expect * d_out).sum().backward()
    assert (out - expect).abs().max() < 1e-10
    for a, b in zip(ours, ref, strict=True):
        assert (a.grad - b.grad).abs().max() < 1e-10
    # the separate projections matter: without them the global rows differ
    plain = reference_attention(*qkv6[:3], cfg, 1, 3, padding, marks)
    assert (plain - expect.detach()).abs().max() > 1e-2


def test_flex_forward_matches_dense_on_cpu():
    cfg = SparsityConfig(**PATTERN)
    *qkv6, _ = _inputs(96, torch.float32)
    out = sparse_attention(*qkv6[:3], cfg, 0, 0, backend="flex", global_qkv=tuple(qkv6[3:]))
    expect = reference_attention(*qkv6[:3], cfg, 0, 0, global_qkv=tuple(qkv6[3:]))
    assert (out - expect).abs().max() < 1e-5


def test_the_layer_has_its_own_global_projection_used_only_by_global_rows():
    cfg = SparsityConfig(**PATTERN, global_projections=True)
    args = ModelArgs(vocab_size=64, d_model=32, n_layers=1, n_heads=4)
    torch.manual_seed(0)
    attn = Attention(args, cfg, sparse_attention, 0, LocalLinears())
    assert attn.qkv_global is not None and attn.qkv_global.weight.shape == (96, 32)
    x = torch.randn(1, 64, 32)
    positions = torch.arange(64).view(1, -1)
    marks = torch.zeros(1, 64, dtype=torch.bool)
    marks[0, 40] = True
    with torch.no_grad():
        before = attn(x, positions, 0, None, marks)
        attn.qkv_global.weight.add_(0.5)
        after = attn(x, positions, 0, None, marks)
    changed = (after - before).abs().amax(-1)[0] > 1e-6
    # global rows: the first block (ITC) and the marked token; the out projection mixes heads
    # but not tokens
    expect = torch.zeros(64, dtype=torch.bool)
    expect[:8] = True
    expect[40] = True
    assert torch.equal(changed, expect)
    with pytest.raises(ValueError, match="global_projections"):
        SparsityConfig(global_projections=1)  # type: ignore[arg-type]
