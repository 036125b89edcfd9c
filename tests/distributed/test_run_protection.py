"""Multi-rank run protection and metrics: NaN skips agreed by every pipeline stage, the
context-parallel traffic the trainer logs, and a hung peer's timeout naming its group.

    python -m pytest -q tests/distributed/test_run_protection.py

Two gloo ranks. `_ranks_case` runs in spawned ranks: the Megatron engine with pp=2, where only
the last stage sees the (NaN) loss, then the whole trainer (train.loop.train) with cp=2 writing
an offline wandb run whose comm/halo_bytes must equal the plan's prediction. The hang case
launches `torchrun -m train` with a short parallel.timeout_minutes and one rank asleep.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from parallel.local_ranks import free_port
from tests.distributed.harness import run_ranks, run_session
from tests.nested import same_nested
from tests.unit.test_train import TINY

NAN_STEP = 2  # 1-based step whose loss the engine poisons (HALOTRON_TEST_NAN_AT_STEPS)


def _snapshot(engine) -> dict:
    params = {k: v.detach().clone() for k, v in engine.stage.state_dict().items() if v is not None}
    # AdamW's moments and step counts (param_groups hold the scheduled lr, which moves on).
    optim = [opt.state_dict()["state"] for opt in engine._torch_optimizers()]
    return {"params": params, "optim": _clone(optim)}


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clone(v) for v in value]
    return value


def _pp2_nan_step(rank: int, world: int) -> dict:
    from parallel.layout import Layout
    from tests.distributed.megatron_cases import OPTIM, SCHEDULE, Case, batches
    from train.megatron_engine import MegatronEngine

    case = Case(n_layers=2, micro_batches=2)
    layout = Layout(pp=2)
    groups = layout.initialize()
    try:
        engine = MegatronEngine(
            case.model_args(), case.attn_cfg(), layout, groups, OPTIM, SCHEDULE, total_steps=4
        )
        stats = [engine.train_step(batches(case, 0), 0)]
        before = _snapshot(engine)
        stats.append(engine.train_step(batches(case, 1), 1))  # poisoned on the last stage
        skipped = _snapshot(engine)
        stats.append(engine.train_step(batches(case, 2), 2))
        after = _snapshot(engine)
    finally:
        layout.destroy()
    return {
        "skipped": [s.skipped for s in stats],
        "losses": [s.loss for s in stats],
        "unchanged": same_nested(before["params"], skipped["params"]),
        "optim_unchanged": same_nested(before["optim"], skipped["optim"]),
        "changed_after": not same_nested(skipped["params"], after["params"]),
        "finite_after": all(torch.isfinite(t).all().item() for t in after["params"].values()),
        "is_last_stage": groups.is_last_stage,
    }


def _cp2_train(rank: int, world: int, overrides: list[str]) -> dict | None:
    from parallel.show import forward_bytes
    from tests.unit.test_train import _wandb_file
    from tests.unit.wandb_history import wandb_history
    from train.config import load_config
    from train.loop import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    cfg = load_config(None, overrides)
    train(cfg)
    if rank != 0:
        return None
    rows = wandb_history(_wandb_file(Path(cfg.train.run_dir)), last_step=cfg.train.steps)
    m, a, t = cfg.model, cfg.attention, cfg.train
    # Rank 0 sends its halo forward and, backward, the gradients of the halo it received.
    sent = [
        forward_bytes(a, t.seq_len, world, r, m.n_heads, m.head_dim, batch=t.micro_batch_size)
        for r in range(world)
    ]
    per_layer = sent[0]["halo"] + sent[1]["halo"]  # two ranks: all of rank 1's halo is for 0
    predicted = per_layer * m.n_layers * t.grad_accum
    return {"rows": [r for r in rows if "train/loss" in r], "halo_predicted": predicted}


def _ranks_case(rank: int, world: int, overrides: list[str]) -> dict:
    os.environ["HALOTRON_TEST_NAN_AT_STEPS"] = str(NAN_STEP)
    nan = _pp2_nan_step(rank, world)
    del os.environ["HALOTRON_TEST_NAN_AT_STEPS"]
    return {"nan": nan, "cp2": _cp2_train(rank, world, overrides)}


@pytest.mark.timeout(300)
def test_nan_skip_on_every_stage_and_cp_traffic_metrics(tiny_prepared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    overrides = [
        *TINY, f"data.path={tiny_prepared_data}", f"train.run_dir={tmp_path / 'cp2'}",
        "parallel.cp=2", "train.steps=2", "logging.log_every=1", "train.eval_batches=1",
        "logging.pattern_picture=false", "attention.random_pool_blocks=4",
    ]  # fmt: skip
    results = run_ranks(_ranks_case, world=2, out_dir=tmp_path, args=(overrides,), timeout=240)

    # pp=2: the loss exists on the last stage only, yet both stages skip the same step and
    # neither changes its parameters or AdamW state; the next step trains again.
    for res in (r["nan"] for r in results):
        assert res["skipped"] == [False, True, False], res
        assert res["unchanged"] and res["optim_unchanged"], res
        assert res["changed_after"] and res["finite_after"], res
    assert sorted(r["nan"]["is_last_stage"] for r in results) == [False, True]

    cp2 = results[0]["cp2"]
    assert [row["_step"] for row in cp2["rows"]] == [1, 2]
    for row in cp2["rows"]:
        assert row["comm/halo_bytes"] == cp2["halo_predicted"] > 0
        assert row["comm/global_bytes"] > 0
        assert row["comm/pool_bytes"] > 0 and row["comm/random_bytes"] == 0  # pooled draw
        assert row["comm/halo_s"] >= 0 and row["comm/global_s"] > 0
        assert row["perf/mfu"] > 0
        parts = sum(row[f"time/{p}"] for p in ("data_s", "fwd_bwd_s", "optimizer_s"))
        assert parts <= row["time/step_s"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.update(HALOTRON_TEST_HANG_AT_STEP="2", HALOTRON_TEST_HANG_SECONDS="8")
    return env


@pytest.mark.timeout(180)
def test_a_hung_peer_fails_with_the_name_of_the_group(tiny_prepared_data, tmp_path):
    """Rank 1 sleeps before step 2; rank 0 waits for it in the step's first collective (the
    token count over the data x context ranks, train.engine.Engine.count_tokens) and, after
    parallel.timeout_minutes (3 s), fails naming that group and the step."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "train",
        *TINY, f"data.path={tiny_prepared_data}", f"train.run_dir={tmp_path / 'run'}",
        "parallel.cp=2", "train.steps=3", "parallel.timeout_minutes=0.05",
    ]  # fmt: skip
    code, stdout, stderr = run_session(cmd, _env(tmp_path), timeout=150)
    out = stdout + stderr
    assert code != 0, out[-3000:]
    group = "dp_cp group (DATA_PARALLEL_GROUP_WITH_CP, global ranks [0, 1])"
    assert f"rank 0: a collective on the {group}" in out, out[-6000:]
    assert "failed during step 2" in out and "parallel.timeout_minutes=0.05" in out


@pytest.mark.timeout(240)
def test_every_rank_stopped_for_a_dead_peer_names_the_group_and_step(tiny_prepared_data, tmp_path):
    """tp=2 x dp=2 under torchrun; rank 3 SIGKILLs itself after step 3 (a lost node) and torchrun
    stops the others (SIGTERM, then SIGKILL). Each of ranks 0-2 says in its own log in which
    group and step it was stopped: its collective failed first, or the launcher's signal came
    while it waited in one. (Before, a rank whose SIGTERM came during its cleanup said
    nothing.)"""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--tee", "3",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "train",
        *TINY, f"data.path={tiny_prepared_data}", f"train.run_dir={tmp_path / 'run'}",
        "parallel.tp=2", "train.steps=5", "train.eval_every=0",
    ]  # fmt: skip
    env = _env(tmp_path) | {"HALOTRON_TEST_KILL_AT_STEP": "3"}
    code, stdout, stderr = run_session(cmd, env, timeout=200)
    out = stdout + stderr
    assert code != 0 and "rank 3 kills itself" in out, out[-3000:]
    group = r"a collective on the \w+ group \([^)]*global ranks \[[\d, ]+\]\)"
    for rank in range(3):
        said = re.compile(
            rf"rank {rank}: ({group} failed during step 3|SIGTERM received while waiting in "
            rf"{group} in step 3)"
        )
        lines = [line for line in out.splitlines() if line.startswith(f"[default{rank}]:")]
        assert any(said.search(line) for line in lines), "\n".join(lines[-15:])


def _deepspeed_nan_step(rank: int, world: int, stages: list[int]) -> list[dict]:
    os.environ["HALOTRON_TEST_NAN_AT_STEPS"] = str(NAN_STEP)
    os.environ.setdefault("LOCAL_RANK", str(rank))  # DeepSpeed asserts a launcher set it
    from parallel.layout import Layout
    from tests.distributed.megatron_cases import OPTIM, SCHEDULE, Case, batches
    from train.deepspeed_config import DeepSpeedArgs
    from train.deepspeed_engine import DeepSpeedEngine

    case = Case(n_layers=2, micro_batches=2)
    out = []
    for stage in stages:
        layout = Layout(dp=2)
        groups = layout.initialize()
        try:
            engine = DeepSpeedEngine(
                case.model_args(), case.attn_cfg(), layout, groups, OPTIM, SCHEDULE,
                DeepSpeedArgs(zero_stage=stage), micro_batches=1, micro_batch_size=1,
                total_steps=4,
            )  # fmt: skip
            params, stats = [], []
            for step in range(3):
                stats.append(engine.train_step([batches(case, step)[rank]], step))
                params.append(engine.full_parameters())
        finally:
            layout.destroy()
        out.append(
            {
                "skipped": [s.skipped for s in stats],
                "unchanged": same_nested(params[0], params[1]),
                "finite_after": all(torch.isfinite(t).all().item() for t in params[2].values()),
                "deepspeed_skipped": engine.ds.skipped_steps,
            }
        )
    return out


@pytest.mark.timeout(240)
def test_deepspeed_skips_a_nan_step(tmp_path):
    """ZeRO 1 skips through DeepSpeed's own overflow check (its skipped_steps counts it); ZeRO 3
    checks only fp16 overflows, so the engine suppresses the optimizer step itself."""
    results = run_ranks(_deepspeed_nan_step, world=2, out_dir=tmp_path, args=([1, 3],), timeout=200)
    for per_rank in results:
        zero1, zero3 = per_rank
        for res in per_rank:
            assert res["skipped"] == [False, True, False], res
            assert res["unchanged"] and res["finite_after"], res
        assert zero1["deepspeed_skipped"] == 1 and zero3["deepspeed_skipped"] == 0
