"""Clean shutdown on SIGTERM (SLURM preemption, time limit, `scancel`) and test-only faults.

    with GracefulStop() as stop:             # SIGTERM (and SIGUSR1) set a flag instead of killing
        for step in ...:
            ...train one step...
            if stop.agreed():                # every rank: the same answer at the same step
                save(); break

The flag is all-reduced (max) over the default process group after every step, so all ranks
stop after the same step even when the signal reaches them at different moments (SLURM signals
every task, torchrun forwards SIGTERM to its workers; either order works). The signal is logged
the moment it arrives, from a thread (signal.set_wakeup_fd), with the group and step of the
collective the main thread waits in, if any (parallel.collective_timeout.blocked_collective): a
rank stopped by its launcher because a peer failed says where it was even when it is blocked
in a collective that will not return before the launcher's SIGKILL. The loop then writes
a checkpoint and returns; `--resume` continues from it. SLURM sends SIGKILL KillWait (default
30 s) after SIGTERM, torchrun 30 s after it forwards one: a checkpoint must fit in that time.

`fault_injection(step, rank, world, run_dir)`, `hang_injection(step, rank, world)` and
`injected_nan(step)` are for tests only (environment variables):
- HALOTRON_TEST_KILL_AT_STEP=N: after step N, the last rank kills itself with SIGKILL (a node
  lost), once per run directory (a marker file `.test_killed_at_N` keeps the restart alive).
- HALOTRON_TEST_SIGTERM_AT_STEP=N: after step N, rank 0 sends SIGTERM to itself and to its
  parent (the launcher: torchrun forwards it to every worker, as when SLURM signals the job
  step), once per run directory.
- HALOTRON_TEST_HANG_AT_STEP=N: before step N, the last rank sleeps HALOTRON_TEST_HANG_SECONDS
  (default 60), so that its peers time out in a collective (parallel.timeout_minutes).
- HALOTRON_TEST_NAN_AT_STEPS=N, A-B or a comma list of those: the training loss of those steps
  is multiplied by NaN inside the engine (the last pipeline stage), before backward.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from functools import lru_cache
from pathlib import Path
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from parallel.collective_timeout import blocked_collective

__all__ = ["GracefulStop", "fault_injection", "hang_injection", "injected_nan", "STOP_SIGNALS"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that ask for a checkpoint and a clean exit (SIGUSR1: `sbatch --signal=USR1@90`)."""


class GracefulStop:
    """Turns STOP_SIGNALS into a flag while active (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[int, int, int] | None = None  # read fd, write fd, previous fd

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._wakeup = (read_fd, write_fd, signal.set_wakeup_fd(write_fd))
            threading.Thread(target=_log_arrivals, args=(read_fd,), daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._wakeup is not None:
            read_fd, write_fd, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_fd)  # the thread reads the end of the pipe and closes it
            self._wakeup = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            if self._wakeup is None:  # else the arrival thread said it already
                log.warning("%s received: stopping after this step with a checkpoint",
                            self.signal_name)  # fmt: skip

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective under torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        # NCCL reduces device tensors only.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _log_arrivals(read_fd: int) -> None:
    """Logs each stop signal as it arrives (Python's C handler writes its number to the wakeup
    fd at once, while the Python handler waits for the main thread, which may be blocked)."""
    stop = {int(sig) for sig in STOP_SIGNALS}
    while data := os.read(read_fd, 64):
        for signum in data:
            if signum in stop:
                where = blocked_collective()
                waiting = f" while waiting in {where}" if where else ""
                rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
                log.warning(
                    "rank %d: %s received%s: stopping after this step with a checkpoint",
                    rank, signal.Signals(signum).name, waiting,
                )  # fmt: skip
    os.close(read_fd)


def _once(run_dir: Path, name: str) -> bool:
    """True the first time `name` is claimed in `run_dir` (an exclusive-create marker)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(run_dir / name, "x"):
            return True
    except FileExistsError:
        return False


def fault_injection(step: int, rank: int, world: int, run_dir: Path) -> None:
    """The test-only faults of the module docstring, after optimizer step `step`."""
    kill_at = os.environ.get("HALOTRON_TEST_KILL_AT_STEP")
    if kill_at and step == int(kill_at) and rank == world - 1:
        if _once(run_dir, f".test_killed_at_{step}"):
            log.warning("HALOTRON_TEST_KILL_AT_STEP=%s: rank %d kills itself", kill_at, rank)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
    term_at = os.environ.get("HALOTRON_TEST_SIGTERM_AT_STEP")
    if term_at and step == int(term_at) and rank == 0:
        if _once(run_dir, f".test_sigterm_at_{step}"):
            log.warning("HALOTRON_TEST_SIGTERM_AT_STEP=%s: SIGTERM to the launcher", term_at)
            os.kill(os.getpid(), signal.SIGTERM)
            if world > 1:
                os.kill(os.getppid(), signal.SIGTERM)


def hang_injection(step: int, rank: int, world: int) -> None:
    """HALOTRON_TEST_HANG_AT_STEP: the last rank sleeps before (1-based) step `step`."""
    hang_at = os.environ.get("HALOTRON_TEST_HANG_AT_STEP")
    if hang_at and step == int(hang_at) and rank == world - 1:
        seconds = float(os.environ.get("HALOTRON_TEST_HANG_SECONDS", "60"))
        log.warning("HALOTRON_TEST_HANG_AT_STEP=%s: rank %d sleeps %.0f s", hang_at, rank, seconds)
        time.sleep(seconds)


@lru_cache(maxsize=4)
def _nan_steps(spec: str) -> frozenset[int]:
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(steps)


def injected_nan(step: int) -> bool:
    """Whether HALOTRON_TEST_NAN_AT_STEPS names (1-based) step `step`."""
    spec = os.environ.get("HALOTRON_TEST_NAN_AT_STEPS")
    return bool(spec) and step in _nan_steps(spec)
