"""Setting up a run before the loop starts: the launch, the resume mode, the data, the seeds.

    env = LaunchEnv.from_env()             # rank / world / local_rank of a torchrun launch
    mode = resume_mode(resume)             # one of RESUME_MODES ("auto" after a torchrun restart)
    manifest = check_data(cfg)             # the prepared data's manifest, checked against the model
    seed_everything(cfg.train.seed)
    state = rng_state(place)               # python, numpy, torch, CUDA and megatron-core's
    set_rng_state(state, place)            # tracker RNGs; the tracker only at the same place

Used by train.loop (and `python -m train` for RESUME_MODES).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.loader import check_train_shards
from data.prepare import read_manifest
from train.config import Config, device_refusal

__all__ = [
    "LaunchEnv", "RESUME_MODES", "check_data", "resolve_device", "resume_mode", "rng_state",
    "seed_everything", "set_rng_state",
]  # fmt: skip

log = logging.getLogger(__name__)

RESUME_MODES = ("no", "yes", "auto")
"""no: refuse a run directory that holds checkpoints; yes: continue from the newest one (warn
when there is none); auto: continue when there is one, else start (what torchrun restarts use).
"""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(place: str | None = None) -> dict[str, Any]:
    """This process's RNG states; `place` names where they belong (rank, world, layout)."""
    state: dict[str, Any] = {
        "place": place,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_rng_tracker()
    if tracker is not None and tracker.get_states():
        # name -> generator state of megatron-core's model-parallel tracker (seeded by the
        # Megatron engine on CUDA: model_parallel_cuda_manual_seed); cloned, since a later
        # fork() replaces the entries in place of copying them.
        state["megatron_tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any], place: str | None = None) -> None:
    """Restores `state` (of rng_state). megatron-core's tracker only at the `place` that saved
    it: its model-parallel state belongs to one tp rank of one layout, so elsewhere the tracker
    keeps the engine's seeding."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state and state.get("place") != place:
        log.info("another layout: megatron's RNG tracker keeps this run's seeding")
    elif "megatron_tracker" in state:
        megatron_tracker = _megatron_rng_tracker()
        if megatron_tracker is None:
            raise RuntimeError(
                "the checkpoint holds megatron-core's model-parallel RNG tracker states but "
                "megatron-core is not importable here; install it (pip install -e '.[dev]')"
            )
        megatron_tracker.reset()
        megatron_tracker.set_states({k: v.clone() for k, v in state["megatron_tracker"].items()})


def _megatron_rng_tracker() -> Any:
    """megatron-core's CUDA RNG tracker, or None where megatron-core is not installed."""
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except ImportError:
        return None
    return get_cuda_rng_tracker()


@dataclass
class LaunchEnv:
    """This process's place in a torchrun / deepspeed launch (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> LaunchEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and "MASTER_ADDR" not in os.environ:
            raise ValueError(
                f"WORLD_SIZE={world} but MASTER_ADDR is not set: start multi-process runs with "
                "torchrun (e.g. torchrun --nproc-per-node 4 -m train --config ...)"
            )
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def resume_mode(resume: bool | str) -> str:
    """One of RESUME_MODES; under a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) "no"
    becomes "auto", so that a restarted job continues from its last checkpoint."""
    mode = {True: "yes", False: "no"}.get(resume, resume) if isinstance(resume, bool) else resume
    if mode not in RESUME_MODES:
        raise ValueError(f"--resume {mode!r} must be one of {', '.join(RESUME_MODES)}")
    if mode == "no" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return "auto"
    return mode


def check_data(cfg: Config) -> dict[str, Any]:
    """The prepared data's manifest, after checking that the configured train shards can exist
    and that its tokenizer fits model.vocab_size."""
    path = Path(cfg.data.path)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(
            f"no prepared data in {path} (manifest.json is missing); prepare it first with:\n"
            f"    python -m data.prepare --out {path} --vocab-size {cfg.model.vocab_size}"
        )
    check_train_shards(cfg.data)  # before the model is built (the stream checks it too)
    manifest = read_manifest(path)
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"of {vocab} ({path}/manifest.json); set model.vocab_size={vocab} or re-prepare "
            f"the data with --vocab-size {cfg.model.vocab_size}"
        )
    return manifest


def resolve_device(name: str) -> torch.device:
    """train.device as a torch.device; a CUDA device this torch cannot use is refused with
    one sentence (before any process group: the Trainer resolves it first)."""
    if (reason := device_refusal(name)) is not None:
        raise ValueError(reason)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
