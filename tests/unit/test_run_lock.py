"""One run per run directory (train/run_lock.py): two real `python -m train` processes race for
one run directory, and a lock left by a run that died is taken over.

    python -m pytest -q tests/unit/test_run_lock.py
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.distributed.test_torchrun_train import _env
from tests.unit.test_train import TINY
from train.run_lock import LOCK_FILE, RunDirInUse, RunLock


def _start(args: list[str], env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_two_runs_race_for_one_run_dir(tiny_prepared_data, tmp_path, caplog):
    """Both start at once; the loser refuses in one sentence naming the winner's host and pid,
    the winner trains on. Then the winner is killed (-9): the next run takes its lock over."""
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.path={tiny_prepared_data}", f"train.run_dir={run_dir}", "train.steps=2"]
    # The winner sleeps before step 1 (the test-only hang), holding the lock meanwhile.
    env = _env(tmp_path) | {"HALOTRON_TEST_HANG_AT_STEP": "1", "HALOTRON_TEST_HANG_SECONDS": "60"}
    logs = [open(tmp_path / f"log{i}", "w+") for i in range(2)]
    runs = [_start(args, env, log) for log in logs]
    try:
        deadline = time.monotonic() + 45
        while all(r.poll() is None for r in runs) and time.monotonic() < deadline:
            time.sleep(0.2)
        (loser,) = [i for i, r in enumerate(runs) if r.poll() is not None]
        winner = runs[1 - loser]
        logs[loser].seek(0)
        text = logs[loser].read()
        assert runs[loser].returncode == 2 and "Traceback" not in text, text[-3000:]
        (line,) = [t for t in text.splitlines() if t.startswith("error:")]
        assert f"host {socket.gethostname()}, pid {winner.pid}," in line, line
        assert line.startswith(f"error: train.run_dir={run_dir} is in use by another run"), line
        assert winner.poll() is None  # untouched by the refused run
        record = json.loads((run_dir / LOCK_FILE).read_text())
        assert record["pid"] == winner.pid
    finally:
        for r in runs:
            if r.poll() is None:
                os.killpg(r.pid, signal.SIGKILL)
            r.wait()
        for log in logs:
            log.close()

    # The killed winner left its record behind; its lock went with it.
    with caplog.at_level(logging.WARNING, logger="train.run_lock"), RunLock(run_dir):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {winner.pid}," in caplog.text and "ended without releasing it" in caplog.text
    assert (run_dir / LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over


def test_lock_is_exclusive_and_released(tmp_path, caplog):
    with RunLock(tmp_path):
        with pytest.raises(RunDirInUse, match=rf"pid {os.getpid()},"):
            RunLock(tmp_path).acquire()  # another open file: flock excludes it too
    with caplog.at_level(logging.WARNING, logger="train.run_lock"), RunLock(tmp_path):
        pass
    assert "taking over" not in caplog.text
