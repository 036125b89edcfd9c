"""Pooled random blocks at scale: plan time, CP step time, memory, bytes and exactness to 1M.

    python -m benchmarks.cp_scale [--seq-lens 65536 262144 1048576] [--world 8] [--reps 2]
                                  [--exact-seq-lens 262144] [--quick]
                                  [--out benchmarks/results/cp_scale.json]

Two patterns (block 64, H=2 heads, D=64, batch 1, fp32), both with `random_pool_blocks=32`
(parallel/cp_plan.py: the pool's K/V travel like the global rows, so traffic is flat in N):
"bigbird_pool" (window 3, global 2, random 3, bidirectional) and "causal_demo_pool" (window 3,
global 1, random 2, causal). Each measurement runs in fresh spawned processes with one intra-op
thread per rank (gloo on 127.0.0.1, parallel/local_ranks.py):
1. plan: `rank_plan` of one layer built fresh (uncached) at each N for P=--world, median over
   layers x ranks, in ms; also for the whole-sequence draw (random_pool_blocks=0).
2. CP attention forward+backward at each N on P ranks: step time (median over --reps after a
   warm-up, slowest rank; the P ranks share this machine's CPUs, so on a 2-core machine this is
   the wall time of P/2-fold oversubscription, not of P machines), per-rank peak RSS above
   the RSS after setup (VmHWM reset, MALLOC_MMAP_THRESHOLD_ fixed as in
   benchmarks/context_parallel.py), and bytes per rank counted by TrafficCounter (forward and
   backward, by kind; the forward is checked against parallel.show.forward_bytes). Every rank
   draws only its own slice of q/k/v (a generator seeded by its rank).
3. weak scaling: the same per-rank problem on one rank (P=1 at N = max N / P), peak RSS alike;
   target: peak at (max N, P) / peak at (max N / P, 1) <= 1.15.
4. bytes per rank per layer from the plan (`forward_bytes`, worst rank, all kinds) at N in
   --bytes-seq-lens for P in --bytes-worlds: flat in N within 5%; the all-gather baseline
   (benchmarks/context_parallel.py's formula) over the pool at 256k, P=4: >= 30x. The
   whole-sequence draw's bytes alongside for comparison.
5. exactness at --exact-seq-lens (on P ranks): CP output and q/k/v gradients (fixed random
   upstream gradient) against single-device `sparse_attention` over the whole sequence, max
   abs error <= 1e-5. The ranks save their slices after the timed steps; one process then
   rebuilds the full inputs from the same per-rank seeds and computes the reference.
A run whose estimated memory exceeds what the machine has available is skipped and recorded.
Writes benchmarks/results/cp_scale.json; asserts nothing. Takes about 17 minutes on 2 shared
cores (2026-12-01; mostly the 8-rank forward+backward at 1M, peak ~16 GiB of the machine's RAM
in all); --quick (N 4096 and 16384, P=4) about a minute on 2 idle cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.context_parallel import timed_steps
from model.sparse import SparsityConfig, sparse_attention
from parallel.context_parallel import cp_sparse_attention
from parallel.cp_plan import rank_plan
from parallel.local_ranks import run_local_ranks
from parallel.show import forward_bytes
from parallel.traffic import TrafficCounter, all_gather_bytes
from train.memory import peak_kib, reset_peak, rss_kib

RESULTS = Path(__file__).parent / "results" / "cp_scale.json"
HEADS, HEAD_DIM, BATCH, BLOCK, BYTES_PER_VALUE = 2, 64, 1, 64, 4
PATTERNS = {
    "bigbird_pool": SparsityConfig(
        block_size=BLOCK, window_blocks=3, global_blocks=2, random_blocks=3, random_pool_blocks=32
    ),
    "causal_demo_pool": SparsityConfig(
        block_size=BLOCK, window_blocks=3, global_blocks=1, random_blocks=2,
        random_pool_blocks=32, causal=True,
    ),
}  # fmt: skip
WHOLE = "_whole_sequence"  # suffix of a pattern's variant drawing from the whole sequence
TARGETS = {
    "bytes_flat_max_over_min": 1.05,
    "allgather_over_pool_bytes_min": 30.0,
    "peak_ratio_max": 1.15,
    "exact_max_abs_error": 1e-5,
}
BYTES_SEQ_LENS = [16384, 65536, 262144, 2**20]
ALLGATHER_AT = (262144, 4)  # (N, P) of the all-gather comparison
# Peak RSS of one rank's forward+backward, in units of one local q slice, plus the process
# baseline: measured (P=1, 128k: 1.4 GiB for a 64 MiB slice) with a margin, for the guard
# that skips runs the machine cannot hold.
SLICES_PER_RANK, PROCESS_BASE_BYTES = 26, 400 * 2**20


def pattern(name: str) -> SparsityConfig:
    """A pattern by name; `<name>_whole_sequence` is its variant without a pool."""
    if name.endswith(WHOLE):
        return dataclasses.replace(PATTERNS[name.removesuffix(WHOLE)], random_pool_blocks=0)
    return PATTERNS[name]


def local_inputs(rank: int, n_local: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and the upstream gradient of rank `rank`'s n_local tokens, [B, H, n, D]."""
    gen = torch.Generator().manual_seed(rank)
    return tuple(torch.randn(BATCH, HEADS, n_local, HEAD_DIM, generator=gen) for _ in range(4))


def short(n: int) -> str:
    """262144 -> '256k', 1048576 -> '1M'."""
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}k"


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


# ---- spawned workers -------------------------------------------------------------------------


def plan_rank(rank: int, world: int, names: list[str], seq_lens: list[int], plan_world: int):
    """ms of `rank_plan` (uncached) per layer: {name: {N: [samples]}}, one thread."""
    build = rank_plan.__wrapped__  # type: ignore[attr-defined]
    build(pattern(names[0]), min(seq_lens), plan_world, 0, HEADS, 99, 0)  # warm-up
    ranks = sorted({0, plan_world // 2, plan_world - 1})
    out: dict[str, dict[int, list[float]]] = {}
    for name in names:
        cfg = pattern(name)
        out[name] = {}
        for seq_len in seq_lens:
            samples = []
            for layer in range(3):
                for r in ranks:
                    t0 = time.perf_counter()
                    build(cfg, seq_len, plan_world, r, HEADS, layer, 0)
                    samples.append((time.perf_counter() - t0) * 1e3)
            out[name][seq_len] = samples
    return out


def bench_rank(rank: int, world: int, name: str, seq_len: int, reps: int, save_dir: str | None):
    """Forward+backward of cp_sparse_attention on this rank: times, peak RSS, bytes; with
    `save_dir`, one more step whose output and q/k/v gradients are saved for the reference."""
    if world > 1:
        dist.barrier()  # every rank past the process-group setup
    can_reset = reset_peak()  # the peak of imports and setup is not the attention's
    base = rss_kib() * 1024
    cfg = pattern(name)
    q, k, v, grad = local_inputs(rank, seq_len // world)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    counter = TrafficCounter()

    def step(traffic: TrafficCounter | None) -> torch.Tensor:
        out = cp_sparse_attention(q, k, v, cfg, None, traffic=traffic)
        out.backward(grad)
        return out

    step(counter)  # warm-up (plan, allocator) and the traffic of one layer
    times = timed_steps(step, reps, world)
    peak = peak_kib(can_reset) * 1024
    if save_dir is not None:
        q.grad = k.grad = v.grad = None
        out = step(None)
        slices = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        torch.save(slices, Path(save_dir) / f"{name}-rank{rank}.pt")
    return dict(
        bytes=counter.as_dict(),
        seconds=statistics.median(times),
        peak_rss_above_start=peak - base,
        rss_at_start=base,
    )


def reference_rank(rank: int, world: int, names: list[str], seq_len: int, cp: int, save_dir: str):
    """Max abs error of the saved CP slices against single-device sparse_attention."""
    n = seq_len // cp
    parts = [local_inputs(r, n) for r in range(cp)]
    q, k, v, grad = (torch.cat([p[i] for p in parts], dim=2) for i in range(4))
    del parts
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    errors = {}
    for name in names:
        q.grad = k.grad = v.grad = None
        out = sparse_attention(q, k, v, pattern(name))
        out.backward(grad)
        want = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        del out
        err = dict.fromkeys(want, 0.0)
        for r in range(cp):
            got = torch.load(Path(save_dir) / f"{name}-rank{r}.pt")
            for key, full in want.items():
                assert full is not None
                diff = (got[key] - full[:, :, r * n : (r + 1) * n]).abs().max().item()
                err[key] = max(err[key], diff)
        errors[name] = err | {"max": max(err.values())}
    return errors


# ---- measurements in the parent --------------------------------------------------------------


def formula_bytes(cfg: SparsityConfig, seq_len: int, world: int) -> list[dict[str, int]]:
    """Forward bytes of every rank for one layer (parallel.show.forward_bytes)."""
    return [
        forward_bytes(cfg, seq_len, world, r, HEADS, HEAD_DIM, bytes_per_value=BYTES_PER_VALUE)
        for r in range(world)
    ]


def allgather_bytes(seq_len: int, world: int) -> int:
    """Forward bytes per rank per layer of all-gather CP (benchmarks/context_parallel.py)."""
    kv_bytes = 2 * BATCH * HEADS * seq_len * HEAD_DIM * BYTES_PER_VALUE
    return all_gather_bytes(kv_bytes, world)


def measure(name: str, seq_len: int, world: int, reps: int, save_dir: str | None) -> dict:
    """One spawned group of `world` ranks for (pattern, N); skipped when memory is short."""
    row: dict[str, Any] = dict(pattern=name, seq_len=seq_len, world=world)
    row["local_tokens"] = n = seq_len // world
    slice_bytes = BATCH * HEADS * n * HEAD_DIM * BYTES_PER_VALUE
    need = world * (SLICES_PER_RANK * slice_bytes + PROCESS_BASE_BYTES)
    row["mem_available_gib"] = round(mem_available_bytes() / 2**30, 2)
    row["mem_estimate_gib"] = round(need / 2**30, 2)
    if need > mem_available_bytes():
        return row | {"skipped": f"needs about {need / 2**30:.1f} GiB, more than available"}
    t0 = time.perf_counter()
    per_rank = run_local_ranks(
        bench_rank, world, args=(name, seq_len, reps, save_dir), timeout=3600
    )
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    totals = [sum(sum(r["bytes"][d].values()) for d in ("forward", "backward")) for r in per_rank]
    worst = max(range(world), key=totals.__getitem__)
    expected = formula_bytes(pattern(name), seq_len, world)
    row |= dict(
        step_seconds=max(r["seconds"] for r in per_rank),  # the slowest rank
        step_seconds_per_rank=[round(r["seconds"], 3) for r in per_rank],
        peak_rss_mib=max(r["peak_rss_above_start"] for r in per_rank) / 2**20,
        peak_rss_mib_per_rank=[round(r["peak_rss_above_start"] / 2**20, 1) for r in per_rank],
        rss_at_start_mib=max(r["rss_at_start"] for r in per_rank) / 2**20,
        bytes_worst_rank=dict(rank=worst, total=totals[worst], **per_rank[worst]["bytes"]),
        bytes_total_per_rank=totals,
        forward_bytes_match_formula=all(
            r["bytes"]["forward"] == e for r, e in zip(per_rank, expected, strict=True)
        ),
    )
    return row


def bytes_section(bytes_seq_lens: list[int], bytes_worlds: list[int]) -> dict:
    """Per pattern (and its whole-sequence variant) and P: worst-rank forward bytes per layer
    at each N, and max/min over N."""
    out: dict[str, Any] = {}
    for name in [*PATTERNS, *(p + WHOLE for p in PATTERNS)]:
        out[name] = {}
        for world in bytes_worlds:
            per_n: dict[str, dict[str, Any]] = {}
            for seq_len in bytes_seq_lens:
                ranks = formula_bytes(pattern(name), seq_len, world)
                worst = max(ranks, key=lambda b: sum(b.values()))
                per_n[str(seq_len)] = dict(total=sum(worst.values()), by_kind=worst)
            totals: list[int] = [v["total"] for v in per_n.values()]
            out[name][f"P{world}"] = dict(per_seq_len=per_n, max_over_min=max(totals) / min(totals))
        rank_plan.cache_clear()
    return out


def _spread(samples: list[float]) -> dict[str, float]:
    return dict(
        median=statistics.median(samples), min=min(samples), max=max(samples), n=len(samples)
    )


def allgather_section() -> dict:
    """At ALLGATHER_AT: all-gather bytes per rank per layer over each variant's worst rank."""
    seq_len, world = ALLGATHER_AT
    baseline = allgather_bytes(seq_len, world)
    out: dict[str, Any] = dict(seq_len=seq_len, world=world, allgather_bytes=baseline)
    for name in [*PATTERNS, *(p + WHOLE for p in PATTERNS)]:
        worst = max(sum(b.values()) for b in formula_bytes(pattern(name), seq_len, world))
        out[name] = dict(bytes=worst, allgather_over_bytes=baseline / worst)
    rank_plan.cache_clear()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="quick: 4096 16384")
    p.add_argument("--world", type=int, default=None, help="cp ranks; default 8, quick 4")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--exact-seq-lens", type=int, nargs="*", default=None,
        help="N (among --seq-lens) checked against one device; default 262144",
    )  # fmt: skip
    p.add_argument(
        "--bytes-seq-lens", type=int, nargs="+", default=None,
        help="N of the plan's bytes per rank; default 16384 65536 262144 1048576, quick to 65536",
    )  # fmt: skip
    p.add_argument("--bytes-worlds", type=int, nargs="+", default=[8, 4])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, < 1 min)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    seq_lens = sorted(a.seq_lens or ([4096, 16384] if a.quick else [65536, 262144, 2**20]))
    world = a.world or (4 if a.quick else 8)
    bytes_seq_lens = a.bytes_seq_lens or ([4096, 16384, 65536] if a.quick else BYTES_SEQ_LENS)
    exact = a.exact_seq_lens
    if exact is None:
        exact = [max(seq_lens)] if a.quick else [n for n in seq_lens if n == 262144]
    for n in seq_lens:
        if n <= 0 or n % (world * BLOCK):
            p.error(
                f"--seq-lens {n}: must be a positive multiple of world x block = {world * BLOCK}"
            )
    if not set(exact) <= set(seq_lens):
        p.error(f"--exact-seq-lens {exact} must be among --seq-lens {seq_lens}")
    # read by each spawned rank's C library at start (see benchmarks/context_parallel.py)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    mem_start = mem_available_bytes()

    names = list(PATTERNS)
    plan_names = [*names, *(n + WHOLE for n in names)]
    samples = run_local_ranks(plan_rank, 1, args=(plan_names, seq_lens, world), timeout=1800)[0]
    plan_ms = {
        name: {str(n): _spread(s) for n, s in per_n.items()} for name, per_n in samples.items()
    }
    print(json.dumps({"plan_ms": plan_ms}), flush=True)

    bytes_formula = bytes_section(bytes_seq_lens, a.bytes_worlds)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    weak: dict[str, dict] = {}
    exactness: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as save_dir:
        for seq_len in seq_lens:
            for name in names:
                keep = save_dir if seq_len in exact else None
                runs[name].append(measure(name, seq_len, world, a.reps, keep))
                print(json.dumps(runs[name][-1]), flush=True)
            if seq_len in exact:
                done = [r["pattern"] for r in (runs[n][-1] for n in names) if "skipped" not in r]
                errors = run_local_ranks(
                    reference_rank,
                    1,
                    args=(done, seq_len, world, save_dir),
                    timeout=3600,
                    threads=os.cpu_count() or 1,
                )[0]
                for name, err in errors.items():
                    exactness.setdefault(name, {})[str(seq_len)] = err
                    print(json.dumps({"exactness": name, "seq_len": seq_len} | err), flush=True)
                for f in Path(save_dir).iterdir():
                    f.unlink()
    single_n = max(seq_lens) // world
    for name in names:
        weak[name] = measure(name, single_n, 1, a.reps, None)
        print(json.dumps(weak[name]), flush=True)

    report: dict[str, Any] = dict(
        benchmark="cp_scale",
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        command=" ".join(["python -m benchmarks.cp_scale", *(argv or sys.argv[1:])]),
        settings=dict(
            quick=a.quick,
            seq_lens=seq_lens,
            world=world,
            reps=a.reps,
            exact_seq_lens=exact,
            bytes_seq_lens=bytes_seq_lens,
            bytes_worlds=a.bytes_worlds,
            heads=HEADS,
            head_dim=HEAD_DIM,
            batch=BATCH,
            dtype="float32",
            threads_per_rank=1,
            patterns={n: dataclasses.asdict(c) for n, c in PATTERNS.items()},
            malloc_mmap_threshold=os.environ["MALLOC_MMAP_THRESHOLD_"],
        ),
        machine=dict(
            platform=platform.platform(),
            python=sys.version.split()[0],
            cpus=os.cpu_count(),
            torch=torch.__version__,
            mem_available_gib_at_start=round(mem_start / 2**30, 2),
            load_avg_start=load_start,
            load_avg_end=os.getloadavg(),
            ranks_oversubscribe_cpus=world > (os.cpu_count() or 1),
        ),
        plan_ms=plan_ms,
        runs=runs,
        weak_scaling=weak,
        bytes_formula=bytes_formula,
        allgather=allgather_section(),
        exactness=exactness,
    )
    report["targets"] = targets(report)
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["targets"], indent=2))


def targets(report: dict) -> dict:
    """Each goal's value, target and pass (None when its measurement was not made)."""
    s = report["settings"]
    out: dict[str, Any] = {}

    def goal(key: str, value: float | None, target: str, ok: bool | None) -> None:
        out[key] = dict(value=value, target=target, passed=None if value is None else ok)

    for name in PATTERNS:
        for world_key, entry in report["bytes_formula"][name].items():
            v = entry["max_over_min"]
            limit = TARGETS["bytes_flat_max_over_min"]
            goal(f"{name}_formula_bytes_max_over_min_{world_key}", v, f"<= {limit}", v <= limit)
        done = [r for r in report["runs"][name] if "skipped" not in r]
        v = None
        if len(done) > 1:
            totals = [r["bytes_worst_rank"]["total"] for r in done]
            v = max(totals) / min(totals)
        limit = TARGETS["bytes_flat_max_over_min"]
        goal(f"{name}_measured_bytes_max_over_min", v, f"<= {limit}", v is not None and v <= limit)
        match = bool(done) and all(r["forward_bytes_match_formula"] for r in done)
        goal(f"{name}_forward_bytes_match_formula", float(len(done)), "all runs", match)
        ag = report["allgather"]
        v = ag[name]["allgather_over_bytes"] if name in ag else None
        limit = TARGETS["allgather_over_pool_bytes_min"]
        key = f"{name}_allgather_over_pool_bytes_N{short(ag['seq_len'])}_P{ag['world']}"
        goal(key, v, f">= {limit}", v is not None and v >= limit)
        big = report["runs"][name][-1]
        single = report["weak_scaling"][name]
        v = None
        if "skipped" not in big and "skipped" not in single:
            v = big["peak_rss_mib"] / single["peak_rss_mib"]
        key = f"peak_ratio_{short(big['seq_len'])}_P{s['world']}_over_{short(single['seq_len'])}_P1"
        limit = TARGETS["peak_ratio_max"]
        goal(f"{name}_{key}", v, f"<= {limit}", v is not None and v <= limit)
        for n_key, err in report["exactness"].get(name, {}).items():
            limit = TARGETS["exact_max_abs_error"]
            key = f"{name}_exact_max_abs_error_N{short(int(n_key))}"
            goal(key, err["max"], f"<= {limit}", err["max"] <= limit)
    return out


if __name__ == "__main__":
    main()
