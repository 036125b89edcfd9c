"""Sharded tensors in model space: each rank's boxes of global tensors, written and read
collectively with torch.distributed.checkpoint (DCP), so that any layout reads what another wrote.

    tensors = ShardedState()
    tensors.add("model.embed.weight", shape, [((row0, 0), local_rows)], write=True)
    tensors.save(step_dir / "engine.tensors")         # collective: every rank of the run
    ref = ShardedStateRef("engine.tensors", step_dir / "engine.tensors")
    ref.load_into(template)                           # a ShardedState of this run's layout

The Megatron engine's parameters and AdamW state are one (train/model_space.py), in the
single-process model's names and unpadded shapes (docs/checkpoints.md). The checkpoint manager
(train/checkpoint.py) writes each ShardedState it finds in a state (`sharded_values`) into a
directory of its own and keeps a `ShardedStateRef` in its place (`replace_sharded`), which
`load_latest` points at that directory. `save_async` (checkpoint.async_save) returns once this
rank's pieces are copied to CPU memory; DCP writes them from a background thread.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Piece", "ShardedState", "ShardedStateRef", "sharded_values", "replace_sharded",
]  # fmt: skip

Piece = tuple[tuple[int, ...], torch.Tensor]
"""(offset in the global tensor, the local tensor holding that box of it)."""


@dataclass
class _Entry:
    shape: torch.Size
    pieces: list[Piece]
    write: bool


class ShardedState:
    """This rank's pieces of global tensors, saved and loaded collectively with DCP.

    `add(key, global_shape, pieces, write)`: `pieces` are boxes of the global tensor `key` that
    this rank holds; `write=False` marks a replica that another rank writes (each box is
    written once; on load every rank reads all of its pieces, whatever layout wrote them).
    """

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def add(self, key: str, shape: torch.Size, pieces: list[Piece], write: bool = True) -> None:
        for offset, tensor in pieces:
            if len(offset) != len(shape) or any(
                o + s > g for o, s, g in zip(offset, tensor.shape, shape, strict=True)
            ):
                raise ValueError(f"{key}: {list(tensor.shape)} at {offset} is outside {shape}")
        self.entries[key] = _Entry(torch.Size(shape), pieces, write)

    def _dcp_dict(
        self, writing: bool, staged: bool = False
    ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, Any]]]:
        """DCP's view: a torch ShardedTensor per key and the (destination, buffer) copies to
        make after a load. DCP's planners read only this rank's shards; the global metadata
        must still tile the tensor, so the rest is described as other ranks' (`_fillers`).
        `staged`: the written pieces are copies in CPU memory, not views of the tensors."""
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard
        from torch.distributed._shard.sharded_tensor import ShardedTensor as TorchSharded
        from torch.distributed._shard.sharded_tensor.metadata import (
            ShardedTensorMetadata,
            TensorProperties,
        )

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        out: dict[str, Any] = {}
        copies = []
        for key, entry in self.entries.items():
            if (writing and not entry.write) or not entry.pieces:
                continue
            shards = []
            for offset, tensor in entry.pieces:
                if staged:
                    buffer = tensor.detach().to("cpu", copy=True).contiguous()
                elif writing:
                    buffer = tensor.detach().contiguous()
                else:
                    buffer = torch.empty_like(tensor)
                copies.append((tensor, buffer))
                place = f"rank:{rank}/{buffer.device}"
                shards.append(Shard(buffer, ShardMetadata(list(offset), list(tensor.shape), place)))
            others = [
                ShardMetadata(list(offset), list(size), f"rank:{(rank + 1) % world}/cpu")
                for offset, size in _fillers(key, entry)
            ]
            if others and world == 1:
                raise ValueError(f"{key}: a one-process state must hold the whole tensor")
            if not dist.is_initialized():  # ShardedTensor wants a process group; DCP does not
                out[key] = shards[0].tensor
                continue
            metadata = ShardedTensorMetadata(
                [s.metadata for s in shards] + others,
                entry.shape,
                TensorProperties(dtype=entry.pieces[0][1].dtype),
            )
            out[key] = TorchSharded._init_from_local_shards_and_global_metadata(shards, metadata)
        return out, copies

    def save(self, path: Path) -> None:
        """Collective (every rank of the default group): write the pieces marked `write`."""
        import torch.distributed.checkpoint as dcp

        with _quiet_sharded_tensor():
            state, _ = self._dcp_dict(writing=True)
            writer = dcp.FileSystemWriter(path)
            dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())

    def save_async(self, path: Path, group: Any) -> Future:
        """Like `save` (every rank calls it), but returns once this rank's pieces are copied to
        CPU memory (the tensors may change right after); DCP writes them from a background thread
        whose collectives go over `group`, a gloo group that nothing else uses (the training's
        groups may be busy in the main thread). The future's result is DCP's metadata."""
        import torch.distributed.checkpoint as dcp

        with _quiet_sharded_tensor():
            state, _ = self._dcp_dict(writing=True, staged=True)
            future = dcp.async_save(
                state,
                storage_writer=dcp.FileSystemWriter(path),
                process_group=group,
                async_stager=_already_staged(),
                no_dist=not dist.is_initialized(),
            )
        assert isinstance(future, Future)  # an AsyncSaveResponse only for a staging Future
        return future


def _already_staged() -> Any:
    """A DCP stager that passes the state through: `_dcp_dict(staged=True)` copied it already
    (the FileSystemWriter's own staging, BlockingAsyncStager, would copy it a second time)."""
    from torch.distributed.checkpoint.staging import AsyncStager

    class AlreadyStaged(AsyncStager):
        _synchronize_after_execute = False

        def stage(self, state_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return state_dict

        def synchronize_staging(self) -> None:
            pass

        def close(self) -> None:
            pass

    return AlreadyStaged()


@contextmanager
def _quiet_sharded_tensor():
    """torch deprecates ShardedTensor for DTensor, which cannot describe a rank holding several
    boxes (QKV's [q | k | v]) or uneven ones (the unpadded vocab); megatron-core's DCP backend
    uses ShardedTensor for the same reason. Its FutureWarning on every use is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
        yield


def _fillers(key: str, entry: _Entry) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes (offset, size) tiling what `entry`'s pieces leave out of the global tensor. The
    pieces of one rank differ from the whole tensor along one axis only (row or column
    ranges of a tp shard), so the rest is the complement of intervals on that axis."""
    shape = entry.shape
    axes = {
        d
        for offset, tensor in entry.pieces
        for d in range(len(shape))
        if tensor.shape[d] != shape[d]
    }
    if not axes:
        return []
    if len(axes) > 1:
        raise ValueError(f"{key}: pieces split along several axes {sorted(axes)}")
    (axis,) = axes
    spans = sorted((o[axis], o[axis] + t.shape[axis]) for o, t in entry.pieces)
    gaps, cursor = [], 0
    for start, end in [*spans, (shape[axis], shape[axis])]:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    boxes = []
    for start, end in gaps:
        offset = [0] * len(shape)
        size = list(shape)
        offset[axis], size[axis] = start, end - start
        boxes.append((tuple(offset), tuple(size)))
    return boxes


@dataclass
class ShardedStateRef:
    """What a saved ShardedState becomes in a loaded state: fills another layout's pieces."""

    name: str
    """Directory of the DCP checkpoint inside the step directory."""
    path: Path | None = field(default=None, compare=False)
    """Set by CheckpointManager.load_latest to the directory to read."""

    def shapes(self) -> dict[str, torch.Size]:
        """The global shape of every tensor in the checkpoint."""
        import torch.distributed.checkpoint as dcp

        metadata = dcp.FileSystemReader(self._path()).read_metadata()
        return {
            k: torch.Size(v.size)
            for k, v in metadata.state_dict_metadata.items()
            if hasattr(v, "size")
        }

    def read_whole(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix`, whole, read in this process alone
        (no process group: export and tests consolidate a checkpoint of any layout)."""
        import torch.distributed.checkpoint as dcp

        tensors = {k: torch.zeros(s) for k, s in self.shapes().items() if k.startswith(prefix)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "loading in a single process"
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(self._path()), no_dist=True)
        return tensors

    def load_into(self, template: ShardedState) -> None:
        """Collective when torch.distributed is initialised: read every piece of `template`
        (whatever layout wrote the checkpoint) and copy it into the template's tensors."""
        import torch.distributed.checkpoint as dcp

        saved = self.shapes()
        for key, entry in template.entries.items():
            if key not in saved:
                raise ValueError(f"the checkpoint {self._path()} has no tensor {key!r}")
            if saved[key] != entry.shape:
                raise ValueError(
                    f"{key} is {list(saved[key])} in the checkpoint {self._path()} but "
                    f"{list(entry.shape)} in this run (another model)"
                )
        with _quiet_sharded_tensor():
            state, copies = template._dcp_dict(writing=False)
            dcp.load(
                state,
                storage_reader=dcp.FileSystemReader(self._path()),
                no_dist=not dist.is_initialized(),
            )
        with torch.no_grad():
            for dest, buffer in copies:
                dest.copy_(buffer)

    def _path(self) -> Path:
        if self.path is None:
            raise RuntimeError(f"ShardedStateRef {self.name!r} was not resolved by load_latest")
        return self.path


def sharded_values(state: dict[str, Any], prefix: str = "") -> list[tuple[str, dict, str]]:
    """(directory name, holding dict, key) of each ShardedState / ShardedStateRef value, at the
    top level or one dict below."""
    found = []
    for key, value in state.items():
        if isinstance(value, (ShardedState, ShardedStateRef)):
            found.append((prefix + key, state, key))
        elif isinstance(value, dict) and not prefix:
            found += sharded_values(value, prefix=f"{key}.")
    return found


def replace_sharded(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of `state` (and of its dicts holding one) with ShardedStateRefs for the
    ShardedStates."""
    out = dict(state)
    for name, holder, key in sharded_values(state):
        if holder is state:
            out[key] = ShardedStateRef(name)
        else:
            parent = name.split(".", 1)[0]
            out[parent] = {**out[parent], key: ShardedStateRef(name)}
    return out
