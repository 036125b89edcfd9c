"""The encoder (model.arch=encoder) on a GPU: bf16 through the fused FlexAttention kernel.

pytest tests/gpu            # skipped without CUDA

A 2-layer BigBird-shaped encoder (window 3 + 2 global + 2 random blocks of 64, 2048 tokens)
in bf16 on CUDA gives the MLM logits of the same weights in fp32 on the host (the blocked
kernel) within bf16's error, and its backward reaches every trained parameter.
"""

from __future__ import annotations

import pytest
import torch

from model.encoder import Encoder
from model.sparse import SparsityConfig
from model.transformer import ModelArgs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_encoder_on_cuda_matches_fp32_on_the_host():
    args = ModelArgs(
        arch="encoder", vocab_size=1000, d_model=256, n_layers=2, n_heads=4, mlp="gelu_tanh",
        max_positions=2048, type_vocab_size=2, pooler=True,
    )  # fmt: skip
    cfg = SparsityConfig(
        causal=False, block_size=64, window_blocks=3, global_blocks=2, random_blocks=2
    )
    host = Encoder(args, cfg, seed=0)
    gpu = Encoder(args, cfg, seed=0).to("cuda", torch.bfloat16)
    tokens = torch.randint(0, 1000, (2, 2048), generator=torch.Generator().manual_seed(0))
    glob = torch.zeros(2, 2048, dtype=torch.bool)
    glob[:, 0] = True
    with torch.no_grad():
        ref = host(tokens, step=3, global_mask_bn=glob)
    out = gpu(tokens.cuda(), step=3, global_mask_bn=glob)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err = (out.cpu() - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item(), err
    out.float().logsumexp(-1).mean().backward()
    for name, p in gpu.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name  # the pooler is frozen
