"""Read a checkpoint's engine tensors in model space (train.model_space) in one process.

    tensors = model_space(run_dir / "checkpoints" / "step_000004")
    tensors["model.embed.weight"], tensors["optim.exp_avg.embed.weight"], ...

Every engine but DeepSpeed's writes them (torch.distributed.checkpoint, `engine.tensors/`),
so tests compare runs of any engine and layout by these names.
"""

from __future__ import annotations

from pathlib import Path

import torch


def model_space(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor (parameters and AdamW moments) of the checkpoint in `step_dir`, whole."""
    from train.sharded_state import ShardedStateRef

    path = step_dir / "engine.tensors"
    return ShardedStateRef(path.name, path).read_whole()
