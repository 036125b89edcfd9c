"""Timing on a shared CPU machine: what the benchmarks that run one measurement per fresh child
process share.

    from benchmarks.measure import run_child, measure_quietly, quiet_matmul
    rec = measure_quietly(lambda: run_child(cmd, {"impl": impl, "n": n}, 600, threads=2),
                          busy_threshold=0.15, wait_idle=120, retries=2)

`OtherLoad` measures the share of the machine's CPUs that processes other than this one and
its children used over an interval (/proc/stat against getrusage): how noisy a timing was.
`run_child` runs a benchmark's `--one ...` child with a fixed thread count and reads its last
`RESULT {json}` line (a timeout or crash becomes a record, not an exception);
`timing_record` is what a child reports of its timed runs and peak memory;
`measure_quietly` waits for a quiet machine and measures again while others were busy, keeping
the quietest attempt; `quiet_matmul` gives the machine's fp32 matmul GFLOP/s the same way.
Used by benchmarks/attention.py and benchmarks/encoder_hf.py.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "OtherLoad", "wait_for_idle", "run_child", "measure_quietly", "matmul_gflops",
    "quiet_matmul", "timing_record",
]  # fmt: skip


def _machine_busy_seconds() -> float:
    """CPU seconds spent busy so far by the whole machine, all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """Share of the machine's CPUs used by processes other than this one and its children
    between `start()` and `share()`: a measure of how noisy a timing on a shared machine is."""

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = _machine_busy_seconds()
        self.mine0 = _children_cpu_seconds() + time.process_time()

    def share(self) -> float:
        wall = time.perf_counter() - self.t0
        mine = _children_cpu_seconds() + time.process_time() - self.mine0
        others = _machine_busy_seconds() - self.busy0 - mine
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


def wait_for_idle(threshold: float, max_wait: float) -> float:
    """Sample the other processes' CPU share each second until it is <= threshold or
    max_wait seconds passed; returns the last sample (0.0 when max_wait is 0)."""
    if max_wait <= 0:
        return 0.0
    deadline = time.perf_counter() + max_wait
    load = OtherLoad()
    while True:
        load.start()
        time.sleep(1.0)
        share = load.share()
        if share <= threshold or time.perf_counter() >= deadline:
            return share


def timing_record(
    impl: str, n: int, times: list[float], base_kib: int, top_kib: int, can_reset: bool
) -> dict[str, Any]:
    """A child's record of `impl` at length `n`: the best, median and every one of its timed
    runs (`times`, seconds) and its peak RSS above `base_kib` (train.memory: VmHWM after
    clear_refs when `can_reset`, else ru_maxrss)."""
    return {
        "impl": impl,
        "n": n,
        "status": "ok",
        "seconds": min(times),
        "seconds_median": statistics.median(times),
        "seconds_all": times,
        "peak_mb": (top_kib - base_kib) / 1024,
        "peak_method": "VmHWM after clear_refs" if can_reset else "ru_maxrss",
    }


def run_child(
    cmd: list[str],
    record: dict[str, Any],
    timeout: float,
    threads: int,
    other_line: Callable[[str, int], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Run `cmd` (a benchmark's child) with `threads` OpenMP / MKL threads and return its last
    `RESULT {json}` line's record plus `other_cpu_share` (OtherLoad over the run). Otherwise a
    record of what happened, `record` plus status "error": a timeout, a crash (its last line
    of stderr), or what `other_line(line, returncode)` makes of a line of its output (a
    benchmark's own outcomes, such as a memory budget)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load = OtherLoad()
    load.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**record, "status": "error", "error": f"timed out after {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["other_cpu_share"] = load.share()
            return result
        special = other_line(line, proc.returncode) if other_line is not None else None
        if special is not None:
            return {**record, **special}
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
    return {**record, "status": "error", "error": f"exit {proc.returncode}{killed}: {tail}"}


def measure_quietly(
    measure: Callable[[], dict[str, Any]], busy_threshold: float, wait_idle: float, retries: int
) -> dict[str, Any]:
    """Wait (up to `wait_idle` s) for a quiet machine and `measure()`; measure again (up to
    `retries` times) while other processes took more than `busy_threshold` of the CPUs, and
    keep the quietest attempt, marked `noisy` when even that one was busy."""
    best: dict[str, Any] | None = None
    attempt = 0
    for attempt in range(1, retries + 2):
        before = wait_for_idle(busy_threshold, wait_idle)
        rec = measure()
        rec.update(other_cpu_share_before=before, attempts=attempt)
        if rec["status"] != "ok":
            return rec
        if best is None or rec["other_cpu_share"] < best["other_cpu_share"]:
            best = rec
        if rec["other_cpu_share"] <= busy_threshold or attempt > retries:
            break
        print(f"  busy: others used {rec['other_cpu_share']:.0%} of the CPUs; again", flush=True)
    assert best is not None
    best.update(attempts=attempt, noisy=best["other_cpu_share"] > busy_threshold)
    return best


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    """fp32 GFLOP/s of a size^3 matmul on this process's threads, best of `reps`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def quiet_matmul(busy_threshold: float, wait_idle: float) -> dict[str, float]:
    """matmul_gflops once the machine is quiet, with the other processes' CPU share."""
    wait_for_idle(busy_threshold, wait_idle)
    load = OtherLoad()
    load.start()
    gflops = matmul_gflops()
    return {"gflops": gflops, "other_cpu_share": load.share()}
