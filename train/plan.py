"""List the TP x PP x CP x DP layouts of a recipe that fit N GPUs (parallel.plan).

    python -m train.plan --config configs/demo.yaml --gpus 8 --gpu-memory 80 \
        [--headroom 0.1] [--sort traffic|memory] [--top 20] [--json plan.json] [key=value ...]

Reads the recipe (train.config, overrides as for `python -m train`), keeps its model, attention,
sequence length, per-rank micro-batch and accumulation, precision and sequence parallelism,
and prints every layout of --gpus ranks that parallel.layout.check_split accepts: the worst
rank's memory (parameters, gradients, optimizer states, activations) and the bytes it sends
per optimizer step by kind (tp all-reduces, pp sends, cp halo / global / random-or-pool, dp
reduce-scatter and all-gather). A layout fits when its memory is at most (1 - headroom) x
--gpu-memory GiB; fitting layouts come first, then by bytes per step (--sort traffic, the
default) or by memory (--sort memory). What the estimates model and assume: parallel/plan.py
and docs/planning.md. (The library is parallel.plan; this command lives in train/ because it
reads a recipe, and parallel/ does not import train/.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parallel.plan import TRAFFIC_KINDS, LayoutPlan, Workload, candidate_layouts, plan_layouts
from train.config import load_config

__all__ = ["main", "format_plans"]

GIB = 2**30


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_plans(plans: list[LayoutPlan]) -> str:
    """The plans as a text table, one layout per line."""
    header = (
        f"{'tp':>3} {'pp':>3} {'cp':>3} {'dp':>3}  {'fits':4}  {'bubble':>6}  {'memory/rank':>11}  "
        f"{'params':>9} {'grads':>9} {'optim':>9} {'activ':>9}  |  "
        + " ".join(f"{k:>10}" for k in TRAFFIC_KINDS)
        + f"  {'total/step':>10}"
    )
    lines = [header, "-" * len(header)]
    for plan in plans:
        lay, mem = plan.layout, plan.memory
        sent = [_size(plan.traffic[k]) if plan.traffic[k] else "-" for k in TRAFFIC_KINDS]
        lines.append(
            f"{lay.tp:>3} {lay.pp:>3} {lay.cp:>3} {lay.dp:>3}  {'yes' if plan.fits else 'no':4}  "
            f"{plan.bubble:>6.0%}  "
            f"{_size(mem.total):>11}  {_size(mem.params):>9} {_size(mem.grads):>9} "
            f"{_size(mem.optimizer):>9} {_size(mem.activations):>9}  |  "
            + " ".join(f"{s:>10}" for s in sent)
            + f"  {_size(plan.traffic_total):>10}"
        )
    return "\n".join(lines)


def _as_json(plans: list[LayoutPlan]) -> list[dict]:
    return [
        {
            "tp": p.layout.tp,
            "pp": p.layout.pp,
            "cp": p.layout.cp,
            "dp": p.layout.dp,
            "sequence_parallel": p.layout.sequence_parallel,
            "fits": p.fits,
            "pipeline_bubble": p.bubble,
            "memory_bytes": {
                "total": p.memory.total,
                "params": p.memory.params,
                "grads": p.memory.grads,
                "optimizer": p.memory.optimizer,
                "activations": p.memory.activations,
                "rank": p.memory.where,
            },
            "bytes_per_step": dict(p.traffic),
        }
        for p in plans
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__)
    parser.add_argument("--config", required=True, help="training YAML recipe")
    parser.add_argument("--gpus", type=int, required=True, help="ranks: tp * pp * cp * dp")
    parser.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    parser.add_argument(
        "--headroom", type=float, default=0.1,
        help="fraction of each GPU kept free for what the estimate leaves out (CUDA context, "
        "NCCL buffers, allocator fragmentation); default 0.1",
    )  # fmt: skip
    parser.add_argument("--sort", choices=("traffic", "memory"), default="traffic")
    parser.add_argument("--top", type=int, default=0, help="print only the first N (0: all)")
    parser.add_argument("--json", default=None, help="also write the plans to this JSON file")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        if not args.gpu_memory > 0:
            raise ValueError(f"--gpu-memory={args.gpu_memory} must be positive (GiB)")
        cfg = load_config(args.config, args.overrides)
        t = cfg.train
        work = Workload(
            t.seq_len, t.micro_batch_size, t.grad_accum, cfg.optim.precision,
            cfg.parallel.sequence_parallel, local_engine=t.engine in ("auto", "local"),
        )  # fmt: skip
        plans = plan_layouts(
            cfg.model, cfg.attention, work, args.gpus, args.gpu_memory * GIB, args.headroom,
            args.sort,
        )  # fmt: skip
        refused = candidate_layouts(cfg.model, cfg.attention, work, args.gpus)[1]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    usable = (1 - args.headroom) * args.gpu_memory
    engine = "Megatron-core" if args.gpus > 1 or not work.local_engine else "local"
    print(
        f"{args.config} (model.arch {cfg.model.arch}): {args.gpus} GPUs of {args.gpu_memory:g} "
        f"GiB ({usable:.3g} GiB usable), "
        f"seq_len {t.seq_len}, micro-batch {t.micro_batch_size} x {t.grad_accum} per data rank, "
        f"{cfg.optim.precision}, recompute {'on' if cfg.model.recompute else 'off'}, "
        f"{engine} engine; the most loaded rank of each layout, bytes sent per optimizer "
        f"step; fitting first, then by {'bytes' if args.sort == 'traffic' else 'memory'}"
    )
    if t.engine == "deepspeed":
        print("note: the recipe uses DeepSpeed; the estimates model Megatron-core's engine")
    shown = plans[: args.top] if args.top > 0 else plans
    print(format_plans(shown))
    fitting = sum(p.fits for p in plans)
    print(
        f"{fitting} of {len(plans)} layouts fit"
        + (", refused by the split rules:" if refused else "")
    )
    for reason in refused:
        print(f"  {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(_as_json(plans), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
