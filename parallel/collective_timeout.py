"""Name the process group of a collective that timed out (or whose peer died).

    from parallel.collective_timeout import CollectiveTimeout, name_failed_collectives
    with name_failed_collectives(groups, timeout_minutes=10, step=lambda: step):
        engine.train_step(...)          # a hung peer -> CollectiveTimeout naming "cp", ...

gloo reports a hung peer as "Timed out waiting 600000ms for recv operation" (and the peers of a
rank that gave up as "Connection closed by peer"), without saying which group. The group is
still on the stack: the innermost frame of the error's traceback that holds a process group
(torch.distributed's own `group` argument, None meaning the default group, or a CPComm of the
context-parallel exchanges) is the collective that failed. It is named by its field in
`ParallelGroups` (tp, pp, cp, dp, dp_cp, model, embedding; "world" for the default group), with
megatron-core's group_desc and the group's global ranks. NCCL's watchdog names the group itself
(megatron-core passes group_desc) and may abort the process before Python sees an error.

The error is logged where it is caught, before any cleanup: a launcher that stops the other
ranks after a failure (torchrun sends SIGTERM, then SIGKILL) may end this one before its exit
message. `blocked_collective()` says, from any thread, in which group and step the main thread
waits right now (train.preemption logs it when a stop signal arrives).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

import torch.distributed as dist

__all__ = [
    "CollectiveTimeout", "name_failed_collectives", "failed_group", "blocked_collective",
    "GROUP_FIELDS",
]  # fmt: skip

log = logging.getLogger(__name__)

GROUP_FIELDS = ("tp", "pp", "cp", "dp", "dp_cp", "model", "embedding")
"""ParallelGroups fields, in the order that names a group held under two names."""

_HANG_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "watchdog")

_watching: list[tuple[Any, Callable[[], int]]] = []
"""(groups, step) of the active name_failed_collectives contexts, innermost last."""


class CollectiveTimeout(RuntimeError):
    """A collective timed out or lost a peer; the message names the group and the step."""


def _as_group(value: Any) -> dist.ProcessGroup | None:
    if isinstance(value, dist.ProcessGroup):
        return value
    for holder in (value, getattr(value, "comm", None)):  # CPComm, HaloState.comm
        group = getattr(holder, "group", None)
        if isinstance(group, dist.ProcessGroup):
            return group
    return None


def failed_group(tb: TracebackType | None) -> dist.ProcessGroup | None:
    """The process group of the innermost frame of `tb` that holds one (see the module
    docstring); None when no frame does."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return _group_in(frames)


def _group_in(frames: list[FrameType]) -> dist.ProcessGroup | None:
    """The process group of the innermost (last) of `frames` that holds one."""
    for frame in reversed(frames):
        local = frame.f_locals
        if frame.f_code.co_filename.endswith("distributed_c10d.py") and "group" in local:
            group = local["group"]
            if group is None and dist.is_initialized():
                return dist.group.WORLD  # type: ignore[return-value]
            if isinstance(group, dist.ProcessGroup):
                return group
        for value in local.values():
            group = _as_group(value)
            if group is not None:
                return group
    return None


def _name(group: dist.ProcessGroup, groups: Any) -> str:
    if groups is not None:
        for field in GROUP_FIELDS:
            if getattr(groups, field, None) is group:
                return field
    if group is dist.group.WORLD:
        return "world"
    return "unnamed"


def describe(group: dist.ProcessGroup, groups: Any) -> str:
    """'the cp group (CONTEXT_PARALLEL_GROUP, global ranks [0, 1])'."""
    desc = getattr(group, "group_desc", "") or "no group_desc"
    try:
        ranks: Any = dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError):
        ranks = "?"
    return f"the {_name(group, groups)} group ({desc}, global ranks {ranks})"


def _looks_hung(err: BaseException) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in _HANG_MARKERS)


@contextmanager
def name_failed_collectives(
    groups: Any, timeout_minutes: float, step: Callable[[], int]
) -> Iterator[None]:
    """Re-raise a timed-out / peer-lost collective inside as CollectiveTimeout naming its group
    (`groups`: the run's ParallelGroups, or None) and `step()`, the step being run."""
    _watching.append((groups, step))
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, CollectiveTimeout) or not _looks_hung(err):
            raise
        group = failed_group(err.__traceback__)
        where = "an unidentified group" if group is None else describe(group, groups)
        rank = dist.get_rank() if dist.is_initialized() else 0
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = (
            f"rank {rank}: a collective on {where} failed during step {step()}: {first_line}. "
            "Another rank of that group is hung, dead or far behind (it did not join within "
            f"parallel.timeout_minutes={timeout_minutes:g}); its own log says why"
        )
        log.error("%s", message)  # now: the launcher may stop this rank before it exits
        raise CollectiveTimeout(message) from err
    finally:
        _watching.pop()


def blocked_collective() -> str | None:
    """'a collective on the tp group (..., global ranks [0, 1]) in step 5' when the main thread
    is inside name_failed_collectives and waits in a collective now; None otherwise."""
    if not _watching:
        return None
    groups, step = _watching[-1]
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    # The innermost Python frames: the call that blocks in C++ and its caller.
    group = _group_in(frames[:3][::-1])
    return None if group is None else f"a collective on {describe(group, groups)} in step {step()}"
