"""The test harness for multi-process gloo tests: P spawned ranks on 127.0.0.1.

    from tests.distributed.harness import run_ranks
    results = run_ranks(my_module_level_fn, world=4, out_dir=tmp_path, args=(cases,))

A thin test-facing name for parallel.local_ranks.run_local_ranks (which verify and the
benchmarks use too): one intra-op thread per rank, a gloo timeout and a wall-clock timeout
per call (a deadlock raises RankTimeout, a crashed rank RankFailure; all children are killed
and joined), results through files under the test's tmp_path. `fn` must be importable
(module level) because ranks are spawned.
"""

from __future__ import annotations

import os
import signal
import subprocess

from parallel.local_ranks import RankError, RankFailure, RankTimeout, free_port
from parallel.local_ranks import run_local_ranks as run_ranks

__all__ = ["RankError", "RankFailure", "RankTimeout", "free_port", "run_ranks", "run_session"]


def run_session(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cmd` (e.g. a torchrun launch) run in its own session;
    afterwards, and on a timeout, the whole session is killed (torchrun's workers too, so no
    rank outlives the test)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode, stdout, stderr
