"""Beyond the window-only receptive field, only global/random paths carry a token to the answer.

    python -m pytest -q tests/unit/test_passkey_paths.py

Structural, no training: two small causal models of the demo's kind, one window-only and one
with the demo's BigBird pattern (configs/demo.yaml: window 3, 1 global, 2 random blocks), attend
to the same number of (query, key) pairs (`train.flops.attention_pairs`). The gradient of the
last position's logits with respect to each token's embedding is exactly zero beyond the
window-only model's receptive field (L layers x window reach) for the window-only model and
nonzero for the BigBird model wherever its random/global blocks connect the token to the end;
within each model's own window reach both are nonzero. The trained counterpart is
benchmarks/passkey_paths.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.passkey_paths import patterns, reachable_from, window_reach_blocks
from model.sparse import sparse_attention
from model.transformer import ModelArgs, Transformer
from train.flops import attention_pairs

BLOCK, SEQ_LEN, LAYERS = 8, 256, 2  # 32 blocks, as the demo's 2048 tokens in blocks of 64
ARGS = ModelArgs(vocab_size=64, d_model=32, n_layers=LAYERS, n_heads=2)


def embedding_gradient(name: str, step: int = 0) -> torch.Tensor:
    """|d (random projection of the last position's logits) / d embedding| per position, fp64."""
    cfg = patterns(BLOCK)[name]
    model = Transformer(ARGS, cfg, attention_fn=sparse_attention, seed=0).double()
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    model.embed.register_forward_hook(keep)
    tokens = torch.randint(
        0, ARGS.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(1)
    )
    logits = model(tokens, step=step)
    weights = torch.randn(ARGS.vocab_size, generator=torch.Generator().manual_seed(2)).double()
    (logits[0, -1] * weights).sum().backward()
    return captured[0].grad[0].abs().sum(-1)


def test_both_patterns_spend_the_same_attention_budget():
    cfgs = patterns(BLOCK)
    assert cfgs["bigbird"].random_blocks > 0 and cfgs["window"].random_blocks == 0
    assert cfgs["window"].global_blocks == 0 and cfgs["bigbird"].causal and cfgs["window"].causal
    pairs = {n: attention_pairs(c, SEQ_LEN, ARGS.n_heads, LAYERS) for n, c in cfgs.items()}
    assert abs(pairs["bigbird"] / pairs["window"] - 1) <= 0.10, pairs


@pytest.mark.parametrize("step", [0, 7])
def test_beyond_the_window_reach_only_bigbird_paths_carry_gradient(step):
    last_block = SEQ_LEN // BLOCK - 1
    reach = window_reach_blocks(patterns(BLOCK)["window"], LAYERS)
    assert reach == LAYERS * 5  # causal window of 6 blocks: 5 blocks back per layer
    block_of = torch.arange(SEQ_LEN) // BLOCK
    within = block_of >= last_block - reach
    assert 0 < int((~within).sum()) < SEQ_LEN  # the sequence reaches past the receptive field

    window = embedding_gradient("window", step)
    assert (window[~within] == 0).all(), "a window-only model saw beyond its receptive field"
    assert (window[within] > 0).all()

    bigbird = embedding_gradient("bigbird", step)
    bigbird_cfg = patterns(BLOCK)["bigbird"]
    paths = reachable_from(bigbird_cfg, SEQ_LEN, LAYERS, step, SEQ_LEN - 1)
    assert torch.equal(bigbird > 0, paths)  # nonzero exactly where a masked path exists
    beyond_with_path = ~within & paths
    assert beyond_with_path[:BLOCK].all()  # the global prefix: seen by every query directly
    # random blocks, not the prefix alone, reach several blocks past the window
    assert block_of[beyond_with_path].unique().numel() >= 4
    # Within reach: the same budget buys BigBird a narrower window (3 blocks, not 6), so it
    # covers the window-only receptive field only in part; its own window reach, fully.
    own_reach = block_of >= last_block - window_reach_blocks(bigbird_cfg, LAYERS)
    assert (bigbird[own_reach] > 0).all()
