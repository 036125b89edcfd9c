"""What the training loop logs per step: throughput, MFU, the step-time split, memory, traffic.

    meter = StepMeter.create(cfg.model, cfg.attention, cfg.train, cfg.logging.peak_tflops,
                             device, world=8, dp_size=2, traffic=engine.traffic)
    meter.add(stats, data_s=0.01, step_s=0.52, checkpoint_s=0.0)   # after every step
    metrics.log(step, meter.flush())          # means over the steps since the last flush

Keys of `flush()` (per step: the mean over the steps of the logging window, this rank's view;
rank 0 logs them):
- train/loss, train/lr, train/grad_norm: the window's last step (grad_norm NaN when skipped).
- train/tokens_per_s: loss-carrying tokens of the whole run (all data-parallel ranks) per
  second of training (step time without checkpointing).
- perf/samples_per_s: sequences per second, all data-parallel ranks.
- perf/tflops_per_s, perf/mfu: sparse-aware training FLOPs (train.flops: the attention pairs
  the pattern allows, not N^2) of every token processed, per second; MFU divides the per-device
  rate by the peak (logging.peak_tflops, else the known GPU peak, else the best of timed
  matmuls at the model's working size, train.flops.working_matmuls).
- time/step_s: wall time of a step, from asking for its data to the end of its checkpoint
  (validation excluded); time/data_s (waiting for the batches), time/fwd_bwd_s,
  time/optimizer_s (the engine's StepStats), time/checkpoint_s (0 on steps without one) and
  time/other_s (the rest: logging, the stop agreement) add up to it.
- mem/peak_gib: peak memory over the window: CUDA max_memory_allocated, else the process's
  peak resident set (train.memory.PeakMemory).
- comm/{halo,global,random,pool}_bytes and comm/{halo,global,random,pool}_s: bytes this rank
  sent and seconds it was blocked in the context-parallel exchanges, forward and backward, all
  layers (parallel.traffic; global includes the merge of the global queries' partials); only
  with cp>1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from parallel.traffic import TrafficCounter
from train.engine import StepStats
from train.flops import MFUMeter
from train.memory import PeakMemory

__all__ = ["StepMeter", "TIME_PARTS", "COMM_KINDS", "render_run_pattern"]

TIME_PARTS = ("data_s", "fwd_bwd_s", "optimizer_s", "checkpoint_s")
"""The parts of time/step_s that are measured (time/other_s is the rest)."""
COMM_KINDS = {
    "halo": ("halo",),
    "global": ("global", "global_merge"),
    "random": ("random",),
    "pool": ("pool",),
}
"""Logged traffic kinds and the parallel.traffic kinds each sums."""

GIB = 1024**3


@dataclass
class StepMeter:
    """Accumulates the steps of one logging window; `flush` turns them into metrics."""

    mfu: MFUMeter
    tokens_per_step: int
    """Tokens processed per step by all ranks together (padding included)."""
    samples_per_step: int
    """Sequences per step, all data-parallel ranks."""
    n_devices: int
    memory: PeakMemory
    traffic: TrafficCounter | None = None
    _steps: int = 0
    _loss_tokens: int = 0
    _sums: dict[str, float] = field(default_factory=dict)
    _last: StepStats | None = None

    @classmethod
    def create(
        cls,
        model_args: ModelArgs,
        attn_cfg: SparsityConfig,
        seq_len: int,
        sequences_per_rank: int,
        peak_tflops: float | None,
        device: torch.device,
        world: int,
        dp_size: int,
        traffic: TrafficCounter | None = None,
    ) -> StepMeter:
        """`sequences_per_rank`: micro_batch_size * grad_accum of one data-parallel rank."""
        peak = None if peak_tflops is None else peak_tflops * 1e12
        tokens = sequences_per_rank * seq_len  # the measured peak's matmul size (capped)
        mfu = MFUMeter.create(model_args, attn_cfg, seq_len, peak, device, tokens)
        samples = sequences_per_rank * dp_size
        if traffic is not None:
            traffic.reset()
        return cls(mfu, samples * seq_len, samples, world, PeakMemory(device), traffic)

    def add(self, stats: StepStats, data_s: float, step_s: float, checkpoint_s: float) -> None:
        parts = {
            "data_s": data_s,
            "fwd_bwd_s": stats.fwd_bwd_s,
            "optimizer_s": stats.optimizer_s,
            "checkpoint_s": checkpoint_s,
            "step_s": step_s,
        }
        for key, value in parts.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._steps += 1
        self._loss_tokens += stats.n_tokens
        self._last = stats

    def flush(self) -> dict[str, float]:
        """The window's metrics (module docstring); starts a new window. Empty without steps."""
        if self._steps == 0 or self._last is None:
            return {}
        n, sums, last = self._steps, self._sums, self._last
        train_s = max(sums["step_s"] - sums["checkpoint_s"], 1e-9)
        out = {
            "train/loss": last.loss,
            "train/lr": last.lr,
            "train/grad_norm": last.grad_norm,
            "train/tokens_per_s": self._loss_tokens / train_s,
            "perf/samples_per_s": self.samples_per_step * n / train_s,
            **self.mfu.metrics(self.tokens_per_step * n, train_s, self.n_devices),
            "time/step_s": sums["step_s"] / n,
            **{f"time/{part}": sums[part] / n for part in TIME_PARTS},
            "time/other_s": max(0.0, sums["step_s"] - sum(sums[p] for p in TIME_PARTS)) / n,
            "mem/peak_gib": self.memory.read_bytes() / GIB,
        }
        if self.traffic is not None:
            sent, blocked = self.traffic.bytes_by_kind(), self.traffic.seconds_by_kind()
            for name, kinds in COMM_KINDS.items():
                out[f"comm/{name}_bytes"] = sum(sent[k] for k in kinds) / n
                out[f"comm/{name}_s"] = sum(blocked[k] for k in kinds) / n
            self.traffic.reset()
        self._steps, self._loss_tokens, self._sums = 0, 0, {}
        return out


def render_run_pattern(
    model_args: ModelArgs,
    attn_cfg: SparsityConfig,
    seq_len: int,
    cp: int,
    bytes_per_value: int,
    out: str | Path,
) -> Path:
    """parallel.show's picture of the run's pattern (layer 0, head 0, the first random draw;
    with attention.layers every layer's, one panel each) split over its `cp` ranks, with the
    bytes per rank; what the loop attaches to wandb."""
    from parallel.show import describe_pattern, render_layers, render_pattern

    n_heads, head_dim, n_layers = model_args.n_heads, model_args.head_dim, model_args.n_layers
    if attn_cfg.layers:
        return render_layers(
            attn_cfg, n_layers, seq_len, cp, n_heads, head_dim, out,
            bytes_per_value=bytes_per_value, title=f"N={seq_len}, cp={cp}, head 0",
        )  # fmt: skip
    title = f"N={seq_len}, {describe_pattern(attn_cfg)}; cp={cp}, layer 0, head 0"
    return render_pattern(
        attn_cfg, seq_len, cp, n_heads, head_dim, out,
        bytes_per_value=bytes_per_value, title=title,
    )  # fmt: skip
