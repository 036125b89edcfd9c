"""GPU path of the sparse attention (FlexAttention): exactness of outputs and gradients.

pytest tests/gpu            # skipped without CUDA
"""

from __future__ import annotations

import pytest
import torch

from model.sparse import SparsityConfig, reference_attention, sparse_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [
    dict(window_blocks=3, global_blocks=2, random_blocks=3),
    dict(window_blocks=3, global_blocks=1, random_blocks=2, causal=True),
    dict(window_blocks=3, global_blocks=0, random_blocks=0, dilation=(1, 2, 1, 2)),
    dict(window_blocks=1, global_blocks=0, random_blocks=2, global_tokens=(5, 700)),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_flex_matches_dense_forward_and_backward(kwargs):
    cfg = SparsityConfig(block_size=64, **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, heads, seq_len, dim = 2, 4, 1024, 64
    q, k, v = (
        torch.randn(batch, heads, seq_len, dim, device="cuda", generator=gen).requires_grad_()
        for _ in range(3)
    )
    padding = torch.zeros(batch, seq_len, dtype=torch.bool, device="cuda")
    padding[1, -100:] = True
    out = sparse_attention(q, k, v, cfg, layer=1, step=1, padding_mask=padding)
    # the oracle on the host, where its dense mask is
    ref_in = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, cfg, 1, 1, padding.cpu())
    upstream = torch.randn(out.shape, device="cuda", generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref_grads = torch.autograd.grad(ref, ref_in, upstream.cpu())
    # TF32 matmuls and a different summation order: a GPU tolerance, not 1e-5.
    assert (out.cpu() - ref).abs().max() < 2e-3
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g.cpu() - r).abs().max() < 5e-3


def test_flex_and_blocked_kernels_agree_in_bf16():
    cfg = SparsityConfig(block_size=64, window_blocks=3, global_blocks=2, random_blocks=3)
    q, k, v = (torch.randn(1, 4, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flex = sparse_attention(q, k, v, cfg)
    blocked = sparse_attention(q.float(), k.float(), v.float(), cfg, backend="blocked")
    assert (flex.float() - blocked).abs().max() < 3e-2
