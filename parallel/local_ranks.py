"""Run a function on P gloo ranks spawned on this machine and collect what each returns.

    from parallel.local_ranks import run_local_ranks
    results = run_local_ranks(my_module_level_fn, world=4, args=(cases,), timeout=120)
    # results[r]: what fn(rank, world, *args) returned on rank r (torch.save-able)

Each rank is a fresh spawned process (`threads` intra-op threads, default 1), rendezvous on a
free TCP port of 127.0.0.1, gloo with a timeout. A rank that raises or dies makes the call
raise RankFailure (with the traceback of every failed rank); a group that does not finish
within `timeout` seconds is killed and raises RankTimeout, so a deadlock fails instead of
hanging. Results travel through files in `out_dir` (a temporary directory by default). With
`expect_errors=True` per-rank exceptions are returned (as RankError) instead of raised.
Used by the distributed tests, `python -m parallel.verify` and the cp benchmarks.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    pass


class RankTimeout(RuntimeError):
    pass


@dataclass
class RankError:
    """What a rank raised: exception type name, message, traceback text."""

    type: str
    message: str
    traceback: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn, rank: int, world: int, port: int, out: str, args: tuple, gloo_s: int, threads: int
) -> None:
    torch.set_num_threads(threads)
    path = Path(out) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=gloo_s),
        )
        result = fn(rank, world, *args)
        payload = {"ok": True, "result": result}
    except BaseException as err:  # noqa: BLE001 -- report every failure to the parent
        payload = {
            "ok": False,
            "error": RankError(type(err).__name__, str(err), traceback.format_exc()),
        }
    torch.save(payload, path)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_local_ranks(
    fn,
    world: int,
    out_dir: Path | str | None = None,
    args: tuple = (),
    timeout: float = 120.0,
    expect_errors: bool = False,
    threads: int = 1,
) -> list:
    """fn(rank, world, *args) on `world` spawned gloo ranks; returns the per-rank results."""
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_local_ranks(fn, world, tmp, args, timeout, expect_errors, threads)
    out = Path(out_dir) / f"ranks-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    gloo_s = max(10, int(timeout))
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world, port, str(out), args, gloo_s, threads))
        for r in range(world)
    ]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                raise RankTimeout(f"{world} ranks of {fn.__name__} did not finish in {timeout}s")
            # One crashed rank leaves its peers blocked in a collective: stop waiting for them.
            crashed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if crashed and not (out / f"rank{crashed[0]}.pt").exists():
                time.sleep(1.0)
                raise RankFailure(f"rank(s) {crashed} of {fn.__name__} died without a result")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    results, failures = [], []
    for r in range(world):
        path = out / f"rank{r}.pt"
        if not path.exists():
            failures.append(f"rank {r}: exit code {procs[r].exitcode}, no result")
            continue
        payload = torch.load(path, weights_only=False)
        if payload["ok"]:
            results.append(payload["result"])
        elif expect_errors:
            results.append(payload["error"])
        else:
            err = payload["error"]
            failures.append(f"rank {r}: {err.type}: {err.message}\n{err.traceback}")
    if failures:
        raise RankFailure("\n".join(failures))
    return results
