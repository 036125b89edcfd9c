"""Crash-safe checkpoints: one directory per step, committed by an atomic rename.

    manager = CheckpointManager(CheckpointArgs(every=100, keep_last=2), run_dir="runs/demo")
    manager.save(step, state, config)     # -> runs/demo/checkpoints/step_000100/
    state = manager.load_latest(config)   # newest complete checkpoint, or None

Layout under `dir` (default `<run_dir>/checkpoints`):

    step_000100/state.pt     a complete checkpoint of a one-process run
    step_000100/state_rank00003.pt   ... of rank 3 of a multi-process run (one file per rank)
    step_000100/engine.tensors/      a `ShardedState` of the state (torch.distributed.checkpoint)
    step_000100/meta.json    with the world size that wrote it and whether it reshards
    step_000200.tmp/         being written (or left by a crash): never loaded, removed later
    latest                   "step_000200", replaced atomically after the rename

A checkpoint is written into `step_N.tmp/` (every rank its file, flushed), then, after every
rank has finished (a barrier), rank 0 renames it to `step_N/`; only then is `latest` replaced
(tmp file + rename). A kill at any point leaves either the previous complete checkpoint or the
new one, never a half-written directory that `load_latest` would pick. A write that fails (a
full disk: torch's zip writer hides ENOSPC in a RuntimeError) removes `step_N.tmp/` and raises
an OSError whose one sentence names the checkpoint, the free space and the cause.

Async save (`checkpoint.async_save`, docs/checkpoints.md): `save` copies the ShardedState's
pieces to CPU memory, writes the per-rank files, and returns while DCP writes the tensors from
a background thread (its collectives on a gloo group of their own). The checkpoint stays
`step_N.tmp/` until the next `save` or `finalize` (both collective, called by the loop between
steps) has waited for every rank's write; then it is committed as above.

Resharding (docs/checkpoints.md): a `ShardedState` value anywhere in the state (train/
sharded_state.py: the Megatron engine's parameters and AdamW state, in the single-process
model's names and unpadded shapes) is written with torch.distributed.checkpoint (DCP) into its
own directory and comes back from `load_latest` as a `ShardedStateRef`, which fills any other
layout's pieces. A checkpoint with
one is `reshardable`: it loads under another world size (the run's other state then comes from
rank 0's file, and `data_state_for` re-splits the data streams). Other checkpoints (one process,
DeepSpeed's engine) still resume only under the world size that wrote them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.sharded_state import replace_sharded, sharded_values

__all__ = [
    "CheckpointArgs", "CheckpointManager", "STATE_VERSION", "check_compatible", "read_meta",
    "step_dir_of",
]  # fmt: skip

log = logging.getLogger(__name__)

STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STATE_FILE = "state.pt"
_META_FILE = "meta.json"


def _no_barrier() -> None:
    pass


def _state_file(rank: int, world: int) -> str:
    return _STATE_FILE if world == 1 else f"state_rank{rank:05d}.pt"


@dataclass
class CheckpointArgs:
    """Where and how often to checkpoint."""

    dir: str | None = None
    """Checkpoint directory; null means `<train.run_dir>/checkpoints`."""
    every: int = 0
    """Save every this many steps (0: only at the end of training)."""
    keep_last: int = 2
    """Complete checkpoints to keep, oldest deleted first (0: keep all)."""
    async_save: bool = False
    """Write the Megatron engine's sharded tensors in the background (DCP's async_save): a save
    blocks only to copy them to CPU memory, and the checkpoint is committed at the next save or
    at the end of the run. Engines without sharded tensors (LocalEngine, DeepSpeed) save
    synchronously, with a note in the log (docs/checkpoints.md)."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every!r} must be >= 0 (0 = only at end)")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last!r} must be >= 0 (0 = all)")
        if not isinstance(self.async_save, bool):
            raise ValueError(f"checkpoint.async_save={self.async_save!r} must be true or false")


@dataclass
class _Pending:
    """A checkpoint whose tensors are being written in the background (`step_N.tmp/`)."""

    step: int
    tmp: Path
    info: dict[str, Any]
    """Its meta.json."""
    writes: list[tuple[Path, Future]]
    """(DCP directory, the background write's future)."""
    blocked_s: float
    """Seconds the save blocked the loop (copying to CPU memory, the per-rank files)."""
    started: float
    """time.perf_counter() when the writes were handed to DCP."""
    finished: list[float] = field(default_factory=list)
    """time.perf_counter() when each write finished (set from the writer thread)."""


def read_meta(step_dir: Path) -> dict[str, Any]:
    """meta.json of a complete step directory ({} for a one-process checkpoint without it)."""
    path = step_dir / _META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class CheckpointManager:
    """Saves, finds and loads whole-run checkpoints of a run of `world` processes."""

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
        self.state_file = _state_file(rank, world)
        self._pending: _Pending | None = None
        self._async_group: Any = None
        self._noted_sync = False

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

    def newest_meta(self) -> dict[str, Any] | None:
        """meta.json of the newest complete checkpoint (None when there is none)."""
        steps = self.complete_steps()
        return read_meta(self.path_of(steps[-1])) if steps else None

    def saved_engine(self) -> str | None:
        """The engine that wrote the newest complete checkpoint, when it says."""
        meta = self.newest_meta()
        return None if meta is None else meta.get("engine")

    def save(
        self,
        step: int,
        state: dict[str, Any],
        config: dict[str, Any],
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write `state` (plus version, step and the resolved config) as checkpoint `step` and
        return its directory; `meta` (rank 0's) goes into meta.json. Every ShardedState in
        `state` is written with DCP (collectively), the rest into this rank's file. With
        checkpoint.async_save, the ShardedStates are written in the background and the
        checkpoint is committed by the next save or `finalize` (it is `step_N.tmp/` until
        then); this call first commits the previous one."""
        self._commit_pending()
        t0 = time.perf_counter()
        final = self.path_of(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_partial()
            tmp.mkdir()
        self.barrier()  # the directory exists for every rank
        payload = {**state, "version": STATE_VERSION, "step": step, "config": config}
        sharded = sharded_values(payload)
        background = self.args.async_save and bool(sharded)
        if self.args.async_save and not sharded and not self._noted_sync:
            self._noted_sync = True
            log.info(
                "checkpoint.async_save=true: the %s engine's checkpoints have no sharded "
                "tensors (only train.engine=megatron's do); saving synchronously",
                (meta or {}).get("engine", "this"),
            )
        if background and self._async_group is None and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo")  # collective: every rank is here
        payload = replace_sharded(payload)
        writes = []
        target = tmp
        t_write = time.perf_counter()
        try:
            for name, holder, key in sharded:
                target = tmp / name
                if background:
                    writes.append((target, holder[key].save_async(target, self._async_group)))
                else:
                    holder[key].save(target)
            target = tmp / self.state_file
            with open(target, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if (error := _failed_write(target, tmp, e)) is None:
                raise
            raise error from e
        info = {"step": step, "world": self.world, "reshardable": bool(sharded), **(meta or {})}
        if background:
            pending = _Pending(step, tmp, info, writes, 0.0, t_write)
            for _, future in writes:
                future.add_done_callback(lambda _: pending.finished.append(time.perf_counter()))
            pending.blocked_s = time.perf_counter() - t0
            self._pending = pending
            return final
        self._commit(step, tmp, info)
        if self.rank == 0:
            log.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - t0)
        return final

    def finalize(self) -> None:
        """Commit the checkpoint being written in the background, if any, and release the
        background writer's process group. Collective: every rank calls it at the same point
        (the loop: at the end of training, after a preemption's save, before a NaN stop)."""
        self._commit_pending()
        if self._async_group is not None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None

    def _commit_pending(self) -> None:
        """Wait for this rank's background writes, then commit (collective)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        t0 = time.perf_counter()
        for target, future in pending.writes:
            try:
                future.result()
            except BaseException as e:
                if (error := _failed_write(target, pending.tmp, e)) is None:
                    raise
                raise error from e
        waited_s = time.perf_counter() - t0
        # A future's callbacks run just after result() returns: a missing time is about now.
        finished = max(pending.finished, default=time.perf_counter())
        final = self._commit(pending.step, pending.tmp, pending.info)
        if self.rank == 0:
            log.info(
                "saved checkpoint %s: save() blocked %.2f s, the tensors were written in the "
                "background in %.2f s (the commit waited %.2f s for them)",
                final, pending.blocked_s, finished - pending.started, waited_s,
            )  # fmt: skip

    def _commit(self, step: int, tmp: Path, info: dict[str, Any]) -> Path:
        """Every rank's files are written: rank 0 renames `tmp` and points `latest` at it."""
        final = self.path_of(step)
        self.barrier()  # every rank's files are on disk
        if self.rank == 0:
            (tmp / _META_FILE).write_text(json.dumps(info))
            if final.exists():  # re-saving a step (a resumed run that ends where it started)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._write_latest(final.name)
            self._apply_retention()
        self.barrier()  # nobody looks for the checkpoint before it is committed
        return final

    def load_latest(self, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The newest complete checkpoint's state, or None when there is none. With `config`,
        refuse (ValueError) a checkpoint written for a different model. Under another world
        size only a reshardable checkpoint loads (rank 0's file; `saved_world` tells)."""
        steps = self.complete_steps()
        if not steps:
            return None
        step_dir = self.path_of(steps[-1])
        meta = read_meta(step_dir)
        world = meta.get("world", 1)
        path = step_dir / self.state_file
        if world != self.world:
            if not meta.get("reshardable"):
                engine = f" by the {meta['engine']} engine" if "engine" in meta else ""
                raise ValueError(
                    f"checkpoint {step_dir} was written{engine} by {world} processes; this run "
                    f"has {self.world}, and only the Megatron engine's checkpoints reshard: "
                    f"resume with {world} processes"
                )
            path = step_dir / _state_file(0, world)
            log.info("checkpoint %s was written by %d processes: resharding", step_dir, world)
        # weights_only=False: the state holds RNG states and the config, and is our own file.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"checkpoint {path} has state version {state.get('version')!r}; this code reads "
                f"version {STATE_VERSION}"
            )
        if config is not None:
            check_compatible(state["config"], config, str(path))
        for name, holder, key in sharded_values(state):
            holder[key].path = step_dir / name
        state["saved_world"] = world
        state["step_dir"] = step_dir
        log.info("loaded checkpoint %s (step %d)", path.parent, state["step"])
        return state

    def data_state_for(self, state: dict[str, Any], order: dict[str, Any]) -> dict[str, Any]:
        """The data-stream state for a stream whose layout is `order` (its state_dict's
        "order"): the loaded one when the layouts agree, else the one of the same dp rank of
        the saved run, else the merge of all saved dp ranks' states (data.reshard), which
        re-splits them over the new dp size / workers."""
        from data.reshard import merge_rank_states

        if state["data"].get("order") == order:
            return state["data"]
        step_dir: Path = state["step_dir"]
        files = sorted(step_dir.glob("state_rank*.pt")) or [step_dir / _STATE_FILE]
        by_dp: dict[int, dict] = {}
        for path in files:
            data = torch.load(path, map_location="cpu", weights_only=False)["data"]
            by_dp.setdefault(data["order"]["dp_rank"], data)
        for data in by_dp.values():
            if data["order"] == order:
                return data
        log.info(
            "the data streams were saved by %d dp ranks; merging them for dp_size=%s",
            len(by_dp), order.get("dp_size"),
        )  # fmt: skip
        return merge_rank_states([by_dp[r] for r in sorted(by_dp)])

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


_FULL_BELOW = 1 << 20
"""Free bytes under which a failed write is taken for a full disk: torch's zip writer reports
ENOSPC as `RuntimeError: ... unexpected pos N vs M`, without the OS error."""


def _failed_write(target: Path, tmp: Path, e: BaseException) -> OSError | None:
    """After `e` was raised writing `target` inside the partial checkpoint `tmp`: removes `tmp`
    (the previous checkpoint stays the newest) and returns `e` as an OSError in one sentence
    when it is a full disk or another OS error (None: a bug, to raise as it is)."""
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (error, trace)}
    cause = next(iter(failures.values()))[0] if failures else e
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
    free = shutil.disk_usage(tmp.parent).free
    shutil.rmtree(tmp, ignore_errors=True)
    code = getattr(cause, "errno", None)
    low = isinstance(cause, (OSError, RuntimeError)) and free < _FULL_BELOW
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(cause) or low:
        full = "the disk quota is used up" if code == errno.EDQUOT else "the disk is full"
        error = OSError(
            f"cannot write checkpoint {target}: {full} ({_size(written)} written before it "
            f"failed, {_size(shutil.disk_usage(tmp.parent).free)} free in {tmp.parent} after "
            f"removing the partial {tmp.name}); the previous checkpoint is untouched: free "
            "space (or set checkpoint.dir elsewhere) and --resume"
        )
        error.errno = errno.EDQUOT if code == errno.EDQUOT else errno.ENOSPC
        return error
    if isinstance(cause, OSError):
        error = OSError(
            f"cannot write checkpoint {target}: {cause.strerror or cause}; the partial "
            f"{tmp.name} is removed and the previous checkpoint is untouched"
        )
        error.errno = cause.errno
        return error
    return None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def step_dir_of(path: str | os.PathLike) -> Path:
    """The step directory `path` names: itself (step_N), or the newest complete checkpoint of a
    checkpoint directory or of a run directory (its `checkpoints/`); FileNotFoundError saying
    what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if _STEP_DIR.match(path.name):
        if not (path / _META_FILE).is_file() and not (path / _STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_META_FILE})")
        return path
    if path.name.endswith(".tmp"):
        raise FileNotFoundError(f"{path} is an incomplete checkpoint (a save that did not finish)")
    for candidate in (path, path / "checkpoints"):
        steps = CheckpointManager(CheckpointArgs(dir=str(candidate)), path).complete_steps()
        if steps:
            return candidate / f"step_{steps[-1]:06d}"
    raise FileNotFoundError(f"no complete checkpoint (step_N/ with {_META_FILE}) in {path}")


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
