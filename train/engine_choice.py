"""Which engine a run uses, how it is built, and engines that checkpoint themselves.

    kind = engine_kind(cfg, world)              # "local", "megatron" or "deepspeed"
    engine = build_engine(cfg, kind, layout, device)
    if isinstance(engine, ExternalCheckpoint): engine.save_checkpoint(directory, tag)

Used by train.loop: `train.engine` auto means the single-process LocalEngine for one process
without parallel degrees and the Megatron-core engine otherwise; the DeepSpeed engine writes its
own checkpoint (DeepSpeed's files) into `<checkpoint dir>/engine/step_N/`, and the loop keeps
those directories in step with its own checkpoints (`prune_engine_checkpoints`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from model.sparse import sparse_attention
from model.transformer import Transformer
from train.config import Config
from train.engine import Engine, LocalEngine

__all__ = [
    "engine_kind", "build_engine", "ExternalCheckpoint", "engine_tag", "prune_engine_checkpoints",
]  # fmt: skip


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


@runtime_checkable
class ExternalCheckpoint(Protocol):
    """An engine that writes its tensors with its own checkpointing (DeepSpeed's) into a
    directory the loop names, rather than through state_dict."""

    def save_checkpoint(self, directory: str | os.PathLike, tag: str) -> None: ...

    def load_checkpoint(self, directory: str | os.PathLike, tag: str) -> None: ...


def build_engine(cfg: Config, kind: str, layout: Any, device: torch.device) -> Engine:
    targs = cfg.train
    if kind == "local":
        model = Transformer(
            cfg.model, cfg.attention, attention_fn=sparse_attention, seed=targs.seed
        )
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


def engine_tag(step: int) -> str:
    return f"step_{step:06d}"


def prune_engine_checkpoints(engine_dir: Path, keep: list[int]) -> None:
    """Remove the engine's own checkpoints that no complete loop checkpoint names."""
    names = {engine_tag(s) for s in keep}
    for entry in engine_dir.glob("step_*") if engine_dir.is_dir() else []:
        if entry.name not in names:
            shutil.rmtree(entry, ignore_errors=True)
