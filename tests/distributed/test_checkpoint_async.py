"""checkpoint.async_save in the real training loop: the same checkpoints as a synchronous save.

One spawn of 2 gloo ranks (TP2, the Megatron engine) runs `train.loop.train` three times:
- synchronously, 4 steps with checkpoints at steps 2 and 4 (the reference);
- with checkpoint.async_save=true, the same: the same losses, and both checkpoints committed
  with bit-identical parameters and AdamW state, a timing line for each;
- resumed with `--resume auto` from a copy of the async step-2 checkpoint next to a
  `step_000004.tmp` whose tensors were never written (a kill during the background write): the
  .tmp is ignored, the run continues from step 2 with the reference's losses and final state;
- with NaN losses in steps 3-4 and train.max_nan_skips=2: the stop's checkpoint (step 4) is
  committed before NonFiniteLossError is raised.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.test_checkpoint_reshard import STEPS, _model_space
from tests.distributed.test_checkpoint_reshard import _copy_step as copy_step
from tests.distributed.test_checkpoint_reshard import _train as train_layout
from train.engine import NonFiniteLossError

SAVED = 2
TP2 = ["parallel.tp=2"]


def async_rank(rank: int, world: int, data: str, root: str) -> dict:
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1"
    )
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("train.checkpoint")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    root_dir = Path(root)
    out: dict = {"sync": train_layout(data, root_dir / "sync", TP2).losses}
    async_on = [*TP2, "checkpoint.async_save=true"]
    out["async"] = train_layout(data, root_dir / "async", async_on).losses
    out["timings"] = [m for m in messages if "in the background" in m]
    copy_step(root_dir / "async", root_dir / "resumed", SAVED)
    if rank == 0:  # what a kill during step 4's background write leaves
        killed = root_dir / "resumed" / "checkpoints" / f"step_{STEPS:06d}.tmp"
        shutil.copytree(root_dir / "async" / "checkpoints" / f"step_{STEPS:06d}", killed)
        (killed / "meta.json").unlink()
        shutil.rmtree(killed / "engine.tensors")
    resumed = train_layout(data, root_dir / "resumed", async_on, resume="auto")
    out["resumed"] = (resumed.start_step, resumed.losses)
    os.environ["HALOTRON_TEST_NAN_AT_STEPS"] = "3-4"
    try:
        train_layout(data, root_dir / "nan", [*async_on, "train.max_nan_skips=2"])
    except NonFiniteLossError:
        out["nan_stop"] = True
    finally:
        del os.environ["HALOTRON_TEST_NAN_AT_STEPS"]
    return out


@pytest.mark.timeout(300)
def test_async_save_checkpoints_and_resumes_like_the_synchronous_one(tiny_prepared_data, tmp_path):
    got = run_ranks(async_rank, world=2, args=(str(tiny_prepared_data), str(tmp_path)), timeout=240)
    ref = got[0]["sync"]
    assert len(ref) == STEPS and got[0]["async"] == ref and got[1]["async"] == ref
    for step in (SAVED, STEPS):
        want, same = _model_space(tmp_path / "sync", step), _model_space(tmp_path / "async", step)
        assert want.keys() == same.keys() and any(k.startswith("optim.exp_avg.") for k in want)
        for key, tensor in want.items():
            assert torch.equal(tensor, same[key]), (step, key)
    checkpoints = tmp_path / "async" / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:06d}\n"
    assert not list(checkpoints.glob("*.tmp"))
    # Rank 0 logs each commit: what the save blocked, what ran in the background.
    assert [t.split(":")[0] for t in got[0]["timings"]] == [
        f"saved checkpoint {checkpoints / f'step_{s:06d}'}" for s in (SAVED, STEPS)
    ]
    assert all("save() blocked" in t for t in got[0]["timings"]) and not got[1]["timings"]
    start, losses = got[0]["resumed"]
    assert start == SAVED and losses == ref
    want, same = _model_space(tmp_path / "sync", STEPS), _model_space(tmp_path / "resumed", STEPS)
    for key, tensor in want.items():
        assert torch.equal(tensor, same[key]), key
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.tmp"))
    assert got[0].get("nan_stop") and got[1].get("nan_stop")
    nan_checkpoints = tmp_path / "nan" / "checkpoints"
    assert (nan_checkpoints / "latest").read_text() == f"step_{STEPS:06d}\n"
    assert (nan_checkpoints / f"step_{STEPS:06d}" / "engine.tensors" / ".metadata").is_file()
    assert not list(nan_checkpoints.glob("*.tmp"))
