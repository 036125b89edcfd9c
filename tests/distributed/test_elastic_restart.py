"""Fault tolerance under real torchrun launches: a lost rank restarts the job, SIGTERM stops it.

- Two "nodes" on 127.0.0.1: two torchrun agents (`python -m launch multinode --run`: --nnodes 2,
  c10d rendezvous at 127.0.0.1:PORT, --max-restarts 1, `--resume auto`), one rank each, data
  parallel (Megatron engine). HALOTRON_TEST_KILL_AT_STEP=3 makes rank 1 SIGKILL itself once after
  step 3; both agents restart their workers, which resume from the step-2 checkpoint. The run
  ends with the losses and parameters of an uninterrupted run.
- SIGTERM (SLURM preemption): HALOTRON_TEST_SIGTERM_AT_STEP=3 makes rank 0 signal itself and
  torchrun (launch.agent passes SIGTERM to every worker); all ranks stop after step 3 with a
  checkpoint, the launcher exits 0 without a traceback, and `--resume` continues from it to the
  uninterrupted run's losses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from parallel.local_ranks import free_port
from tests.distributed.test_torchrun_train import _env
from tests.unit.test_train import TINY

STEPS = 6
COMMON = [
    *TINY, "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=3",
    f"schedule.decay_steps={STEPS}", f"train.steps={STEPS}",
]  # fmt: skip


def _state(run_dir: Path, rank: int, step: int | None = None) -> dict:
    ckpt = run_dir / "checkpoints"
    name = (ckpt / "latest").read_text().strip() if step is None else f"step_{step:06d}"
    return torch.load(ckpt / name / f"state_rank{rank:05d}.pt", weights_only=False)


def _launch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`python -m launch ARGS` with its output in a temporary file (two launches writing to
    pipes read one after the other could block each other)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", *args], env=env, text=True,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _wait(procs: list[subprocess.Popen], timeout: int) -> list[tuple[int, str]]:
    """(exit status, output) of each launch; all are killed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # the launcher, its torchrun agent and every worker (one session)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    out = []
    for p in procs:
        p.log.seek(0)  # type: ignore[attr-defined]
        out.append((p.returncode, p.log.read()))  # type: ignore[attr-defined]
    return out


def _single(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return _launch(["torchrun", "--run", "--nproc-per-node", "2", "--", *args], env)


@pytest.fixture(scope="module")
def uninterrupted(tiny_prepared_data, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    run_dir = tmp_path / "run"
    args = [*COMMON, f"data.path={tiny_prepared_data}", f"train.run_dir={run_dir}"]
    ((code, text),) = _wait([_single(args, _env(tmp_path))], timeout=240)
    assert code == 0, text[-6000:]
    return run_dir


def _same_run(run_dir: Path, reference: Path) -> None:
    from train.export import consolidated_state_dict  # the model-space checkpoint, whole

    for rank in range(2):
        got, want = _state(run_dir, rank), _state(reference, rank)
        assert got["step"] == STEPS
        assert got["progress"]["losses"] == pytest.approx(want["progress"]["losses"], abs=1e-6)
    got_model, want_model = (
        consolidated_state_dict(run_dir)[0],
        consolidated_state_dict(reference)[0],
    )
    for name, value in want_model.items():
        assert torch.allclose(got_model[name], value, atol=1e-6), name


@pytest.mark.timeout(400)
def test_two_node_rendezvous_restarts_after_a_killed_rank(
    tiny_prepared_data, uninterrupted, tmp_path
):
    run_dir = tmp_path / "elastic"
    env = _env(tmp_path) | {"HALOTRON_TEST_KILL_AT_STEP": "3"}
    endpoint = f"127.0.0.1:{free_port()}"
    node = [
        "multinode", "--run", "--nnodes", "2", "--nproc-per-node", "1", "--endpoint", endpoint,
        "--id", "elastic-test", "--max-restarts", "1", "--",
        *COMMON, f"data.path={tiny_prepared_data}", f"train.run_dir={run_dir}",
    ]  # fmt: skip
    results = _wait([_launch(node, env), _launch(node, env)], timeout=360)
    logs = "\n".join(text for _, text in results)
    assert all(code == 0 for code, _ in results), logs[-8000:]
    assert (run_dir / ".test_killed_at_3").is_file()
    assert "resuming from step 2" in logs, logs[-8000:]
    _same_run(run_dir, uninterrupted)


@pytest.mark.timeout(400)
def test_sigterm_checkpoints_on_every_rank_and_resumes(tiny_prepared_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "preempted"
    args = [*COMMON, f"data.path={tiny_prepared_data}", f"train.run_dir={run_dir}"]
    env = _env(tmp_path) | {"HALOTRON_TEST_SIGTERM_AT_STEP": "3"}
    ((code, text),) = _wait([_single(args, env)], timeout=240)
    assert "preempted: stopped after step 3" in text, text[-6000:]
    # The launcher exits as the ranks did (launch.agent): 0, no traceback (torchrun: 1).
    assert code == 0 and "Traceback" not in text, text[-6000:]
    assert "launch.agent: SIGTERM passed to the workers" in text
    for rank in range(2):  # every rank stopped after the same step and saved it
        assert _state(run_dir, rank)["step"] == 3
        assert len(_state(run_dir, rank)["progress"]["losses"]) == 3

    ((code, text),) = _wait([_single([*args, "--resume"], _env(tmp_path))], timeout=240)
    assert code == 0, text[-6000:]
    assert "resuming from step 3" in text
    _same_run(run_dir, uninterrupted)


def test_resume_modes_and_stop_flag(monkeypatch):
    """Single-process pieces: --resume values, the torchrun-restart default, the signal flag."""
    import os
    import signal

    from train.preemption import GracefulStop
    from train.run_setup import resume_mode

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert [resume_mode(v) for v in (False, True, "auto", "yes")] == ["no", "yes", "auto", "yes"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resume_mode(False) == "auto" and resume_mode("yes") == "yes"
    with pytest.raises(ValueError, match="--resume 'maybe'"):
        resume_mode("maybe")

    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, the process lives
        assert stop.agreed() and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_engine_choice_is_checked_at_load_time():
    from train.config import load_config
    from train.engine_choice import engine_kind

    with pytest.raises(ValueError, match="train.engine='zero' must be one of auto, local"):
        load_config(None, ["train.engine=zero"])
    with pytest.raises(ValueError, match="parallel.pp=2 with train.engine=deepspeed"):
        load_config(None, ["train.engine=deepspeed", "parallel.pp=2", "model.n_layers=2"])
    cfg = load_config(None, ["train.engine=local", "train.seq_len=256"])
    with pytest.raises(ValueError, match="train.engine=local runs one process"):
        engine_kind(cfg, world=2)
    auto = load_config(None, ["train.seq_len=256"])
    assert engine_kind(auto, 1) == "local" and engine_kind(auto, 2) == "megatron"
    ds = load_config(
        None, ["train.engine=deepspeed", "deepspeed.zero_stage=3", "deepspeed.config.x.y=2"]
    )
    assert engine_kind(ds, 1) == "deepspeed" and ds.deepspeed.config == {"x": {"y": 2}}
