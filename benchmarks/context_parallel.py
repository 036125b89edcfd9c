"""Halo context parallelism vs an all-gather baseline: bytes, time and memory per rank.

    python -m benchmarks.context_parallel [--seq-lens 16384 32768 65536] [--worlds 2 4]
                                          [--reps 2] [--random-blocks 0]

For each sequence length N and cp size P, spawns P gloo ranks (one intra-op thread each) and
times forward+backward of
- "halo": parallel.context_parallel.cp_sparse_attention (halo P2P + global rows + merge);
- "allgather": the usual context-parallel baseline -- all-gather K/V (backward:
  reduce-scatter of their gradients, as an all-to-all + sum on gloo), then the same sparse
  kernel over the full K/V for the local queries.
Records bytes sent per rank per layer (parallel.traffic conventions), wall time (median over
reps, slowest rank), and the per-rank peak RSS above the RSS before the inputs are made
(VmHWM reset after setup; one fresh process per measurement). It also runs P=1 at N/P to
compare per-rank memory under weak scaling. The spawned ranks run with a fixed glibc mmap
threshold (MALLOC_MMAP_THRESHOLD_=128 KiB): large tensors are then mapped and unmapped one by
one, so the RSS follows the live tensors; with glibc's default, adaptive threshold freed
buffers stay in the heap by chance and the peak of the same run varies by about 20%.
Writes benchmarks/results/context_parallel.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.sparse import SparsityConfig
from model.sparse_kernel import block_sparse_attention, global_query_attention, make_plan
from model.sparse_plan import build_block_table, gather_global_positions
from parallel.context_parallel import cp_sparse_attention
from parallel.local_ranks import run_local_ranks
from parallel.traffic import TrafficCounter, all_gather_bytes
from train.memory import peak_kib, reset_peak, rss_kib

HEADS, HEAD_DIM, BATCH = 4, 64, 1
SETTINGS = dict(block_size=64, window_blocks=9, global_blocks=2, random_blocks=0)
RESULTS = Path(__file__).parent / "results" / "context_parallel.json"


class _AllGatherKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world):  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.world = world
        return torch.cat(parts, dim=3)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # reduce-scatter: chunk j of every rank's gradient goes to rank j, which sums them
        chunks = grad.chunk(ctx.world, dim=3)
        send = torch.stack(chunks).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv.sum(0), None


def allgather_attention(q, k, v, cfg: SparsityConfig, rank: int, world: int) -> torch.Tensor:
    """Baseline: gather K/V everywhere, then the single-device kernel for the local queries."""
    batch, heads, n, dim = q.shape
    seq = n * world
    kv = _AllGatherKV.apply(torch.stack([k, v]), world)
    k_all, v_all = kv[0], kv[1]
    b = cfg.block_size
    q_blocks = torch.arange(rank * n // b, (rank + 1) * n // b)
    table = build_block_table(cfg, seq, heads, 0, 0, q_blocks=q_blocks)
    glob = gather_global_positions(cfg, seq, None, batch)
    pos = torch.arange(seq)
    q_pos = pos[rank * n : (rank + 1) * n]
    plan = make_plan(
        table, q_pos, pos, glob.is_global, glob.positions, glob.valid, cfg.causal, b, dim
    )
    idx = glob.positions[0]
    gk, gv = k_all[:, :, idx], v_all[:, :, idx]
    out, _ = block_sparse_attention(q, k_all, v_all, gk, gv, plan)
    mine = (idx >= rank * n) & (idx < (rank + 1) * n)
    if bool(mine.any()):
        rows = idx[mine]
        g_out, _ = global_query_attention(
            q[:, :, rows - rank * n], k_all, v_all, rows.view(1, -1), pos, None, cfg.causal, False
        )
        out = out.index_copy(2, rows - rank * n, g_out)
    return out


def timed_steps(step, reps: int, world: int) -> list[float]:
    """Seconds of `reps` calls of step(None), the ranks starting each one together."""
    times = []
    for _ in range(reps):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step(None)
        times.append(time.perf_counter() - t0)
    return times


def bench_rank(rank: int, world: int, method: str, seq_len: int, reps: int, random_blocks: int):
    if world > 1:
        dist.barrier()  # every rank past the process-group setup
    can_reset = reset_peak()  # the peak of imports and setup is not the attention's
    base = rss_kib() * 1024
    cfg = SparsityConfig(**(SETTINGS | {"random_blocks": random_blocks}))  # type: ignore[arg-type]
    n = seq_len // world
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (
        torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3)
    )
    grad = torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen)
    counter = TrafficCounter()

    def step(traffic):
        if method == "halo":
            out = cp_sparse_attention(q, k, v, cfg, None, traffic=traffic)
        else:
            out = allgather_attention(q, k, v, cfg, rank, world)
        out.backward(grad)

    step(counter)  # warm-up, and the traffic of one layer
    times = timed_steps(step, reps, world)
    if method == "allgather":
        kv_bytes = 2 * BATCH * HEADS * seq_len * HEAD_DIM * 4
        for direction in ("forward", "backward"):
            counter.add("halo", direction, 0, all_gather_bytes(kv_bytes, world))
    peak = peak_kib(can_reset) * 1024
    return dict(
        bytes=counter.as_dict(),
        seconds=statistics.median(times),
        peak_rss_above_start=peak - base,
        rss_at_start=base,
    )


def measure(method: str, seq_len: int, world: int, reps: int, random_blocks: int) -> dict:
    per_rank = run_local_ranks(
        bench_rank, world, args=(method, seq_len, reps, random_blocks), timeout=600
    )
    fwd = [r["bytes"]["forward"] for r in per_rank]
    bwd = [r["bytes"]["backward"] for r in per_rank]
    return dict(
        method=method,
        seq_len=seq_len,
        world=world,
        local_tokens=seq_len // world,
        # the middle ranks exchange on both sides: report the busiest rank
        kv_bytes_per_rank_fwd=max(f["halo"] for f in fwd),
        kv_bytes_per_rank_bwd=max(b["halo"] for b in bwd),
        total_bytes_per_rank_fwd=max(sum(f.values()) for f in fwd),
        total_bytes_per_rank_bwd=max(sum(b.values()) for b in bwd),
        bytes_by_kind_busiest_rank=max(fwd, key=lambda f: sum(f.values())),
        fwd_bwd_seconds=max(r["seconds"] for r in per_rank),
        peak_rss_mib=max(r["peak_rss_above_start"] for r in per_rank) / 2**20,
        rss_at_start_mib=max(r["rss_at_start"] for r in per_rank) / 2**20,
    )


def _same_run(a: dict, b: dict) -> bool:
    return (a["seq_len"], a["world"]) == (b["seq_len"], b["world"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--random-blocks", type=int, default=SETTINGS["random_blocks"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    # read by each spawned rank's C library at start (see the module docstring)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    t0 = time.time()
    rows = []
    for world in args.worlds:
        for seq_len in args.seq_lens:
            for method in ("halo", "allgather"):
                rows.append(measure(method, seq_len, world, args.reps, args.random_blocks))
                print(json.dumps(rows[-1]))
    singles = {}
    for local in sorted({s // w for s in args.seq_lens for w in args.worlds}):
        singles[local] = measure("halo", local, 1, 1, args.random_blocks)
        print(json.dumps(singles[local]))
    halo = [r for r in rows if r["method"] == "halo"]
    targets = {}
    for world in args.worlds:
        sent = [r["kv_bytes_per_rank_fwd"] for r in halo if r["world"] == world]
        targets[f"halo_bytes_spread_over_N_P{world}"] = max(sent) / min(sent) - 1
    for r in halo:
        ag = next(a for a in rows if a["method"] == "allgather" and _same_run(a, r))
        key = f"N{r['seq_len']}_P{r['world']}"
        targets[f"allgather_over_halo_bytes_{key}"] = (
            ag["kv_bytes_per_rank_fwd"] / r["kv_bytes_per_rank_fwd"]
        )
        single = singles[r["local_tokens"]]
        targets[f"peak_rss_vs_single_rank_same_local_{key}"] = (
            r["peak_rss_mib"] / single["peak_rss_mib"]
        )
    spreads = [v for k, v in targets.items() if k.startswith("halo_bytes_spread")]
    ratios = [v for k, v in targets.items() if k.startswith("peak_rss_vs_single")]
    big = targets.get(f"allgather_over_halo_bytes_N{max(args.seq_lens)}_P{max(args.worlds)}")
    goals_met = {
        "halo_bytes_spread_over_N": max(spreads) <= 0.05,
        f"allgather_over_halo_bytes_N{max(args.seq_lens)}_P{max(args.worlds)}": (
            big is not None and big >= 30
        ),
        "peak_rss_vs_single_rank_same_local": max(ratios) <= 1.15,
    }
    report = dict(
        settings=SETTINGS
        | {"random_blocks": args.random_blocks, "heads": HEADS, "head_dim": HEAD_DIM}
        | {"batch": BATCH, "dtype": "float32", "threads_per_rank": 1, "reps": args.reps},
        machine=dict(
            cpus=torch.get_num_threads(),
            torch=torch.__version__,
            malloc_mmap_threshold=os.environ["MALLOC_MMAP_THRESHOLD_"],
        ),
        runs=rows,
        single_rank=list(singles.values()),
        targets=targets,
        goals={
            "halo_bytes_spread_over_N": "<= 0.05",
            "allgather_over_halo_bytes_N65536_P4": ">= 30",
            "peak_rss_vs_single_rank_same_local": "<= 1.15",
        },
        goals_met=goals_met,
        wall_seconds=time.time() - t0,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(targets | {"goals_met": goals_met}, indent=2))


if __name__ == "__main__":
    main()
