"""Which engine a run uses and how it is built.

    kind = engine_kind(cfg, world)              # "local", "megatron" or "deepspeed"
    engine = build_engine(cfg, kind, layout, device)

Used by train.loop: `train.engine` auto means the single-process LocalEngine for one process
without parallel degrees and the Megatron-core engine otherwise. An engine that writes its own
checkpoint files (DeepSpeed's) puts them into `<checkpoint dir>/engine/step_N/`; the loop keeps
those directories in step with its own checkpoints (`prune_engine_checkpoints`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from model.registry import build_model
from model.sparse import sparse_attention
from train.config import Config
from train.engine import Engine, LocalEngine, engine_tag

__all__ = ["engine_kind", "build_engine", "prune_engine_checkpoints"]


def engine_kind(cfg: Config, world: int) -> str:
    """local, megatron or deepspeed: `train.engine`, with auto meaning local for one process
    without parallel degrees and megatron otherwise."""
    par = cfg.parallel
    parallel = world > 1 or any((d or 1) > 1 for d in (par.tp, par.pp, par.cp, par.dp))
    kind = cfg.train.engine
    if kind == "auto":
        return "megatron" if parallel else "local"
    if kind == "local" and parallel:
        raise ValueError(
            f"train.engine=local runs one process without parallelism, but the world size is "
            f"{world} with parallel (tp, pp, cp, dp) = ({par.tp}, {par.pp}, {par.cp}, {par.dp}); "
            "use train.engine=auto, megatron or deepspeed"
        )
    return kind


def build_engine(cfg: Config, kind: str, layout: Any, device: torch.device) -> Engine:
    targs = cfg.train
    if kind == "local":
        model = build_model(cfg.model, cfg.attention, sparse_attention, seed=targs.seed)
        return LocalEngine(model, cfg.optim, cfg.schedule, targs.steps, device)
    groups = layout.initialize(cfg.parallel.timeout_minutes)
    if kind == "deepspeed":
        from train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(
            cfg.model, cfg.attention, layout, groups, cfg.optim, cfg.schedule, cfg.deepspeed,
            micro_batches=targs.grad_accum, micro_batch_size=targs.micro_batch_size,
            total_steps=targs.steps, seed=targs.seed, device=device,
        )  # fmt: skip
    from train.megatron_engine import MegatronEngine

    return MegatronEngine(
        cfg.model, cfg.attention, layout, groups, cfg.optim, cfg.schedule,
        total_steps=targs.steps, seed=targs.seed, device=device,
    )  # fmt: skip


def prune_engine_checkpoints(engine_dir: Path, keep: list[int]) -> None:
    """Remove the engine's own checkpoints that no complete loop checkpoint names."""
    names = {engine_tag(s) for s in keep}
    for entry in engine_dir.glob("step_*") if engine_dir.is_dir() else []:
        if entry.name not in names:
            shutil.rmtree(entry, ignore_errors=True)
