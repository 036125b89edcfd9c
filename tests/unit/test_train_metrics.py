"""What a run logs per step (offline wandb), and how it protects itself from NaN/Inf losses.

    python -m pytest -q tests/unit/test_train_metrics.py

One process, the tiny recipe of test_train.py. The NaN cases use the test hook
HALOTRON_TEST_NAN_AT_STEPS (train.preemption): the engine multiplies those steps' loss by NaN
before backward, so the gradients are NaN too and only the skip keeps the parameters finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.model_space import model_space
from tests.nested import same_nested
from tests.unit import test_train
from tests.unit.test_train import TINY, _cfg, _wandb_file
from tests.unit.wandb_history import wandb_history
from train.__main__ import main
from train.engine import lr_at
from train.loop import train
from train.step_metrics import TIME_PARTS

data_dir = test_train.data_dir  # the trainer tests' fixtures
wandb_env = test_train.wandb_env

STEP_KEYS = {
    "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/skipped_steps",
    "perf/samples_per_s", "perf/tflops_per_s", "perf/mfu", "time/step_s", "time/other_s",
    *(f"time/{part}" for part in TIME_PARTS), "mem/peak_gib", "data/skipped_samples",
    "data/skipped_shards",
}  # fmt: skip


def _state(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "state.pt", weights_only=False)


def test_step_metrics_and_pattern_picture_in_the_wandb_run(data_dir, tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    args = ["train.steps=3", "logging.log_every=1", "checkpoint.every=2", "train.eval_batches=1"]
    train(_cfg(data_dir, run_dir, *args, "logging.peak_tflops=0.5"))
    rows = wandb_history(_wandb_file(run_dir), last_step=3)
    steps = {row["_step"]: row for row in rows if "train/loss" in row}
    assert sorted(steps) == [1, 2, 3]
    for step, row in steps.items():
        assert STEP_KEYS <= row.keys(), STEP_KEYS - row.keys()
        assert not any(k.startswith("comm/") for k in row)  # one process: no cp traffic
        assert row["perf/mfu"] > 0 and row["perf/tflops_per_s"] > 0
        # MFU against the configured 0.5 TFLOP/s peak of the one device.
        assert row["perf/mfu"] == pytest.approx(row["perf/tflops_per_s"] / 0.5)
        parts = sum(row[f"time/{part}"] for part in TIME_PARTS)
        assert 0 < parts <= row["time/step_s"] * (1 + 1e-9)
        assert parts + row["time/other_s"] == pytest.approx(row["time/step_s"])
        assert row["time/fwd_bwd_s"] > 0 and row["time/optimizer_s"] > 0
        assert (row["time/checkpoint_s"] > 0) == (step == 2)  # checkpoint.every=2
        assert 0.05 < row["mem/peak_gib"] < 64  # peak RSS of this process
        assert row["train/skipped_steps"] == 0 and math.isfinite(row["train/grad_norm"])
        assert row["perf/samples_per_s"] > 0 and row["train/tokens_per_s"] > 0
    # 4 sequences of 256 tokens per step; throughput is per second of the same step time.
    row = steps[3]
    assert row["perf/samples_per_s"] * 256 == pytest.approx(
        row["perf/tflops_per_s"] * 1e12 / _flops_per_token(data_dir, run_dir)
    )
    # The pattern picture, attached once at the start.
    images = [row for row in rows if "pattern/attention/path" in row]
    assert len(images) == 1 and images[0]["pattern/attention/_type"] == "image-file"
    assert (run_dir / "pattern.png").stat().st_size > 1000
    (media,) = run_dir.glob("wandb/offline-run-*/files/media/images/pattern/*.png")
    assert media.stat().st_size == (run_dir / "pattern.png").stat().st_size


def _flops_per_token(data: Path, run_dir: Path) -> float:
    from train.flops import flops_per_token

    cfg = _cfg(data, run_dir)
    return flops_per_token(cfg.model, cfg.attention, cfg.train.seq_len).total


def test_a_nan_step_is_skipped_and_training_continues(data_dir, tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv("HALOTRON_TEST_NAN_AT_STEPS", "2")
    run_dir = tmp_path / "run"
    args = ["train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=0", "logging.log_every=1"]
    result = train(_cfg(data_dir, run_dir, *args, "train.eval_batches=1"))
    assert result.steps == 3 and result.skipped_steps == 1
    assert math.isfinite(result.losses[0]) and math.isnan(result.losses[1])
    assert math.isfinite(result.losses[2])
    # Means leave the skipped step out (the summary line and wandb's final loss use them).
    assert result.mean_loss(first=True) == (result.losses[0] + result.losses[2]) / 2
    one, two, three = (_state(run_dir, s) for s in (1, 2, 3))
    tensors = [model_space(run_dir / "checkpoints" / f"step_{s:06d}") for s in (1, 2, 3)]
    # The skipped step changed neither the parameters nor the AdamW state (moments, step count).
    assert same_nested(tensors[0], tensors[1])
    assert one["engine"]["adam_step"] == two["engine"]["adam_step"] == 1
    # The next step trains again, from finite parameters.
    assert not same_nested(tensors[1], tensors[2])
    assert all(torch.isfinite(t).all() for t in tensors[2].values())
    assert three["engine"]["adam_step"] == 2 and three["progress"]["skipped_steps"] == 1
    history = wandb_history(_wandb_file(run_dir), last_step=3)
    rows = {r["_step"]: r for r in history if "train/loss" in r}
    assert [rows[s]["train/skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert math.isnan(rows[2]["train/grad_norm"])
    # The schedule follows the step number: step 3 uses step 3's learning rate.
    cfg = _cfg(data_dir, run_dir, *args)
    want = lr_at(2, cfg.optim, cfg.schedule, cfg.train.steps)
    assert want != lr_at(1, cfg.optim, cfg.schedule, cfg.train.steps)
    assert rows[3]["train/lr"] == pytest.approx(want, rel=1e-6)


def test_consecutive_nan_steps_stop_the_run_after_a_checkpoint(
    data_dir, tmp_path, wandb_env, monkeypatch, capsys
):
    monkeypatch.setenv("HALOTRON_TEST_NAN_AT_STEPS", "2-9")
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.path={data_dir}", f"train.run_dir={run_dir}", "train.steps=8"]
    args += ["train.max_nan_skips=3", "checkpoint.every=1", "checkpoint.keep_last=0"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "stopped at step 4" in err and "3 consecutive steps (2-4" in err, err[-2000:]
    assert "train.max_nan_skips=3" in err
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps == [1, 2, 3, 4]
    last = _state(run_dir, 4)["progress"]
    assert last["skipped_steps"] == 3 and len(last["losses"]) == 4
    first, after = (model_space(run_dir / "checkpoints" / f"step_{s:06d}") for s in (1, 4))
    assert same_nested(first, after)
