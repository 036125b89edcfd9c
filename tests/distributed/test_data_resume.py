"""Exact data-stream resume across processes: 2 data-parallel ranks, each with 2 DataLoader
workers. Each rank runs k batches and saves its loader state in one set of spawned processes;
a NEW set of processes loads the states and runs m more. Per rank, the k + m batches must equal
the uninterrupted k + m batches of a single-process reference.

Run:  pytest tests/distributed/test_data_resume.py -q
"""

from __future__ import annotations

from dataclasses import asdict
from itertools import islice
from pathlib import Path

import pytest
import torch

from data.loader import DataArgs, build_train_stream
from tests.distributed.harness import run_ranks

SEQ_LEN, BATCH, SEED = 64, 2, 13
K, M = 5, 8  # odd k: the resumed stream starts with worker 1's reader


def _stream(args: dict, rank: int, world: int):
    return build_train_stream(DataArgs(**args), SEQ_LEN, BATCH, rank, world, seed=SEED)


def _rank_head(rank: int, world: int, args: dict, state_dir: str) -> list[dict]:
    stream = _stream(args, rank, world)
    batches = list(islice(stream, K))
    torch.save(stream.state_dict(), Path(state_dir) / f"data-rank{rank}.pt")
    return batches


def _rank_tail(rank: int, world: int, args: dict, state_dir: str) -> list[dict]:
    stream = _stream(args, rank, world)
    stream.load_state_dict(torch.load(Path(state_dir) / f"data-rank{rank}.pt", weights_only=True))
    return list(islice(stream, M))


@pytest.mark.timeout(240)
def test_two_ranks_two_workers_resume_in_new_processes(tiny_prepared_data, tmp_path):
    args = asdict(DataArgs(path=str(tiny_prepared_data), num_workers=2, shuffle_buffer=4))
    heads = run_ranks(_rank_head, world=2, out_dir=tmp_path, args=(args, str(tmp_path)))
    tails = run_ranks(_rank_tail, world=2, out_dir=tmp_path, args=(args, str(tmp_path)))
    seen = []
    for rank in range(2):
        reference = list(islice(_stream(args, rank, 2), K + M))
        resumed = heads[rank] + tails[rank]
        assert len(resumed) == len(reference) == K + M
        for i, (got, want) in enumerate(zip(resumed, reference, strict=True)):
            assert set(got) == set(want)
            for key in want:
                assert torch.equal(got[key], want[key]), (rank, i, key)
        seen.append(torch.cat([b["tokens"].reshape(-1) for b in reference]))
    assert not torch.equal(seen[0], seen[1])  # the ranks read different shards
