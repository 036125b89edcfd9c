"""Which TP x PP x CP x DP layouts of a model fit a number of GPUs: memory and traffic per rank.

    from parallel.plan import Workload, plan_layouts, estimate_memory, step_traffic
    work = Workload(seq_len=2048, micro_batch_size=4, grad_accum=1)
    plans = plan_layouts(cfg.model, cfg.attention, work, gpus=8, gpu_bytes=80 * 2**30)
    mem = estimate_memory(cfg.model, cfg.attention, work, Layout(tp=2, cp=2))   # worst rank
    traffic = step_traffic(cfg.model, cfg.attention, work, Layout(tp=2, cp=2))  # bytes by kind

    python -m train.plan --config configs/demo.yaml --gpus 8 --gpu-memory 80   # the table

A layout is listed when tp * pp * cp * dp = gpus and `check_split` accepts it (tp divides the
heads and the MLP width, pp the layers, cp x block the sequence). Each gets the per-rank memory
of the most loaded rank (pipeline stage, context rank) and the bytes that rank sends per
optimizer step, by kind. The engine is Megatron-core's (DDP, distributed optimizer; the
trainer's engine for every multi-rank layout); one rank is the local engine (torch AdamW).

The memory model is parallel/plan_memory.py, the traffic model parallel/plan_traffic.py (each
module's docstring says what it counts); this module lists and sorts the layouts.

Sorting (`plan_layouts`): layouts that fit first, by total bytes per step, then memory;
`sort="memory"` orders by memory first. Legend: d d_model, h MLP width, H heads, D head dim,
G global tokens, V padded vocabulary, T tokens of a micro-batch on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from parallel.layout import Layout, check_split
from parallel.plan_memory import (
    MemoryEstimate,
    Workload,
    check_modelled,
    end_activation_bytes,
    estimate_memory,
    layer_activation_bytes,
    rank_memory,
    stage_parameters,
)
from parallel.plan_traffic import TRAFFIC_KINDS, cp_traffic_by_rank, step_traffic

__all__ = [
    "TRAFFIC_KINDS", "Workload", "MemoryEstimate", "LayoutPlan", "stage_parameters",
    "layer_activation_bytes", "end_activation_bytes", "rank_memory", "estimate_memory",
    "cp_traffic_by_rank", "step_traffic", "candidate_layouts", "plan_layouts",
]  # fmt: skip


@dataclass(frozen=True)
class LayoutPlan:
    """One layout with its estimates."""

    layout: Layout
    memory: MemoryEstimate
    traffic: dict[str, int] = field(default_factory=dict)
    """Bytes sent per optimizer step by the most loaded rank of each kind (TRAFFIC_KINDS)."""
    fits: bool = True
    bubble: float = 0.0
    """The 1F1B pipeline's idle fraction, (pp - 1) / (grad_accum + pp - 1): shown, not
    sorted on (the planner does not model compute time)."""

    @property
    def traffic_total(self) -> int:
        return sum(self.traffic.values())


# ---- the search ------------------------------------------------------------------------------


def candidate_layouts(
    model: ModelArgs, attention: SparsityConfig, work: Workload, gpus: int
) -> tuple[list[Layout], list[str]]:
    """(the layouts of `gpus` ranks that check_split accepts, a reason for each refused one)."""
    if gpus < 1:
        raise ValueError(f"--gpus={gpus} must be a positive integer")
    divisors = [k for k in range(1, gpus + 1) if gpus % k == 0]
    layouts, refused = [], []
    for tp in divisors:
        for pp in divisors:
            for cp in divisors:
                if gpus % (tp * pp * cp):
                    continue
                sp = work.sequence_parallel and tp > 1
                try:
                    check_split(tp, pp, cp, sp, model, attention, work.seq_len)
                except ValueError as e:
                    refused.append(f"tp={tp} pp={pp} cp={cp}: {e}")
                    continue
                layouts.append(Layout(tp, pp, cp, gpus // (tp * pp * cp), sequence_parallel=sp))
    return layouts, refused


def plan_layouts(
    model: ModelArgs,
    attention: SparsityConfig,
    work: Workload,
    gpus: int,
    gpu_bytes: float,
    headroom: float = 0.1,
    sort: str = "traffic",
) -> list[LayoutPlan]:
    """Every accepted layout of `gpus` ranks with its worst rank's memory and traffic. A layout
    fits when its estimate is at most (1 - headroom) x gpu_bytes. Order: fitting ones first;
    then by total bytes per step and memory (sort="traffic") or memory and bytes
    (sort="memory")."""
    if sort not in ("traffic", "memory"):
        raise ValueError(f"--sort={sort!r} must be traffic or memory")
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom={headroom} must be in [0, 1)")
    check_modelled(model)
    budget = (1 - headroom) * gpu_bytes
    plans = []
    for layout in candidate_layouts(model, attention, work, gpus)[0]:
        memory = estimate_memory(model, attention, work, layout)
        traffic = step_traffic(model, attention, work, layout)
        bubble = (layout.pp - 1) / (work.grad_accum + layout.pp - 1)
        plans.append(LayoutPlan(layout, memory, traffic, memory.total <= budget, bubble))

    def key(plan: LayoutPlan) -> tuple:
        pair = (plan.traffic_total, plan.memory.total)
        return (not plan.fits, *(pair if sort == "traffic" else pair[::-1]))

    return sorted(plans, key=key)
