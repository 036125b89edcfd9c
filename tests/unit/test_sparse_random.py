"""The random-block draw on its own, independent of every kernel: exclusions, distinctness,
uniformity, the pool, determinism across processes, and planning that stays O(local).

pytest tests/unit/test_sparse_random.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.sparse import SparsityConfig
from model.sparse_random import choose_distinct, hash32
from tests.tensor_probe import LargestTensor

ROOT = Path(__file__).resolve().parents[2]


def _candidates(cfg: SparsityConfig, n_blocks: int, row: int, dilation: int, pool) -> set[int]:
    """What row `row` may draw, from the rule in words (not from the draw's code)."""
    glob = set(cfg.global_block_ids(n_blocks))
    if row in glob:
        return set()
    allowed = set()
    for j in pool:
        if j in glob:
            continue
        if cfg.causal:
            ok = j < row - cfg.left_blocks * dilation
        else:
            ok = j < row - cfg.left_blocks * dilation or j > row + cfg.right_blocks * dilation
        if ok:
            allowed.add(j)
    return allowed


@settings(max_examples=60, deadline=None)
@given(
    n_blocks=st.integers(1, 40),
    half_window=st.integers(0, 3),
    global_blocks=st.integers(0, 3),
    random_blocks=st.integers(1, 4),
    causal=st.booleans(),
    dilation=st.sampled_from([1, 2, (1, 3)]),
    per_head=st.booleans(),
    pool=st.integers(0, 12),
    layer=st.integers(0, 5),
    step=st.integers(0, 1000),
)
def test_every_draw_obeys_the_rule(
    n_blocks, half_window, global_blocks, random_blocks, causal, dilation, per_head, pool, layer,
    step,
):  # fmt: skip
    cfg = SparsityConfig(
        block_size=4,
        window_blocks=half_window + 1 if causal else 2 * half_window + 1,
        global_blocks=global_blocks,
        random_blocks=random_blocks,
        causal=causal,
        dilation=dilation,
        random_per_head=per_head,
        random_pool_blocks=pool,
    )
    table = cfg.random_table(n_blocks * 4, 2, layer, step)
    heads = cfg.draw_heads(2)
    assert table.shape == (len(heads), n_blocks, random_blocks)
    for slot, (head, d) in enumerate(heads):
        members = cfg.random_pool(n_blocks, layer, step, head).tolist()
        if pool:
            assert len(members) <= pool
        else:
            assert members == [
                j for j in range(n_blocks) if j not in cfg.global_block_ids(n_blocks)
            ]
        for row in range(n_blocks):
            drawn = table[slot, row]
            picked = drawn[drawn >= 0].tolist()
            allowed = _candidates(cfg, n_blocks, row, d, members)
            assert len(picked) == len(set(picked)), (row, picked)  # distinct
            assert set(picked) <= allowed, (row, picked, allowed)  # outside window, G, pool
            assert len(picked) == min(random_blocks, len(allowed))  # as many as possible
            assert (drawn[len(picked) :] == -1).all()  # -1 only after the picks


def test_draw_is_uniform_over_the_candidates():
    """Row 20 of 64 blocks (window 3, 2 global): 59 candidates, 3 picks. Over 4000 steps each
    candidate is picked 4000 * 3 / 59 = 203 times on average; chi-square with 58 degrees of
    freedom stays below 100 (p ~ 5e-4 for a uniform draw) and no candidate is starved."""
    cfg = SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=3)
    counts = torch.zeros(64)
    for step in range(4000):
        row = cfg.random_rows(torch.tensor([20]), 64, 1, layer=0, step=step)[0, 0]
        counts.index_add_(0, row, torch.ones(3))
    allowed = _candidates(cfg, 64, 20, 1, range(64))
    assert set(counts.nonzero().flatten().tolist()) == allowed
    expected = 4000 * 3 / len(allowed)
    observed = counts[sorted(allowed)]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 100, chi2
    assert float(observed.min()) > 0.6 * expected


def test_pool_is_stratified_and_uniform_within_a_stratum():
    cfg = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=2, random_blocks=2, random_pool_blocks=8
    )
    hits = torch.zeros(64)
    for step in range(800):
        pool = cfg.random_pool(64, layer=1, step=step)
        assert pool.tolist() == sorted(pool.tolist())
        assert len(pool) == 8
        # one block in each eighth of the sequence, never a global block (0 and 63)
        assert (pool // 8).tolist() == list(range(8))
        assert not {0, 63} & set(pool.tolist())
        hits[pool] += 1
    inner = hits[8:16]  # a stratum without a global block: 800 / 8 = 100 each
    assert float(inner.min()) > 60 and float(inner.max()) < 140, inner
    assert hits[0] == hits[63] == 0


def test_pool_divides_evenly_over_cp_ranks():
    """With P dividing the pool, each rank's slice holds exactly pool / P pool blocks, for every
    sequence length: the pool's traffic is the same on every rank."""
    cfg = SparsityConfig(
        block_size=64, window_blocks=3, global_blocks=2, random_blocks=3, random_pool_blocks=32
    )
    for n_blocks in (256, 4096, 16384):
        for world in (4, 8):
            owners = torch.bincount(cfg.random_pool(n_blocks, 2, 5) // (n_blocks // world))
            assert owners.tolist() == [32 // world] * world, (n_blocks, world, owners)


def test_draw_depends_on_seed_step_layer_head_only():
    cfg = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=2, random_blocks=3, random_per_head=True
    )
    a = cfg.random_table(512, 4, layer=2, step=7)
    assert torch.equal(a, cfg.random_table(512, 4, layer=2, step=7))
    for other in (
        cfg.random_table(512, 4, layer=3, step=7),
        cfg.random_table(512, 4, layer=2, step=8),
        SparsityConfig(
            block_size=8, window_blocks=3, global_blocks=2, random_blocks=3, seed=1,
            random_per_head=True,
        ).random_table(512, 4, layer=2, step=7),
    ):  # fmt: skip
        assert not torch.equal(a, other)
    assert not torch.equal(a[0], a[1])  # heads draw independently


def test_rows_drawn_alone_equal_the_whole_table():
    """A cp rank draws only its own rows; they must be the rows every other rank computes."""
    for pool in (0, 6):
        cfg = SparsityConfig(
            block_size=8, window_blocks=5, global_blocks=1, random_blocks=3, causal=True,
            dilation=(1, 2), random_pool_blocks=pool,
        )  # fmt: skip
        table = cfg.random_table(8 * 96, 2, layer=1, step=4)
        rows = torch.tensor([95, 3, 40, 41, 0])
        assert torch.equal(cfg.random_rows(rows, 96, 2, layer=1, step=4), table[:, rows])


_DRAW = """
import sys, torch
from model.sparse import SparsityConfig
cfg = SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=3,
                     random_pool_blocks=int(sys.argv[1]))
print(cfg.random_table(8 * 200, 1, layer=3, step=11).flatten().tolist())
"""


@pytest.mark.parametrize("pool", [0, 10])
def test_draw_is_identical_across_processes(pool):
    """What every rank relies on: another interpreter (another hash seed) draws the same."""
    cfg = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=2, random_blocks=3, random_pool_blocks=pool
    )
    here = cfg.random_table(8 * 200, 1, layer=3, step=11).flatten().tolist()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", _DRAW, str(pool)],
            cwd=ROOT,
            env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert eval(out.stdout) == here


def test_choose_distinct_handles_short_rows():
    count = torch.tensor([0, 1, 2, 3, 10])
    picks = choose_distinct(12345, torch.arange(5), count, 3)
    assert picks[0].tolist() == [-1, -1, -1]
    assert picks[1].tolist() == [0, -1, -1]
    assert sorted(picks[2, :2].tolist()) == [0, 1] and picks[2, 2] == -1
    assert sorted(picks[3].tolist()) == [0, 1, 2]
    assert len(set(picks[4].tolist())) == 3 and 0 <= int(picks[4].min())
    h = hash32(7, torch.arange(100000), 0)
    assert 0 <= int(h.min()) and int(h.max()) < 2**32
    assert abs(float(h.double().mean()) / 2**32 - 0.5) < 0.01  # 32-bit values, centred


@pytest.mark.parametrize("pool", [0, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_planning_at_a_million_tokens_is_o_local(pool, causal):
    """rank_plan at N = 1M, P = 8 (16384 blocks, 2048 per rank) makes nothing of size nb x nb
    (268M) or N: its largest tensor is O(local) -- twice the rank's tokens with the pool; with
    the whole-sequence draw the received random blocks (up to r per local block) come on top."""
    from parallel.cp_plan import rank_plan

    cfg = SparsityConfig(
        block_size=64, window_blocks=2 if causal else 3, global_blocks=2, random_blocks=3,
        causal=causal, random_pool_blocks=pool,
    )  # fmt: skip
    seq_len, world = 1 << 20, 8
    with LargestTensor() as probe:
        plan = rank_plan.__wrapped__(cfg, seq_len, world, 3, 2, 0, 0)
    assert plan.interior.numel() + plan.boundary.numel() == 2048
    local = seq_len // world
    assert probe.largest <= (2 if pool else 2 + cfg.random_blocks) * local, probe.largest
    if pool:
        assert plan.random_blocks.numel() <= pool
