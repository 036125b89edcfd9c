"""Crash-safe checkpoints: one directory per step, committed by an atomic rename.

    manager = CheckpointManager(CheckpointArgs(every=100, keep_last=2), run_dir="runs/demo")
    manager.save(step, state, config)     # -> runs/demo/checkpoints/step_000100/
    state = manager.load_latest(config)   # newest complete checkpoint, or None

Layout under `dir` (default `<run_dir>/checkpoints`):

    step_000100/state.pt     a complete checkpoint of a one-process run
    step_000100/state_rank00003.pt   ... of rank 3 of a multi-process run (one file per rank),
    step_000100/meta.json    with the world size that wrote it
    step_000200.tmp/         being written (or left by a crash): never loaded, removed later
    latest                   "step_000200", replaced atomically after the rename

A checkpoint is written into `step_N.tmp/` (every rank its file, flushed), then, after every
rank has finished (a barrier), rank 0 renames it to `step_N/`; only then is `latest` replaced
(tmp file + rename). A kill at any point leaves either the previous complete checkpoint or the
new one, never a half-written directory that `load_latest` would pick.
The state is a plain `torch.save` dict for this slice; issue 7 moves to sharded
dist_checkpointing behind this same class.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointArgs", "CheckpointManager", "STATE_VERSION"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STATE_FILE = "state.pt"
_META_FILE = "meta.json"


def _no_barrier() -> None:
    pass


@dataclass
class CheckpointArgs:
    """Where and how often to checkpoint."""

    dir: str | None = None
    """Checkpoint directory; null means `<train.run_dir>/checkpoints`."""
    every: int = 0
    """Save every this many steps (0: only at the end of training)."""
    keep_last: int = 2
    """Complete checkpoints to keep, oldest deleted first (0: keep all)."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every!r} must be >= 0 (0 = only at end)")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last!r} must be >= 0 (0 = all)")


class CheckpointManager:
    """Saves, finds and loads whole-run checkpoints of one single-process run."""

    def __init__(
        self,
        args: CheckpointArgs,
        run_dir: str | os.PathLike,
        rank: int = 0,
        world: int = 1,
        barrier=_no_barrier,
    ) -> None:
        """rank/world/barrier: a multi-process run; every rank calls save and load_latest with
        its own state, `barrier` is a collective over all of them (dist.barrier)."""
        self.args = args
        self.dir = Path(args.dir) if args.dir else Path(run_dir) / "checkpoints"
        self.rank, self.world, self.barrier = rank, world, barrier
        self.state_file = _STATE_FILE if world == 1 else f"state_rank{rank:05d}.pt"

    def should_save(self, step: int) -> bool:
        return self.args.every > 0 and step % self.args.every == 0

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending (`.tmp` directories are ignored)."""
        if not self.dir.is_dir():
            return []
        steps = []
        for entry in self.dir.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and ((entry / _META_FILE).is_file() or (entry / _STATE_FILE).is_file()):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def path_of(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}"

    def save(self, step: int, state: dict[str, Any], config: dict[str, Any]) -> Path:
        """Write `state` (plus version, step and the resolved config) as checkpoint `step`."""
        final = self.path_of(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_partial()
            tmp.mkdir()
        self.barrier()  # the directory exists for every rank
        payload = {**state, "version": STATE_VERSION, "step": step, "config": config}
        try:
            with open(tmp / self.state_file, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(
                f"cannot write checkpoint {tmp / self.state_file}: {e.strerror or e} "
                "(disk full or no permission?); the previous checkpoint is untouched"
            ) from e
        self.barrier()  # every rank's file is on disk
        if self.rank == 0:
            (tmp / _META_FILE).write_text(json.dumps({"step": step, "world": self.world}))
            if final.exists():  # re-saving a step (a resumed run that ends where it started)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._write_latest(final.name)
            self._apply_retention()
            log.info("saved checkpoint %s", final)
        self.barrier()  # nobody looks for the checkpoint before it is committed
        return final

    def load_latest(self, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The newest complete checkpoint's state, or None when there is none. With `config`,
        refuse (ValueError) a checkpoint written for a different model."""
        steps = self.complete_steps()
        if not steps:
            return None
        meta_path = self.path_of(steps[-1]) / _META_FILE
        if meta_path.is_file():
            world = json.loads(meta_path.read_text())["world"]
            if world != self.world:
                raise ValueError(
                    f"checkpoint {meta_path.parent} was written by {world} processes; this run "
                    f"has {self.world} (resuming under another world size is not supported yet)"
                )
        path = self.path_of(steps[-1]) / self.state_file
        # weights_only=False: the state holds RNG states and the config, and is our own file.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"checkpoint {path} has state version {state.get('version')!r}; this code reads "
                f"version {STATE_VERSION}"
            )
        if config is not None:
            check_compatible(state["config"], config, str(path))
        log.info("loaded checkpoint %s (step %d)", path.parent, state["step"])
        return state

    def _write_latest(self, name: str) -> None:
        tmp = self.dir / "latest.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.dir / "latest")

    def _remove_partial(self) -> None:
        # One writer per run: any .tmp directory left now is from a killed save.
        for entry in self.dir.glob("step_*.tmp"):
            shutil.rmtree(entry, ignore_errors=True)

    def _apply_retention(self) -> None:
        if self.args.keep_last == 0:
            return
        for step in self.complete_steps()[: -self.args.keep_last]:
            shutil.rmtree(self.path_of(step), ignore_errors=True)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose model differs; warn about other changed settings."""
    # Switches that change memory or speed but not the math may differ on resume.
    free = {"recompute"}
    saved_model = {k: v for k, v in saved.get("model", {}).items() if k not in free}
    current_model = {k: v for k, v in current.get("model", {}).items() if k not in free}
    diffs = [
        f"model.{key}={saved_model.get(key)!r} (config: {current_model.get(key)!r})"
        for key in sorted(set(saved_model) | set(current_model))
        if saved_model.get(key) != current_model.get(key)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {where} was written for a different model: {'; '.join(diffs)}; resume "
            "with the model settings it was written with, or start a new run_dir"
        )
    for section in ("attention", "train", "data"):
        old, new = saved.get(section, {}), current.get(section, {})
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            log.warning(
                "resuming with changed settings: %s",
                ", ".join(f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed),
            )
