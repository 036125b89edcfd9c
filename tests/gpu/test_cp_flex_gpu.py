"""The fused context-parallel path on CUDA (one FlexAttention call per rank): outputs and
gradients against the dense oracle, fp32 and bf16, one rank (a single GPU).

pytest tests/gpu            # skipped without CUDA
"""

from __future__ import annotations

import pytest
import torch

from model.sparse import SparsityConfig, reference_attention
from parallel.context_parallel import cp_sparse_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [
    dict(window_blocks=3, global_blocks=2, random_blocks=3),
    dict(window_blocks=3, global_blocks=2, random_blocks=3, random_pool_blocks=8),
    dict(window_blocks=3, global_blocks=1, random_blocks=2, causal=True),
    dict(window_blocks=5, global_blocks=0, random_blocks=1, dilation=(1, 2, 1, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", CASES)
def test_cp_flex_matches_dense_forward_and_backward(kwargs, dtype):
    cfg = SparsityConfig(block_size=64, **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 4, 1024, 64)
    q, k, v = (
        torch.randn(shape, device="cuda", generator=gen).to(dtype).requires_grad_()
        for _ in range(3)
    )
    padding = torch.zeros(2, 1024, dtype=torch.bool)  # host masks, as the engines pass them
    padding[1, -100:] = True
    out = cp_sparse_attention(q, k, v, cfg, None, layer=1, step=2, padding_mask=padding)
    assert out.dtype == dtype
    # the oracle in fp64 on the host (its mask is a host tensor)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, cfg, 1, 2, padding)
    upstream = torch.randn(shape, device="cuda", generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, upstream.cpu().double())
    tol = 3e-3 if dtype == torch.float32 else 3e-2  # TF32 / bf16 rounding of the inputs
    assert (out.cpu().double() - ref).abs().max() < tol
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g.cpu().double() - r).abs().max() < 4 * tol
