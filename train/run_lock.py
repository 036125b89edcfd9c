"""One run per run directory: an exclusive lock that the main rank holds for the whole run.

    with RunLock(cfg.train.run_dir):      # RunDirInUse (a ValueError) naming the holder
        train(cfg)

The lock is `<run_dir>/run.lock`, held with fcntl.flock: the kernel releases it when the
holder exits, however it exits (kill -9 included), so a dead run never blocks the next one.
While held, the file names the holder as JSON {"host", "pid", "started"}; a clean release
empties it. A file still naming a holder when the lock is free is what a run that died left
behind: it is taken over, with a log line naming the dead run. On a filesystem without flock
the run goes on unlocked, with a warning.

The Trainer (train.loop) takes it on rank 0, once its input is checked and before anything is
written (the other ranks of a launch share rank 0's run).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["LOCK_FILE", "RunDirInUse", "RunLock"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# flock on a filesystem that does not support it (some network mounts).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirInUse(ValueError):
    """Another live run holds the run directory's lock."""


class RunLock:
    """The exclusive lock of one run directory (a context manager; see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "a+": never truncates before the lock is ours (the holder's record stays readable).
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                log.warning("cannot lock %s (%s): the run directory is unprotected", self.path, e)
                file.close()
                return
            holder = _read(file)
            file.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunDirInUse(
                f"train.run_dir={self.path.parent} is in use by another run ({_describe(holder)}, "
                f"holding {self.path}); wait for it to end, stop it, or choose another "
                "train.run_dir"
            ) from None
        previous = _read(file)
        if previous:
            log.warning(
                "taking over the lock of %s from a run that ended without releasing it (%s)",
                self.path.parent, _describe(previous),
            )  # fmt: skip
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        file.seek(0)
        file.truncate()
        file.write(json.dumps(record) + "\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        # Emptied while still held, then unlocked; the file itself stays: removing it would let
        # a run that opened the old file and one that creates a new one both hold "the" lock.
        file.seek(0)
        file.truncate()
        file.flush()
        fcntl.flock(file, fcntl.LOCK_UN)
        file.close()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read(file: IO[str]) -> dict[str, Any]:
    file.seek(0)
    try:
        record = json.loads(file.read() or "{}")
    except json.JSONDecodeError:
        return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "holder not yet recorded" if not holder.get("unreadable") else "unreadable record"
    return f"host {holder.get('host', '?')}, pid {holder['pid']}, started {holder.get('started')}"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")
