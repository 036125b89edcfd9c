"""Context-parallel sparse attention on P gloo ranks vs the single-device dense reference.

pytest tests/distributed/test_context_parallel.py      (about a minute on 2 cores)

One spawn per P runs every pattern (window with a multi-hop reach, +global, +random, BigBird,
per-head dilation, per-head random, explicit global tokens, per-sample global_mask, ETC,
padding), causal and bidirectional, in fp64 (tolerance 1e-10) and fp32 (1e-5): output and the
q/k/v gradients of a random upstream gradient, each rank checking its slice; in fp32 also the
forward of the fused FlexAttention path (`backend="flex"`, the CUDA default).
"""

from __future__ import annotations

import json

import pytest

from tests.distributed import cp_cases
from tests.distributed.harness import RankFailure, RankTimeout, run_ranks

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def _failures(per_rank: list[list[dict]]) -> list[str]:
    bad = []
    for rank, results in enumerate(per_rank):
        for item in results:
            for key, err in item["errors"].items():
                if not err <= TOLERANCE[item["dtype"]]:
                    bad.append(f"rank {rank} {item['name']} {item['dtype']} {key}: {err:.2e}")
    return bad


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_pattern_matches_dense_reference(world, tmp_path):
    cases = cp_cases.all_cases()
    per_rank = run_ranks(
        cp_cases.exactness, world, tmp_path, args=(cases, ["float64", "float32"]), timeout=200
    )
    assert len(per_rank) == world
    assert all(len(results) == 2 * len(cases) for results in per_rank)
    assert not _failures(per_rank), "\n".join(_failures(per_rank))


@pytest.mark.timeout(240)
def test_pooled_random_blocks_on_eight_ranks(tmp_path):
    """random_pool_blocks at P=8 (2 blocks per rank: every window reach is multi-hop)."""
    cases = [
        c
        for c in cp_cases.all_cases()
        if c["name"].split("/")[0] in ("bigbird-pool", "pool-per-head-dilated", "bigbird")
    ]
    assert len(cases) == 6
    per_rank = run_ranks(cp_cases.exactness, 8, tmp_path, args=(cases, ["float64"]), timeout=200)
    assert len(per_rank) == 8
    assert not _failures(per_rank), "\n".join(_failures(per_rank))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_separate_global_projections_match_dense_reference(world, tmp_path):
    per_rank = run_ranks(cp_cases.global_projections, world, tmp_path, timeout=100)
    for rank, results in enumerate(per_rank):
        assert len(results) == 2
        for item in results:
            bad = {k: e for k, e in item["errors"].items() if not e <= 1e-10}
            assert not bad, f"rank {rank} causal={item['causal']}: {bad}"


@pytest.mark.timeout(120)
def test_without_overlap_same_result(tmp_path):
    """overlap=False (halo awaited before any compute) is exact too."""
    cases = [
        dict(c, overlap=False)
        for c in cp_cases.all_cases()
        if c["name"].split("/")[0] in ("window-multihop", "bigbird", "padding+sample-global")
    ]
    assert len(cases) == 6
    per_rank = run_ranks(cp_cases.exactness, 4, tmp_path, args=(cases, ["float64"]), timeout=100)
    assert not _failures(per_rank), "\n".join(_failures(per_rank))


@pytest.mark.bench  # a timing assertion: make bench, not make test
@pytest.mark.timeout(180)
def test_overlap_hides_a_slow_halo(tmp_path):
    """benchmarks.cp_overlap: with the peer's halo delayed by rank 0's compute time, overlap
    hides a clear share of it (the interior is 60 of 64 blocks; 0.3 leaves room for noise)."""
    from benchmarks import cp_overlap

    out = tmp_path / "overlap.json"
    args = ["--seq-len", "8192", "--window-blocks", "9", "--reps", "3", "--out", str(out)]
    assert cp_overlap.main([*args, "--min-hidden", "0.3"]) == 0
    report = json.loads(out.read_text())
    r0 = report["rank0"]
    assert r0["interior_blocks"] == 60 and r0["boundary_blocks"] == 4
    assert r0["overlap_off_s"] >= r0["delay_s"]  # without overlap the delay is paid in full


@pytest.mark.timeout(120)
def test_two_chained_layers_backward_exact(tmp_path):
    per_rank = run_ranks(cp_cases.two_layers, 4, tmp_path, timeout=100)
    for rank, errors in enumerate(per_rank):
        assert max(errors.values()) < 1e-10, (rank, errors)


@pytest.mark.timeout(120)
def test_traffic_is_the_halo_formula(tmp_path):
    """Window only (reach 2 blocks each side), P=4: a middle rank sends exactly the 2 blocks
    each neighbour needs, k and v, forward and back; edge ranks one side only."""
    batch, heads, dim = 2, 3, 8
    cfg = dict(block_size=cp_cases.BLOCK, window_blocks=5, global_blocks=0, random_blocks=0)
    per_rank = run_ranks(cp_cases.traffic, 4, tmp_path, args=(cfg, batch, heads, dim), timeout=100)
    side = 2 * cp_cases.BLOCK * batch * heads * dim * 2 * 4  # tokens x B x H x D x (k, v) x fp32
    for rank, sent in enumerate(per_rank):
        sides = 1 if rank in (0, 3) else 2
        assert sent["forward"]["halo"] == sides * side, (rank, sent)
        assert sent["backward"]["halo"] == sides * side, (rank, sent)
        assert sent["forward"]["random"] == sent["forward"]["global"] == 0
        assert sent["layers"] == [2]


@pytest.mark.timeout(120)
def test_bigbird_traffic_kinds_are_counted(tmp_path):
    cfg = dict(block_size=cp_cases.BLOCK, window_blocks=3, global_blocks=2, random_blocks=2)
    per_rank = run_ranks(cp_cases.traffic, 2, tmp_path, args=(cfg, 1, 2, 8), timeout=100)
    for sent in per_rank:
        for direction in ("forward", "backward"):
            for kind in ("halo", "random", "global", "global_merge"):
                assert sent[direction][kind] > 0, (direction, kind, sent)


@pytest.mark.timeout(120)
def test_pool_traffic_is_counted_as_pool_and_matches_forward_bytes(tmp_path):
    """With random_pool_blocks the random all-to-all is counted as "pool" (what the wandb
    comm/pool_bytes metric shows), and equals parallel.show.forward_bytes for every rank."""
    from model.sparse import SparsityConfig
    from parallel.show import forward_bytes

    cfg = dict(
        block_size=cp_cases.BLOCK, window_blocks=3, global_blocks=2, random_blocks=2,
        random_pool_blocks=8,
    )  # fmt: skip
    per_rank = run_ranks(cp_cases.traffic, 4, tmp_path, args=(cfg, 1, 2, 8), timeout=100)
    for rank, sent in enumerate(per_rank):
        assert sent["forward"]["random"] == 0, sent
        assert sent["forward"]["pool"] > 0, sent
        expected = forward_bytes(SparsityConfig(**cfg), cp_cases.SEQ, 4, rank, 2, 8, layer=2)
        assert sent["forward"]["pool"] == expected["pool"], (rank, sent, expected)


@pytest.mark.timeout(120)
def test_per_layer_model_plans_and_traffic_follow_each_layer(tmp_path):
    """attention.layers on 4 cp ranks (cp_cases.PER_LAYER): the model's logits and gradients
    equal one process's, and every layer sends what its own pattern's plan says
    (parallel.show.forward_bytes), which differs from layer to layer."""
    per_rank = run_ranks(cp_cases.per_layer_model, 4, tmp_path, timeout=100)
    for rank, result in enumerate(per_rank):
        assert result["logits"] < 1e-9 and result["grad"] < 1e-9, (rank, result)
        assert result["sent"] == result["expected"], rank
    halo = [sum(r["sent"][layer]["halo"] for r in per_rank) for layer in range(3)]
    assert 0 < halo[0] < halo[1], halo  # the dilated window reaches past a rank's slice
    assert sum(r["sent"][2]["random"] for r in per_rank) > 0  # causal: the last rank sends none
    for result in per_rank:
        assert result["sent"][2]["global"] > 0
        for layer in (0, 1):  # the token windows: halo only
            assert result["sent"][layer]["random"] == result["sent"][layer]["global"] == 0


@pytest.mark.timeout(120)
def test_bad_calls_raise_value_error_on_every_rank(tmp_path):
    per_rank = run_ranks(cp_cases.errors, 2, tmp_path, timeout=60)
    for rank, messages in enumerate(per_rank):
        for name in ("config-mismatch", "seq-mismatch", "indivisible", "one-rank-bad-shape"):
            assert messages[name].startswith("ValueError"), (rank, name, messages[name])
        assert "disagree" in messages["config-mismatch"]
        assert "window_blocks=5" in messages["config-mismatch"]
        assert "multiple of cp x attention.block_size" in messages["indivisible"]
        assert "rank 1" in messages["one-rank-bad-shape"]
        assert messages["after"].startswith("ok")


def _hang(rank: int, world: int) -> None:
    import time

    if rank == 1:
        time.sleep(60)


def _crash(rank: int, world: int) -> None:
    import os

    import torch.distributed as dist

    if rank == 1:
        os._exit(3)
    dist.barrier()


@pytest.mark.timeout(60)
def test_harness_fails_fast_on_hang_and_crash(tmp_path):
    with pytest.raises(RankTimeout):
        run_ranks(_hang, 2, tmp_path, timeout=5)
    with pytest.raises(RankFailure, match="died without a result"):
        run_ranks(_crash, 2, tmp_path, timeout=30)
