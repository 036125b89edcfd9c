"""checkpoint.async_save on the CheckpointManager alone, in one process.

A ShardedTensor needs a process group, so the tests open a one-rank gloo group. The background
write is held back (DCP's FileSystemWriter.write_data waits for an event) to see what a crash
or a restart during the write finds. The loop's async runs are in
tests/distributed/test_checkpoint_async.py.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from parallel.local_ranks import free_port
from train.checkpoint import CheckpointArgs, CheckpointManager
from train.sharded_state import ShardedState


@pytest.fixture
def one_rank_group():
    assert not dist.is_initialized()
    url = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=url, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def held_writes(monkeypatch) -> threading.Event:
    """DCP's tensor writes wait until the returned event is set."""
    release = threading.Event()
    write_data = dcp.FileSystemWriter.write_data

    def held(self, plan, planner):
        assert release.wait(timeout=30), "the test never released the background write"
        return write_data(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", held)
    return release


def _state(weight: torch.Tensor) -> dict:
    tensors = ShardedState()
    tensors.add("w", weight.shape, [((0,), weight)])
    return {"engine": {"tensors": tensors}, "note": "small state"}


def _saved_weight(manager: CheckpointManager) -> tuple[int, torch.Tensor]:
    state = manager.load_latest()
    assert state is not None
    template, weight = ShardedState(), torch.zeros(4)
    template.add("w", weight.shape, [((0,), weight)])
    state["engine"]["tensors"].load_into(template)
    return state["step"], weight


@pytest.mark.timeout(60)
def test_async_checkpoint_is_committed_after_its_background_write(
    one_rank_group, held_writes, tmp_path, caplog
):
    manager = CheckpointManager(CheckpointArgs(async_save=True, keep_last=1), tmp_path)
    weight = torch.arange(4.0)
    held_writes.set()
    manager.save(1, _state(weight), {"model": {}})
    manager.finalize()
    assert manager.complete_steps() == [1]

    held_writes.clear()
    weight += 10  # step 2
    manager.save(2, _state(weight), {"model": {}})
    weight += 10  # the next optimizer step, while step 2's tensors are not written yet
    pending = tmp_path / "checkpoints" / "step_000002.tmp"
    assert (pending / "state.pt").is_file()  # the small per-rank files are written at once
    assert not (pending / "engine.tensors" / ".metadata").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001\n"
    # A process restarted now (after a kill mid-write) ignores the .tmp: step 1 is the newest.
    restarted = CheckpointManager(CheckpointArgs(), tmp_path)
    step, saved = _saved_weight(restarted)
    assert step == 1 and torch.equal(saved, torch.arange(4.0))

    held_writes.set()
    with caplog.at_level("INFO", logger="train.checkpoint"):
        caplog.clear()
        manager.finalize()
    assert manager.complete_steps() == [2] and not pending.exists()  # keep_last=1
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002\n"
    step, saved = _saved_weight(restarted)
    assert step == 2 and torch.equal(saved, torch.arange(4.0) + 10)  # staged before the change
    (timing,) = [m for m in caplog.messages if "in the background" in m]
    assert "step_000002: save() blocked" in timing and "the commit waited" in timing


@pytest.mark.timeout(60)
def test_next_save_commits_the_pending_one(one_rank_group, tmp_path):
    manager = CheckpointManager(CheckpointArgs(async_save=True, keep_last=0), tmp_path)
    for step in (1, 2, 3):
        manager.save(step, _state(torch.full((4,), float(step))), {"model": {}})
        assert manager.complete_steps() == list(range(1, step))  # the previous one, committed
    manager.finalize()
    assert manager.complete_steps() == [1, 2, 3]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.timeout(60)
def test_a_failed_background_write_raises_at_the_commit(one_rank_group, tmp_path, monkeypatch):
    import errno

    manager = CheckpointManager(CheckpointArgs(async_save=True), tmp_path)
    manager.save(1, _state(torch.ones(4)), {"model": {}})
    manager.finalize()

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
    manager.save(2, _state(torch.ones(4)), {"model": {}})  # returns before the write fails
    with pytest.raises(OSError, match=r"step_000002\.tmp/engine\.tensors: the disk is full"):
        manager.finalize()
    assert manager.complete_steps() == [1]
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()  # the partial is removed
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001\n"
