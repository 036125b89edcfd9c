"""The training engine seam: one optimizer step (forward, backward, clip, update, schedule).

    engine = LocalEngine(model, OptimArgs(lr=3e-3), ScheduleArgs(warmup_steps=10), total_steps=100)
    stats = engine.train_step([batch], step=0)       # StepStats(loss, n_tokens, grad_norm, lr, ...)
    loss_sum, n_tokens = engine.eval_step(batch)

The loop talks to an `Engine` only, so that Megatron-core DDP with its distributed optimizer
(issue 5) and DeepSpeed ZeRO (issue 8) can replace `LocalEngine` (single process, torch AdamW)
without touching the loop. Losses are token-weighted: every micro-batch contributes its summed
loss divided by the tokens of the whole step, so accumulation (and, later, data-parallel
averaging) gives the same gradient as one big batch.

A step whose loss is NaN or Inf on any rank is skipped by every engine: no parameter or
optimizer-state change (the learning-rate schedule still advances, it follows the step number),
`StepStats.skipped` set. The decision is `nonfinite_on_any_rank`, a collective over the whole
world, because with pipeline parallelism only the last stage holds the loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from model.transformer import lm_loss
from train.preemption import injected_nan

__all__ = [
    "PRECISIONS",
    "OptimArgs",
    "ScheduleArgs",
    "StepStats",
    "Engine",
    "LocalEngine",
    "lr_at",
    "nonfinite_on_any_rank",
    "sync_clock",
    "NonFiniteLossError",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""optim.precision values and their dtypes."""


@dataclass
class OptimArgs:
    """AdamW and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's (beta1, beta2)."""
    weight_decay: float = 0.1
    """Decoupled weight decay; applied to matrices (linear and embedding weights) only."""
    eps: float = 1e-8
    """Adam's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: str = "fp32"
    """"fp32" or "bf16". Megatron engine: bf16 parameters, activations and gradients, gradients
    accumulated and reduced in an fp32 buffer, AdamW on fp32 master weights (Megatron's mixed
    precision optimizer; no loss scaling, bf16 has fp32's range). Local engine: fp32
    parameters and optimizer with the forward under torch.autocast(bfloat16) (bf16 matmuls).
    Either way the attention's softmax runs in fp32."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr!r} must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay!r} must be >= 0")
        if not self.eps > 0:
            raise ValueError(f"optim.eps={self.eps!r} must be positive")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip!r} must be >= 0 (0 = off)")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"optim.precision={self.precision!r} must be one of {', '.join(PRECISIONS)}"
            )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of `precision`."""
        return PRECISIONS[self.precision]


@dataclass
class ScheduleArgs:
    """Learning-rate schedule: linear warmup, then cosine decay to `min_lr`."""

    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps to optim.lr."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay (and after it); at most optim.lr."""
    decay_steps: int | None = None
    """Step at which the decay reaches min_lr; null means train.steps."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.min_lr < 0:
            raise ValueError(f"schedule.min_lr={self.min_lr!r} must be >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"schedule.decay_steps={self.decay_steps!r} must be positive")


def lr_at(step: int, optim: OptimArgs, schedule: ScheduleArgs, total_steps: int) -> float:
    """Learning rate used by optimizer step `step` (0-based)."""
    if step < schedule.warmup_steps:
        return optim.lr * (step + 1) / schedule.warmup_steps
    end = schedule.decay_steps or total_steps
    span = max(1, end - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return schedule.min_lr + (optim.lr - schedule.min_lr) * cosine


@dataclass
class StepStats:
    loss: float
    """Token-weighted mean training loss of the step."""
    n_tokens: int
    """Tokens that carried loss in the step."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate the step used."""
    fwd_bwd_s: float = 0.0
    """Seconds of forward and backward over every micro-batch, gradient reduction included
    (Megatron: the whole forward/backward schedule, pipeline transfers and finalize_model_grads)."""
    optimizer_s: float = 0.0
    """Seconds of the non-finite check, clipping and the optimizer update."""
    skipped: bool = False
    """The loss was NaN or Inf on some rank: no parameter or optimizer state changed."""


class Engine(Protocol):
    """What the loop needs from a training engine."""

    model: nn.Module

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepStats:
        """Forward and backward every micro-batch, then one optimizer step."""
        ...

    def eval_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(summed loss, tokens) of one batch without gradients, with a fixed random draw."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """train.max_nan_skips consecutive steps had a NaN/Inf loss; the run stopped after a
    checkpoint (the message names the steps)."""


def sync_clock(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work is done (CUDA runs asynchronously,
    so a phase's time is only its own once the device has caught up)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def nonfinite_on_any_rank(value: float, device: torch.device) -> bool:
    """Whether `value` (a loss) is NaN or Inf on this or any other rank of the world: the same
    answer everywhere, so that every rank skips the same optimizer steps (a collective)."""
    bad = not math.isfinite(value)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces device tensors only.
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if bad else 0.0], device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item() > 0)
    return bad


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():  # deduplicated, so a tied weight appears once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class LocalEngine:
    """Single-process engine: torch AdamW, global-norm clipping, warmup + cosine schedule.

    With optim.precision="bf16" the forward runs under torch.autocast(bfloat16) (on CPU too);
    parameters, gradients and the AdamW state stay fp32, so there are no separate master
    weights here, unlike the Megatron engine (bf16 parameters, fp32 master copies)."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimArgs,
        schedule: ScheduleArgs,
        total_steps: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optim_args = optim
        self.grad_clip = optim.grad_clip
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, optim.weight_decay),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, optim, schedule, total_steps) / optim.lr
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        bf16 = self.optim_args.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = self.model(batch["tokens"], batch["position_ids"], step=step)
        loss_sum, count = lm_loss(logits, batch["labels"], batch["loss_mask"])
        if self.model.training and injected_nan(step + 1):
            loss_sum = loss_sum * math.nan
        return loss_sum, count

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepStats:
        t0 = sync_clock(self.device)
        self.model.train()
        micro_batches = [self._to_device(b) for b in micro_batches]
        n_tokens = sum(float(b["loss_mask"].sum()) for b in micro_batches)
        denom = max(n_tokens, 1.0)
        lr = self.optimizer.param_groups[0]["lr"]
        total = 0.0
        for batch in micro_batches:
            loss_sum, _ = self._loss(batch, step)
            (loss_sum / denom).backward()
            total += float(loss_sum.detach())
        t1 = sync_clock(self.device)
        skipped = nonfinite_on_any_rank(total, self.device)
        grad_norm = math.nan
        if not skipped:
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepStats(
            loss=total / denom,
            n_tokens=int(n_tokens),
            grad_norm=grad_norm,
            lr=lr,
            fwd_bwd_s=t1 - t0,
            optimizer_s=sync_clock(self.device) - t1,
            skipped=skipped,
        )

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        self.model.eval()
        # step=0: a fixed random-block draw, so validation losses are comparable over time.
        loss_sum, n_tokens = self._loss(self._to_device(batch), step=0)
        return float(loss_sum), int(n_tokens)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
