"""Does the halo transfer hide behind the interior compute? A/B on CPU, P=2, with a slow link.

    python -m benchmarks.cp_overlap [--seq-len 16384] [--window-blocks 17] [--delay-ms auto]

On one machine's loopback the halo arrives in milliseconds, so there is nothing to hide. This
benchmark makes the link slow on purpose: rank 1 posts its part of every exchange `delay` late
(it sleeps before calling), as a slow network would deliver it, and rank 0 is timed (forward,
median over reps) in two modes of the same code, `cp_sparse_attention(..., overlap=...)`:
- overlap=True: post the halo, compute the interior query blocks, wait, compute the boundary;
- overlap=False: post the halo and wait for it, then compute everything.
Without overlap rank 0 takes about delay + compute; with it about max(delay, interior) +
boundary. hidden_share = (t_off - t_on) / min(delay, compute) is the part of the hideable
time that overlap hid (1 = all of it). The default delay is rank 0's own compute time, measured
first. Window-only pattern: the halo is the only exchange. Writes
benchmarks/results/cp_overlap.json; `--min-hidden X` exits 1 when hidden_share < X.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.sparse import SparsityConfig
from parallel.context_parallel import cp_sparse_attention
from parallel.cp_plan import rank_plan
from parallel.local_ranks import run_local_ranks

RESULTS = Path(__file__).parent / "results" / "cp_overlap.json"
HEADS, HEAD_DIM, BATCH, BLOCK = 8, 64, 1, 64


def overlap_rank(
    rank: int, world: int, seq_len: int, window_blocks: int, reps: int, delay_s: float | None
) -> dict:
    cfg = SparsityConfig(
        block_size=BLOCK, window_blocks=window_blocks, global_blocks=0, random_blocks=0
    )
    n = seq_len // world
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))

    def forward(overlap: bool, delay: float) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 1 and delay:
            time.sleep(delay)  # the slow link: this rank's halo leaves `delay` late
        with torch.no_grad():
            cp_sparse_attention(q, k, v, cfg, None, overlap=overlap)
        return time.perf_counter() - t0

    forward(True, 0.0)  # warm-up (plan cache, allocator)
    compute = statistics.median(forward(True, 0.0) for _ in range(reps))
    # rank 0's compute time decides the default delay; every rank must use the same one
    shared = torch.tensor([compute if rank == 0 else 0.0], dtype=torch.float64)
    dist.all_reduce(shared)
    delay = float(shared) if delay_s is None else delay_s
    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(reps):  # interleaved, so noise hits both modes alike
        times["on"].append(forward(True, delay))
        times["off"].append(forward(False, delay))
    plan = rank_plan(cfg, seq_len, world, rank, HEADS, 0, 0)
    return dict(
        compute_s=compute,
        delay_s=delay,
        overlap_on_s=statistics.median(times["on"]),
        overlap_off_s=statistics.median(times["off"]),
        interior_blocks=int(plan.interior.numel()),
        boundary_blocks=int(plan.boundary.numel()),
        halo_bytes_sent=sum(
            (p.hi - p.lo) * BLOCK * BATCH * HEADS * HEAD_DIM * 2 * 4 for p in plan.halo_send
        ),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--window-blocks", type=int, default=17)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--delay-ms", type=float, default=None, help="default: rank 0's compute")
    p.add_argument("--min-hidden", type=float, default=None, help="exit 1 below this share")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    delay = None if args.delay_ms is None else args.delay_ms / 1000
    per_rank = run_local_ranks(
        overlap_rank, 2, args=(args.seq_len, args.window_blocks, args.reps, delay), timeout=600
    )
    r0 = per_rank[0]
    hideable = min(r0["delay_s"], r0["compute_s"])
    hidden = (r0["overlap_off_s"] - r0["overlap_on_s"]) / hideable
    report = dict(
        settings=dict(
            world=2, seq_len=args.seq_len, block_size=BLOCK, window_blocks=args.window_blocks,
            heads=HEADS, head_dim=HEAD_DIM, batch=BATCH, dtype="float32", reps=args.reps,
            threads_per_rank=1, backend="gloo on 127.0.0.1", measured="rank 0, forward",
        ),
        rank0=r0,
        hidden_share=hidden,
        expected_without_overlap_s=r0["delay_s"] + r0["compute_s"],
        per_rank=per_rank,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"rank 0: compute {r0['compute_s']:.3f} s, link delay {r0['delay_s']:.3f} s | "
        f"overlap off {r0['overlap_off_s']:.3f} s, on {r0['overlap_on_s']:.3f} s | "
        f"hidden {hidden:.0%} of {hideable:.3f} s ({r0['interior_blocks']} interior, "
        f"{r0['boundary_blocks']} boundary blocks) -> {args.out}"
    )
    if args.min_hidden is not None and hidden < args.min_hidden:
        print(f"FAIL: hidden share {hidden:.2f} < {args.min_hidden}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
