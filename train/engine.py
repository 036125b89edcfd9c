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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.transformer import lm_loss
from parallel.layout import shard_sequence
from train.model_space import load_local_sharded_state, local_sharded_state
from train.preemption import injected_nan

__all__ = [
    "PRECISIONS",
    "OptimArgs",
    "ScheduleArgs",
    "StepStats",
    "Engine",
    "LocalEngine",
    "engine_tag",
    "lr_at",
    "nonfinite_on_any_rank",
    "sync_clock",
    "NonFiniteLossError",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
HOST_KEYS = ("padding_mask", "global_mask")
"""Batch entries kept on the host: the attention masks, which only the attention plans read."""
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
        for name in ("lr", "weight_decay", "eps", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value):  # inf passes `> 0` and trains to NaN
                raise ValueError(f"optim.{name}={value!r} must be a finite number")
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
        if not math.isfinite(self.min_lr):
            raise ValueError(f"schedule.min_lr={self.min_lr!r} must be a finite number")
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


class Engine:
    """The seam between the loop and a way of training (one process, Megatron-core, DeepSpeed).

    The base owns what every engine shares: the learning rate (lr_at, set on the optimizer's
    parameter groups every step, so no scheduler state is checkpointed), this rank's slice of
    the sequence (`to_local`, the step boundary), the token count of the whole step, the
    NaN/Inf skip agreed by all ranks, and the timing of the step's phases. A subclass
    implements only what differs: `forward_backward`, `forward_only`, `update`, the optimizer's
    `param_groups`, and its checkpoint state (`state_dict` / `load_state_dict`).
    """

    model: nn.Module
    device: torch.device

    def __init__(
        self,
        optim: OptimArgs,
        schedule: ScheduleArgs,
        total_steps: int,
        device: torch.device | str = "cpu",
        cp_rank: int = 0,
        cp: int = 1,
        token_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.optim_args, self.schedule_args, self.total_steps = optim, schedule, total_steps
        self.device = torch.device(device)
        self.cp_rank, self.cp = cp_rank, cp
        self.token_group = token_group
        """The ranks whose tokens make up one step (data x context); None: this process."""
        self.checkpoint_dir: Path | None = None
        """Where an engine that writes its own files (DeepSpeed) puts them; set by the loop."""
        self.steps_done = 0
        """Optimizer steps taken (skipped ones included): the step a checkpoint belongs to."""

    # ---- the step, the same for every engine -------------------------------------------------

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepStats:
        """Forward and backward every micro-batch of this rank, then one optimizer step."""
        t0 = sync_clock(self.device)
        self.model.train()
        lr = self.set_lr(step)
        local = [self.to_local(b) for b in micro_batches]
        n_tokens = self.count_tokens(local)
        loss_sum = self.forward_backward(local, step, n_tokens)
        t1 = sync_clock(self.device)
        # Before the update: a NaN/Inf step leaves parameters and optimizer state alone.
        skipped = nonfinite_on_any_rank(loss_sum, self.device)
        grad_norm = self.update(skipped)
        self.steps_done = step + 1
        return StepStats(
            loss=loss_sum / max(n_tokens, 1.0),
            n_tokens=int(n_tokens),
            grad_norm=math.nan if skipped else grad_norm,
            lr=lr,
            fwd_bwd_s=t1 - t0,
            optimizer_s=sync_clock(self.device) - t1,
            skipped=skipped,
        )

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(summed loss, tokens) of one batch without gradients, over every cp slice and data
        rank (each data rank passes its own batch), with a fixed random draw (step 0, so that
        validation losses are comparable over time)."""
        self.model.eval()
        local = [self.to_local(batch)]
        return self.forward_only(local), int(self.count_tokens(local))

    def set_lr(self, step: int) -> float:
        """lr_at(step) on every parameter group, times the group's lr_mult where it has one
        (Megatron's groups); returns lr_at(step)."""
        lr = lr_at(step, self.optim_args, self.schedule_args, self.total_steps)
        for group in self.param_groups():
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def to_local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This cp rank's slice of `batch` along the sequence, on the engine's device; the
        attention masks stay on the host, where the attention plans from them (reading a
        device mask would be a host synchronisation in every layer)."""
        local = shard_sequence(batch, self.cp_rank, self.cp)
        return {
            k: v if k in HOST_KEYS else v.to(self.device, non_blocking=True)
            for k, v in local.items()
        }

    def count_tokens(self, local: list[dict[str, torch.Tensor]]) -> float:
        """Loss-carrying tokens of the whole step: this rank's slices summed over the token
        group (tensor and pipeline ranks hold the same tokens and are not counted again)."""
        (n,) = self.all_sum([sum(float(b["loss_mask"].sum()) for b in local)])
        return n

    def all_sum(self, values: list[float]) -> list[float]:
        """`values` summed over the token group."""
        if self.token_group is None or self.token_group.size() == 1:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals, group=self.token_group)
        return totals.tolist()

    @staticmethod
    def with_fault(loss_sum: torch.Tensor, step: int) -> torch.Tensor:
        """The training loss, made NaN at the step HALOTRON_INJECT_NAN names (tests)."""
        return loss_sum * math.nan if injected_nan(step + 1) else loss_sum

    # ---- what differs between engines --------------------------------------------------------

    def forward_backward(
        self, local: list[dict[str, torch.Tensor]], step: int, n_tokens: float
    ) -> float:
        """Forward and backward of this rank's micro-batches, each micro-batch's summed loss
        divided by `n_tokens` (the whole step's), so that the gradient is the token mean over
        every rank; returns the summed loss of the whole step (every rank)."""
        raise NotImplementedError

    def forward_only(self, local: list[dict[str, torch.Tensor]]) -> float:
        """The summed loss of the whole step (every rank), without gradients, with step 0's
        random draw."""
        raise NotImplementedError

    def update(self, skipped: bool) -> float:
        """Clip and step the optimizer unless `skipped`, and zero the gradients; the global
        gradient norm before clipping (anything when skipped)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (where the learning rate is set)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The engine's checkpoint state: parameters and optimizer state in model space
        (train.model_space: the single-process model's names and shapes, any layout loads
        them), or, for an engine with its own checkpoint files, their place."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def engine_tag(step: int) -> str:
    """The directory, under Engine.checkpoint_dir, of an engine's own checkpoint of `step`."""
    return f"step_{step:06d}"


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


class LocalEngine(Engine):
    """Single-process engine: torch AdamW and global-norm clipping on the whole model.

    With optim.precision="bf16" the forward runs under torch.autocast(bfloat16) (on CPU too);
    parameters, gradients and the AdamW state stay fp32, so there are no separate master
    weights here, unlike the Megatron engine (bf16 parameters, fp32 master copies). Its
    checkpoint state is in model space like the Megatron engine's, so either resumes the other.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimArgs,
        schedule: ScheduleArgs,
        total_steps: int,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(optim, schedule, total_steps, device)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, optim.weight_decay),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
        )

    def _loss(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        bf16 = self.optim_args.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = self.model(
                batch["tokens"],
                batch["position_ids"],
                step,
                batch.get("padding_mask"),
                batch.get("global_mask"),
            )
        return lm_loss(logits, batch["labels"], batch["loss_mask"])

    def forward_backward(
        self, local: list[dict[str, torch.Tensor]], step: int, n_tokens: float
    ) -> float:
        total = 0.0
        for batch in local:
            loss_sum = self.with_fault(self._loss(batch, step)[0], step)
            (loss_sum / max(n_tokens, 1.0)).backward()
            total += float(loss_sum.detach())
        return total

    def forward_only(self, local: list[dict[str, torch.Tensor]]) -> float:
        return sum(float(self._loss(batch, step=0)[0]) for batch in local)

    def update(self, skipped: bool) -> float:
        grad_norm = math.nan
        if not skipped:
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = self.optim_args.grad_clip if self.optim_args.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        return local_sharded_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_local_sharded_state(self, state)
