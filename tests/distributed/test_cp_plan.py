"""Single-process checks of the context-parallel geometry (no process group needed).

pytest tests/distributed/test_cp_plan.py
"""

from __future__ import annotations

import pytest
import torch

from model.sparse import SparsityConfig, sparse_attention
from parallel.context_parallel import cp_sparse_attention
from parallel.cp_plan import halo_pieces, rank_plan


def test_multi_hop_halo_pieces_come_from_their_owners():
    cfg = SparsityConfig(block_size=8, window_blocks=11, global_blocks=0, random_blocks=0)
    pieces = halo_pieces(cfg, n_blocks=16, world=4)  # reach 5 blocks, 4 blocks per rank
    to_two = sorted((p.src, p.lo, p.hi) for p in pieces if p.dst == 2)
    assert to_two == [(0, 3, 4), (1, 4, 8), (3, 12, 16)]
    assert all(p.src != p.dst for p in pieces)


def test_causal_halo_is_left_only():
    cfg = SparsityConfig(block_size=8, window_blocks=7, global_blocks=0, random_blocks=0,
                         causal=True)  # fmt: skip
    pieces = halo_pieces(cfg, n_blocks=16, world=4)
    assert all(p.src < p.dst for p in pieces)
    assert sorted((p.src, p.lo, p.hi) for p in pieces if p.dst == 3) == [(1, 6, 8), (2, 8, 12)]


@pytest.mark.parametrize("causal", [False, True])
def test_random_exchange_lists_are_consistent_and_deduplicated(causal):
    cfg = SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=3,
                         causal=causal, random_per_head=True)  # fmt: skip
    world, seq, heads = 4, 256, 3
    plans = [rank_plan(cfg, seq, world, r, heads, 1, 2) for r in range(world)]
    nl = seq // 8 // world
    table = cfg.random_table(seq, heads, 1, 2)
    for r, plan in enumerate(plans):
        recv = plan.random_blocks
        assert torch.equal(recv, torch.unique(recv))
        lo, hi = plan.halo_left[0], plan.halo_right[1]
        assert not ((recv >= lo) & (recv < hi)).any()
        drawn = table[:, r * nl : (r + 1) * nl]
        drawn = drawn[(drawn >= 0) & ((drawn < lo) | (drawn >= hi))]
        assert set(drawn.tolist()) == set(recv.tolist())
        for s in range(world):  # what s sends r is exactly what r receives from s
            sent = plans[s].random_sends[r] + s * nl
            got = recv[(recv >= s * nl) & (recv < (s + 1) * nl)]
            assert torch.equal(sent, got)
            assert plan.random_sources[s] == got.numel()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_tokens, dilation", [(6, 1), (12, 2), (40, 1), (90, 1), (9, 3)])
def test_token_window_halo_and_interior_follow_the_band(causal, window_tokens, dilation):
    """Ranks of 32 tokens; windows narrower and wider (multi-hop) than a rank's slice: the halo
    is exactly the remote key blocks the rank's window pairs touch (in the dense oracle), and
    the interior exactly the query blocks touching none."""
    if not causal and window_tokens % 2:
        return
    cfg = SparsityConfig(block_size=8, window_tokens=window_tokens, dilation=dilation,
                         causal=causal, global_blocks=0, random_blocks=0)  # fmt: skip
    seq, world, nl = 128, 4, 4
    touched = cfg.dense_mask(seq)[0].view(16, 8, 16, 8).any(3).any(1)  # [query, key] blocks
    for rank in range(world):
        plan = rank_plan(cfg, seq, world, rank, 1, 0, 0)
        local = torch.zeros(16, dtype=torch.bool)
        local[rank * nl : (rank + 1) * nl] = True
        rows = touched[local]
        halo = torch.zeros(16, dtype=torch.bool)
        for lo, hi in (plan.halo_left, plan.halo_right):
            halo[lo:hi] = True
        assert torch.equal(halo, rows.any(0) & ~local), (rank, plan.halo_left, plan.halo_right)
        interior = (~(rows & ~local).any(1)).nonzero().flatten() + rank * nl
        assert torch.equal(plan.interior, interior), rank


def test_interior_blocks_need_no_halo():
    cfg = SparsityConfig(block_size=8, window_blocks=3, global_blocks=0, random_blocks=1)
    plan = rank_plan(cfg, 512, 4, 1, 2, 0, 0)
    assert plan.interior.numel() > 0 and plan.boundary.numel() >= 2
    assert plan.table_interior is not None
    # every valid entry of the interior table points into [local | random]
    n_buf = plan.kpos_interior.numel() // 8
    assert int(plan.table_interior.index[plan.table_interior.valid].max()) < n_buf


@pytest.mark.parametrize("causal", [False, True])
def test_edge_and_runs_do_not_grow_with_the_local_length(causal):
    """What a rank gathers for the halo and the boundary (the edge) is O(window reach), the
    same for n = 16 and 64 blocks per rank; the runs tile the local tokens in order."""
    cfg = SparsityConfig(block_size=8, window_blocks=5, global_blocks=1, random_blocks=0,
                         causal=causal)  # fmt: skip
    edges = []
    for seq in (512, 2048):
        plan = rank_plan(cfg, seq, 4, 1, 2, 0, 0)
        edges.append(plan.edge_local.numel())
        assert torch.equal(plan.edge_local, torch.unique(plan.edge_local))
        interior = {int(b) - 16 * seq // 512 for b in plan.interior}
        flags = [b in interior for b in range(seq // 4 // 8)]
        expanded = [inner for tokens, inner in plan.runs for _ in range(tokens // 8)]
        assert expanded == flags and sum(t for t, _ in plan.runs) == seq // 4
        for piece, start in zip(plan.halo_send, plan.halo_send_in_edge, strict=True):
            local = torch.arange(piece.lo * 8, piece.hi * 8) - seq // 4
            span = plan.edge_local[start : start + local.numel()]
            assert torch.equal(span, local)
    assert edges[0] == edges[1] <= 2 * 2 * 8 * 2


def test_single_rank_without_process_group_equals_sparse_attention():
    cfg = SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=2)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[1, -9:] = True
    out = cp_sparse_attention(q, k, v, cfg, padding_mask=pad)
    torch.testing.assert_close(out, sparse_attention(q, k, v, cfg, padding_mask=pad))


def test_single_rank_errors_name_the_setting():
    cfg = SparsityConfig(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        cp_sparse_attention(*(torch.randn(1, 1, 12, 4),) * 3, cfg)
    with pytest.raises(ValueError, match="global_mask must be the FULL-sequence"):
        x = torch.randn(1, 1, 64, 4)
        cp_sparse_attention(x, x, x, cfg, global_mask=torch.zeros(1, 32, dtype=torch.bool))


def test_plan_is_built_once_per_step_and_layer():
    """Micro-batches and backward of one (step, layer) reuse one plan; a new step draws anew."""
    from parallel.context_parallel import cp_sparse_attention

    cfg = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=1, random_blocks=2, random_pool_blocks=4
    )
    rank_plan.cache_clear()
    for step in (0, 1):
        for _micro_batch in range(3):
            for layer in (0, 1):
                q, k, v = (torch.randn(1, 2, 64, 4, requires_grad=True) for _ in range(3))
                cp_sparse_attention(q, k, v, cfg, None, layer=layer, step=step).sum().backward()
    info = rank_plan.cache_info()
    assert info.misses == 4, info  # 2 steps x 2 layers
    assert info.hits == 8, info
