"""Per-rank body of the planner's memory check (module level so that spawned ranks import it).

`measure_rank` trains each `MemCase` for a few steps on random tokens and reports, per rank,
how much its peak resident memory grew over the process's baseline (the RSS after torch,
megatron-core and the process group are up and a tiny model has trained two steps,
measured just before the case's engine is built), its
parameters and, under cp, the bytes its attention exchanges sent per step. Used by
test_plan_memory.py, which compares them with parallel.plan's estimates.
"""

from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from train.memory import peak_kib, reset_peak, rss_kib

RECIPE = "configs/demo.yaml"
STEPS = 2
"""Two steps: the second one's peak has the Adam moments the first one created."""


@dataclass(frozen=True)
class MemCase:
    """One short training run: a layout of the recipe's model and the step's sizes."""

    name: str
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch_size: int = 2
    grad_accum: int = 1
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (tp > 1)."""
    local: bool = False
    """The local engine in one process (what the trainer runs without parallel degrees);
    else Megatron's engine on the case's layout."""
    overrides: tuple[str, ...] = ()
    """Recipe overrides (model size, recompute, the architecture)."""
    on_rank: int = 0
    """Local cases: the rank that runs it (two of them run side by side)."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def layout(self) -> Any:
        from parallel.layout import Layout

        return Layout(self.tp, self.pp, self.cp, self.dp, self.sequence_parallel)

    def config(self) -> Any:
        from train.config import load_config

        return load_config(RECIPE, list(self.overrides))


@dataclass
class Measured:
    case: MemCase
    pp_rank: int
    cp_rank: int
    growth_bytes: int
    """Peak RSS during the steps minus the RSS just before the engine was built."""
    params: int
    """Parameter elements of this rank's stage (the tied embedding counted once)."""
    cp_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes sent per step by this rank's attention exchanges, by kind (cp > 1)."""
    seconds: float = 0.0
    """Wall time of the case (engine and steps)."""


def _release() -> None:
    """Free what the previous case left, and hand glibc's free pages back to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _batches(vocab: int, case: MemCase, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS * case.grad_accum):
        shape = (case.micro_batch_size, seq_len)
        tokens = torch.randint(0, vocab, shape, generator=gen)
        out.append(
            dict(
                tokens=tokens,
                labels=torch.roll(tokens, -1, 1),
                loss_mask=torch.ones(shape),
                position_ids=torch.arange(seq_len).expand(shape).contiguous(),
            )
        )
    return out


def _run(case: MemCase) -> Measured:
    from model.registry import build_model
    from parallel.layout import Layout
    from train.engine import LocalEngine, ScheduleArgs
    from train.megatron_engine import MegatronEngine

    cfg = case.config()
    optim = replace(cfg.optim, precision="fp32")
    schedule = ScheduleArgs(warmup_steps=1, min_lr=cfg.schedule.min_lr)
    layout, groups = None, None
    if not case.local:
        layout = case.layout
        groups = layout.initialize()
    dp_rank = 0 if groups is None else groups.dp_rank
    data = _batches(cfg.model.vocab_size, case, cfg.train.seq_len, seed=dp_rank)
    _release()
    base = rss_kib()
    can_reset = reset_peak()
    start = time.perf_counter()
    engine: Any
    if layout is None or groups is None:
        engine = LocalEngine(build_model(cfg.model, cfg.attention, seed=0), optim, schedule, STEPS)
    else:
        engine = MegatronEngine(cfg.model, cfg.attention, layout, groups, optim, schedule, STEPS)
    for step in range(STEPS):
        chunk = data[step * case.grad_accum : (step + 1) * case.grad_accum]
        engine.train_step(chunk, step)
    growth = 1024 * (peak_kib(can_reset) - base)
    seconds = time.perf_counter() - start
    stage = engine.model if layout is None else engine.stage
    params = sum(p.numel() for p in stage.parameters())
    traffic = getattr(engine, "traffic", None)
    cp_bytes = {}
    if traffic is not None:
        cp_bytes = {k: v // STEPS for k, v in traffic.bytes_by_kind().items()}
    coords = (0, 0) if groups is None else (groups.pp_rank, groups.cp_rank)
    del engine, stage
    if layout is not None:
        Layout.destroy()
    _release()
    return Measured(case, coords[0], coords[1], growth, params, cp_bytes, seconds)


def _warm_up() -> None:
    """Two steps of a tiny model under the local engine, on every rank: what torch loads or
    allocates on the first optimizer step (about 20-70 MiB of resident memory) becomes part
    of the process baseline instead of the first case's growth. (Megatron's engine showed no
    such first-use growth here: the first layout's ratio is the same either way.)"""
    _run(MemCase("warm-up", local=True, micro_batch_size=1, overrides=_TINY))


_TINY = ("model.d_model=32", "model.n_layers=2", "model.vocab_size=256", "train.seq_len=256")


def measure_rank(rank: int, world: int, cases: list[MemCase]) -> list[Measured]:
    """Run every case this rank takes part in, in order, after a warm-up: the layouts of
    `world` ranks on every rank, a local case on its `on_rank` (two local cases run side by
    side, one per rank, with the same steps: LocalEngine's NaN check all-reduces over the
    world)."""
    torch.set_num_threads(1)
    _warm_up()
    out = []
    for case in cases:
        if case.local and case.on_rank == rank:
            out.append(_run(case))
        elif not case.local:
            if case.world != world:
                raise ValueError(f"{case.name} needs {case.world} ranks, not {world}")
            out.append(_run(case))
    return out
