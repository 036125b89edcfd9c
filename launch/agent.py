"""torchrun for preemptible jobs: SIGTERM and SIGUSR1 go to the workers, the exit status is theirs.

    python -m launch.agent --standalone --nproc-per-node 4 -m train --config configs/demo.yaml

Takes torchrun's arguments and runs torchrun's agent in this process. torchrun itself turns a
SIGTERM into an exception: it passes SIGTERM on to its workers, waits for them and then exits 1
with a traceback whatever they did, so a preempted job whose ranks all wrote their checkpoint
and exited 0 reads as failed to SLURM or a requeue script. Here the agent is told to leave
SIGTERM and SIGUSR1 alone (`--signals-to-handle`), and this module passes each one to
the workers (the agent's child processes) instead; the agent goes on watching them as usual:
exit 0 when every rank stopped cleanly, torchrun's failure report when one did not. A stop
signal that finds no worker (during a rendezvous) ends the agent as torchrun would. SIGINT,
SIGHUP and SIGQUIT keep torchrun's handling. `python -m launch` uses it for every torchrun
mode (docs/launch.md).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

__all__ = ["AGENT_SIGNALS", "STOP_SIGNALS", "children", "main"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What `python -m train` answers with a checkpoint and a clean exit (train.preemption)."""


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc: every process's parent)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _pass_to_workers(signum: int, frame: FrameType | None) -> None:
    workers = children(os.getpid())
    name = signal.Signals(signum).name
    if not workers:
        from torch.distributed.elastic.multiprocessing import SignalException

        raise SignalException(f"{name} with no worker running", sigval=signal.Signals(signum))
    print(f"launch.agent: {name} passed to the workers {workers}", file=sys.stderr, flush=True)
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
"""What torchrun's agent still handles itself (its --signals-to-handle, default SIGTERM too)."""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in args):
        args = ["--signals-to-handle", AGENT_SIGNALS, *args]  # else the caller chose
    for sig in STOP_SIGNALS:
        signal.signal(sig, _pass_to_workers)
    from torch.distributed.run import main as torchrun

    torchrun(args)


if __name__ == "__main__":
    main()
