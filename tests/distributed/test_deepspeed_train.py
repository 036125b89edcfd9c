"""`python -m train` with train.engine=deepspeed under real launchers, and its exact resume.

- ZeRO-3 with context parallelism (cp=2) on 2 ranks (torchrun, started through
  `python -m launch torchrun --run`), 4 steps of 2 accumulated micro-batches, checkpointing
  DeepSpeed's way (its engine state_dict writes checkpoints/engine/step_N/) next to the loop's
  per-rank files; then 2 steps, a new set of processes resuming (engine.load_state_dict) for 2
  more: losses and final fp32 parameters (zero_to_fp32) equal the uninterrupted run's.
- ZeRO-1 with Megatron tensor parallelism, TP2 x DP2 on 4 ranks, the same way: DeepSpeed writes
  one model-states file per tp rank and one optimizer shard per (dp, tp) rank; the resumed
  run's losses and every tensor of its final DeepSpeed checkpoint (weights, fp32 partitions,
  AdamW moments) equal the uninterrupted run's (zero_to_fp32 does not join tp shards).
- The deepspeed launcher with a localhost hostfile (`python -m launch deepspeed --run`): for a
  hostfile of one host it starts the ranks locally through deepspeed.launcher.launch (no ssh;
  --no_ssh_check skips its ssh probe of the host).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from parallel.local_ranks import free_port
from tests.distributed.test_torchrun_train import _run
from tests.unit.test_train import TINY

STEPS = 4
DS = [
    *TINY, "train.engine=deepspeed", "train.grad_accum=2", "train.eval_every=0",
    "checkpoint.every=2", "checkpoint.keep_last=3", f"schedule.decay_steps={STEPS}",
]  # fmt: skip


def _launch(args: list[str], tmp_path: Path, timeout: int = 240) -> str:
    return _run([sys.executable, "-m", "launch", *args], tmp_path, timeout)


def _state(run_dir: Path, step: int | None = None) -> dict:
    ckpt = run_dir / "checkpoints"
    name = (ckpt / "latest").read_text().strip() if step is None else f"step_{step:06d}"
    return torch.load(ckpt / name / "state_rank00000.pt", weights_only=False)


def _params(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The fp32 parameters of DeepSpeed's checkpoint, gathered from the ZeRO partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine_dir = run_dir / "checkpoints" / "engine"
    return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=f"step_{step:06d}")


def _engine_files(run_dir: Path, step: int) -> list[str]:
    return sorted(
        p.name for p in (run_dir / "checkpoints" / "engine" / f"step_{step:06d}").iterdir()
    )


def _tensors(obj: object, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a loaded checkpoint (nested dicts / lists), keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else []
    )
    return {k: v for key, value in items for k, v in _tensors(value, f"{path}/{key}").items()}


def _run_and_resume(common: list[str], nproc: int, tmp_path: Path) -> tuple[Path, Path, str]:
    """An uninterrupted run of STEPS steps and one stopped after STEPS // 2 and resumed by new
    processes to STEPS, under torchrun; their run directories and the first run's output. The
    resumed run's losses must equal the uninterrupted run's."""
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun = ["torchrun", "--run", "--nproc-per-node", str(nproc), "--", *common]
    out = _launch([*torchrun, f"train.run_dir={full}", f"train.steps={STEPS}"], tmp_path)
    _launch([*torchrun, f"train.run_dir={split}", f"train.steps={STEPS // 2}"], tmp_path)
    resumed = _launch(
        [*torchrun, f"train.run_dir={split}", f"train.steps={STEPS}", "--resume"], tmp_path
    )
    assert f"resuming from step {STEPS // 2}" in resumed
    want, got = _state(full)["progress"]["losses"], _state(split)["progress"]["losses"]
    assert len(got) == STEPS and got == pytest.approx(want, abs=1e-6), (got, want)
    return full, split, out


@pytest.mark.slow  # ZeRO-3 x cp2 parity and the torchrun resume (ZeRO-1) are in make test
@pytest.mark.timeout(400)
def test_deepspeed_zero3_cp2_torchrun_resumes_exactly(tiny_prepared_data, tmp_path):
    common = [*DS, "deepspeed.zero_stage=3", "parallel.cp=2", f"data.path={tiny_prepared_data}"]
    full, split, out = _run_and_resume(common, 2, tmp_path)
    assert "deepspeed engine, layout tp=1 pp=1 cp=2 dp=1" in out
    assert _state(full)["engine"]["zero_stage"] == 3
    assert [f for f in _engine_files(full, STEPS) if f.endswith("optim_states.pt")] == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)
    ]  # one ZeRO partition per rank
    want_params, got_params = _params(full, STEPS), _params(split, STEPS)
    assert set(want_params) == set(got_params) and "embed.weight" in want_params
    for name, value in want_params.items():
        assert torch.allclose(got_params[name], value, atol=1e-6, rtol=0), name


@pytest.mark.timeout(600)
def test_deepspeed_zero1_tp2xdp2_torchrun_resumes_exactly(tiny_prepared_data, tmp_path):
    common = [*DS, "deepspeed.zero_stage=1", "parallel.tp=2", f"data.path={tiny_prepared_data}"]
    full, split, out = _run_and_resume(common, 4, tmp_path)
    assert "deepspeed engine, layout tp=2 pp=1 cp=1 dp=2" in out
    files = _engine_files(full, STEPS)
    assert files == _engine_files(split, STEPS) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
        *(f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in range(2) for t in range(2)),
    ]  # fmt: skip
    for name in files:
        want, got = (
            _tensors(torch.load(run / "checkpoints" / "engine" / f"step_{STEPS:06d}" / name,
                                map_location="cpu", weights_only=False))
            for run in (full, split)
        )  # fmt: skip
        assert want and set(got) == set(want), name
        if name.startswith("mp_rank"):  # this tp rank's weights, e.g. its vocab shard
            assert any(k.endswith("embed.weight") for k in want), sorted(want)
        for key, value in want.items():
            assert torch.allclose(got[key], value, atol=1e-6, rtol=0), (name, key)


@pytest.mark.timeout(300)
def test_deepspeed_launcher_with_localhost_hostfile(tiny_prepared_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "ds"
    out = _launch(
        ["deepspeed", "--run", "--hostfile", str(hostfile), "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "--no-ssh-check", "--",
         *DS, "deepspeed.zero_stage=1", f"data.path={tiny_prepared_data}",
         f"train.run_dir={run_dir}", "train.steps=2"], tmp_path,
    )  # fmt: skip
    assert "deepspeed engine, layout tp=1 pp=1 cp=1 dp=2" in out
    state = _state(run_dir)
    assert state["step"] == 2 and len(state["progress"]["losses"]) == 2
    assert (run_dir / "checkpoints" / "step_000002" / "state_rank00001.pt").is_file()
