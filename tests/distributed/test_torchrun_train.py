"""`torchrun -m train` on CPU: a real launch of 4 gloo ranks (TP2 x CP2), compared with one process.

The same tiny recipe trains 6 steps in one process (LocalEngine) and under torchrun with
tp=2, cp=2 (Megatron engine, context-parallel attention) and with pp=2 (Megatron's pipeline
schedule); the losses of every step must agree (the layouts compute the same math), the
multi-rank run checkpoints one file per rank, and `--resume` continues it from the newest
checkpoint to the same losses as the one-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.local_ranks import free_port
from tests.distributed.harness import run_session
from tests.unit.test_train import TINY

STEPS = 6
COMMON = [*TINY, "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=2"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = tmp_path / var.lower()
        path.mkdir(exist_ok=True)
        env[var] = str(path)
    return env


def _run(cmd: list[str], tmp_path: Path, timeout: int) -> str:
    """The output of `cmd`, which must succeed (harness.run_session: no rank outlives it)."""
    code, stdout, stderr = run_session(cmd, _env(tmp_path), timeout)
    assert code == 0, stdout[-3000:] + stderr[-6000:]
    return stdout + stderr


def _torchrun(nproc: int, args: list[str], tmp_path: Path, timeout: int = 300) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "train", *args,
    ]  # fmt: skip
    return _run(cmd, tmp_path, timeout)


def _losses(run_dir: Path, name: str) -> list[float]:
    ckpt = run_dir / "checkpoints"
    latest = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / latest / name, weights_only=False)
    return state["progress"]["losses"]


@pytest.fixture(scope="module")
def one_process_losses(tiny_prepared_data, tmp_path_factory) -> list[float]:
    tmp_path = tmp_path_factory.mktemp("one")
    one = tmp_path / "run"
    _run(
        [sys.executable, "-m", "train", *COMMON, f"data.path={tiny_prepared_data}",
         f"train.run_dir={one}", f"train.steps={STEPS}"],
        tmp_path, timeout=300,
    )  # fmt: skip
    want = _losses(one, "state.pt")
    assert len(want) == STEPS and want[-1] < want[0]
    return want


@pytest.mark.timeout(600)
def test_torchrun_tp2_cp2_matches_one_process_and_resumes(
    tiny_prepared_data, one_process_losses, tmp_path
):
    want = one_process_losses

    multi = tmp_path / "tp2cp2"
    layout = ["parallel.tp=2", "parallel.cp=2"]
    args = [*COMMON, *layout, f"data.path={tiny_prepared_data}", f"train.run_dir={multi}"]
    out = _torchrun(4, [*args, f"train.steps={STEPS - 2}"], tmp_path)
    assert "layout tp=2 pp=1 cp=2 dp=1" in out
    step_dir = multi / "checkpoints" / "step_000004"
    assert sorted(p.name for p in step_dir.glob("state_rank*.pt")) == [
        f"state_rank{r:05d}.pt" for r in range(4)
    ]
    assert (multi / "config.yaml").is_file()
    assert len(list(multi.glob("wandb/offline-run-*"))) == 1  # rank 0 only

    out = _torchrun(4, [*args, f"train.steps={STEPS}", "--resume"], tmp_path)
    assert "resuming from step 4" in out
    got = [_losses(multi, f"state_rank{r:05d}.pt") for r in range(4)]
    for losses in got:
        assert len(losses) == STEPS
        err = max(abs(a - b) for a, b in zip(losses, want, strict=True))
        assert err < 1e-4, (losses, want)


@pytest.mark.timeout(300)
def test_torchrun_pp2_matches_one_process(tiny_prepared_data, one_process_losses, tmp_path):
    """Pipeline parallel (Megatron's schedule) as launched by users: 2 stages of 1 layer."""
    run_dir = tmp_path / "pp2"
    args = [*COMMON, "parallel.pp=2", f"data.path={tiny_prepared_data}", f"train.run_dir={run_dir}"]
    out = _torchrun(2, [*args, f"train.steps={STEPS}"], tmp_path)
    assert "layout tp=1 pp=2 cp=1 dp=1" in out
    for r in range(2):
        losses = _losses(run_dir, f"state_rank{r:05d}.pt")
        err = max(abs(a - b) for a, b in zip(losses, one_process_losses, strict=True))
        assert err < 1e-4, (losses, one_process_losses)


@pytest.mark.timeout(120)
def test_layout_not_matching_the_launch_is_refused_on_every_rank(tiny_prepared_data, tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "train", *COMMON, "parallel.tp=4", f"data.path={tiny_prepared_data}",
        f"train.run_dir={tmp_path / 'bad'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert "parallel.tp=4" in proc.stderr and "world size 2" in proc.stderr
    assert not (tmp_path / "bad").exists()  # refused before any file was written
