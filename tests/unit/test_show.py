"""parallel.show: the block classification against the dense oracle and the cp plan, the bytes
per rank, and the PNG the command writes.

    python -m pytest -q tests/unit/test_show.py
"""

from __future__ import annotations

import numpy as np
import pytest

from model.sparse import SparsityConfig
from parallel.cp_plan import rank_plan
from parallel.show import (
    GLOBAL,
    HALO,
    LOCAL,
    NONE,
    RANDOM,
    classify_blocks,
    forward_bytes,
    render_pattern,
)
from train.show import main

PATTERNS = {
    "causal_bigbird": (SparsityConfig(8, 3, 1, 2, causal=True), 256, 4, 2),
    "bidirectional_bigbird": (SparsityConfig(8, 5, 2, 2), 256, 4, 2),
    "dilated_per_head": (SparsityConfig(4, 3, 0, 1, dilation=(1, 3), random_per_head=True),
                         128, 2, 2),
    "multi_hop_halo": (SparsityConfig(8, 9, 0, 0), 128, 8, 1),
    "global_tokens": (SparsityConfig(8, 3, 0, 2, global_tokens=(13, 70)), 128, 4, 1),
    "tiny_block": (SparsityConfig(1, 5, 0, 0, dilation=2), 32, 2, 1),
    "bigbird_pool": (SparsityConfig(8, 3, 2, 3, random_pool_blocks=8), 256, 4, 2),
    "causal_pool_per_head": (
        SparsityConfig(8, 3, 1, 2, causal=True, random_pool_blocks=4, random_per_head=True),
        256, 4, 2,
    ),
    "token_window": (SparsityConfig(8, 3, 1, 1, window_tokens=20), 128, 4, 2),
    "token_window_dilated_b5": (SparsityConfig(5, 3, 0, 2, window_tokens=12, dilation=(1, 3)),
                                120, 4, 2),
    "token_window_causal_multi_hop": (
        SparsityConfig(8, 3, 1, 1, causal=True, window_tokens=45, dilation=(1, 2)), 128, 4, 2,
    ),
}  # fmt: skip


def _block_mask(cfg: SparsityConfig, seq_len: int, n_heads: int, head: int, layer: int):
    mask = cfg.dense_mask(seq_len, layer=layer, step=3, n_heads=n_heads)
    mask = mask[min(head, mask.shape[0] - 1)]
    nb, b = seq_len // cfg.block_size, cfg.block_size
    return mask.view(nb, b, nb, b).any(dim=3).any(dim=1).numpy()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_classification_covers_exactly_the_dense_pattern(name):
    cfg, seq_len, world, n_heads = PATTERNS[name]
    nb, nl = seq_len // cfg.block_size, seq_len // cfg.block_size // world
    for head in range(n_heads):
        cats = classify_blocks(cfg, seq_len, world, n_heads, layer=1, step=3, head=head)
        assert cats.shape == (nb, nb)
        allowed = _block_mask(cfg, seq_len, n_heads, head, layer=1)
        np.testing.assert_array_equal(cats != NONE, allowed, err_msg=f"{name} head {head}")
        cols = np.arange(nb)
        for rank in range(world):
            plan = rank_plan(cfg, seq_len, world, rank, n_heads, 1, 3)
            rows = cats[rank * nl : (rank + 1) * nl]
            local = (cols >= rank * nl) & (cols < (rank + 1) * nl)
            halo = np.zeros(nb, dtype=bool)
            for lo, hi in (plan.halo_left, plan.halo_right):
                halo[lo:hi] = True
            assert ((rows == LOCAL) == (rows != NONE) & local[None]).all()
            # Halo cells are exactly the attended cells inside rank_plan's halo ranges.
            assert ((rows == HALO) == (rows != NONE) & halo[None]).all()
            # Random cells are remote blocks the plan receives through the all-to-all.
            remote = set(np.flatnonzero((rows == RANDOM).any(axis=0)).tolist())
            assert remote <= set(plan.random_blocks.tolist())
            assert not ((rows == RANDOM) & (local | halo)[None]).any()


def test_categories_of_a_known_layout():
    """Causal window 3, one sink block, no random; 8 blocks on 4 ranks of 2 blocks."""
    cfg = SparsityConfig(4, 3, 1, 0, causal=True)
    cats = classify_blocks(cfg, 32, 4)
    expected = np.zeros((8, 8), dtype=np.int64)
    for i in range(8):
        for j in range(max(0, i - 2), i + 1):
            expected[i, j] = LOCAL if j // 2 == i // 2 else HALO
        if i // 2 > 0:
            expected[i, 0] = GLOBAL if i >= 4 else HALO  # block 0 is in rank 1's halo
    np.testing.assert_array_equal(cats, expected)


def test_cp_must_divide_the_blocks():
    with pytest.raises(ValueError, match="--cp 3 must divide the 8 blocks"):
        classify_blocks(SparsityConfig(4, 3, 1, 0, causal=True), 32, 3)


def test_forward_bytes_follow_the_plan():
    cfg = SparsityConfig(8, 3, 1, 0, causal=True)  # global block 0, halo of 2 blocks
    n_heads, head_dim, world = 2, 4, 4
    sent = [forward_bytes(cfg, 128, world, r, n_heads, head_dim) for r in range(world)]
    row = n_heads * head_dim * 4
    # Causal: every rank but the last sends 2 blocks of k and v to its right neighbour.
    assert [s["halo"] for s in sent] == [2 * 2 * 8 * row] * 3 + [0]
    assert all(s["random"] == 0 for s in sent)
    # All-reduce of the 8 global q, k, v rows: 2 (P-1)/P of the buffer.
    assert all(s["global"] == 2 * 3 * 8 * row * 3 // 4 for s in sent)
    one = forward_bytes(cfg, 128, 1, 0, n_heads, head_dim)
    assert one == {"halo": 0, "random": 0, "pool": 0, "global": 0, "global_merge": 0}


def test_command_writes_a_picture(tmp_path):
    out = tmp_path / "pattern.png"
    overrides = ["model.n_heads=2", "model.d_model=32"]
    args = ["--config", "configs/demo.yaml", "--cp", "4", "--out", str(out), "--seq-len", "1024"]
    assert main([*args, "--layer", "1", "--head", "1", *overrides]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert image.width > 400 and image.height > 400
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 6  # the categories are drawn
    assert main(["--config", "configs/demo.yaml", "--cp", "3", "--out", str(out)]) == 2


def test_render_pattern_of_a_bidirectional_pattern(tmp_path):
    cfg = SparsityConfig(8, 5, 2, 2)  # the trainer's configs are causal; the picture is not
    path = render_pattern(cfg, 256, 4, n_heads=2, head_dim=8, out=tmp_path / "p.png")
    assert path.is_file() and path.stat().st_size > 20_000


def test_command_draws_every_layers_own_pattern(tmp_path):
    """attention.layers: --layer all draws one panel per layer; --layer L that layer's own
    pattern (here a token window whose halo the base window's would not have)."""
    overrides = [
        "model.n_heads=2", "model.d_model=32", "model.n_layers=3", "attention.window_tokens=100",
        'attention.layers=[{layers: "1:", window_tokens: 300, dilation: [1, 2]}, '
        "{layers: 2, global_blocks: 0}]",
    ]  # fmt: skip
    args = ["--config", "configs/demo.yaml", "--cp", "4", "--seq-len", "1024"]
    out = tmp_path / "layers.png"
    assert main([*args, "--out", str(out), "--layer", "all", *overrides]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.width > 3 * 300  # three panels side by side
    one = tmp_path / "layer2.png"
    assert main([*args, "--out", str(one), "--layer", "2", "--head", "1", *overrides]) == 0
    assert one.stat().st_size > 20_000
    with pytest.raises(SystemExit):
        main([*args, "--out", str(one), "--layer", "top", *overrides])
