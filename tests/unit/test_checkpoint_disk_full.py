"""A checkpoint written to a really full filesystem (a small tmpfs, mounted when the tests run as
root): one sentence that says the disk is full, the partial `step_N.tmp/` removed, the previous
checkpoint intact; for the per-rank file (torch.save, whose zip writer hides ENOSPC), for DCP's
sharded tensors, and for `python -m train` (exit 1, no traceback).

    sudo python -m pytest -q tests/unit/test_checkpoint_disk_full.py
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.local_ranks import free_port
from tests.unit.test_train import TINY
from tests.unit.test_train import wandb_env as wandb_env  # a fixture
from train.__main__ import main
from train.checkpoint import CheckpointArgs, CheckpointManager
from train.sharded_state import ShardedState

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root"
)

MIB = 2**20


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a directory on a filesystem that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _check_disk_full(manager: CheckpointManager, error: OSError) -> None:
    message = str(error)
    assert error.errno == errno.ENOSPC and "\n" not in message, message
    assert "step_000002.tmp" in message and "the disk is full" in message, message
    assert f"free in {manager.dir} after removing the partial step_000002.tmp" in message
    assert not list(manager.dir.glob("*.tmp"))  # the partial checkpoint is gone
    assert manager.complete_steps() == [1]
    assert (manager.dir / "latest").read_text().strip() == "step_000001"


def test_full_disk_under_torch_save(small_disk):
    manager = CheckpointManager(CheckpointArgs(), small_disk)
    manager.save(1, {"w": torch.ones(1000)}, {"model": {}})
    with pytest.raises(OSError) as info:
        manager.save(2, {"w": torch.ones(MIB // 4)}, {"model": {}})  # 1 MiB of float32
    assert isinstance(info.value.__cause__, RuntimeError)  # what torch raised: no errno in it
    _check_disk_full(manager, info.value)
    assert torch.equal(manager.load_latest()["w"], torch.ones(1000))


def test_full_disk_under_dcp(small_disk):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        manager = CheckpointManager(CheckpointArgs(), small_disk)
        for step, n in ((1, 1000), (2, MIB // 4)):
            tensors = ShardedState()
            tensors.add("w", (n,), [((0,), torch.ones(n))])
            state = {"engine": {"tensors": tensors}}
            if step == 1:
                manager.save(step, state, {"model": {}})
                continue
            with pytest.raises(OSError) as info:
                manager.save(step, state, {"model": {}})
    finally:
        dist.destroy_process_group()
    _check_disk_full(manager, info.value)


def test_train_cli_names_the_full_disk(tiny_prepared_data, small_disk, tmp_path, capsys, wandb_env):
    """checkpoint.dir on the full disk: the run's first checkpoint cannot be written."""
    code = main(
        [*TINY, f"data.path={tiny_prepared_data}", f"train.run_dir={tmp_path / 'run'}",
         f"checkpoint.dir={small_disk / 'ckpt'}", "train.steps=1"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    (line,) = [t for t in err.splitlines() if t.startswith("error:")]
    assert "step_000001.tmp" in line and "the disk is full" in line, line
    assert not list(Path(small_disk / "ckpt").glob("*.tmp"))
