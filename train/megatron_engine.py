"""The Megatron-core engine: tensor, pipeline, context and data parallelism behind `Engine`.

    layout = Layout.create(cfg.parallel, world_size, cfg.model, cfg.attention, cfg.train.seq_len)
    groups = layout.initialize()                 # after torch.distributed.init_process_group
    engine = MegatronEngine(cfg.model, cfg.attention, layout, groups, cfg.optim, cfg.schedule,
                            total_steps=cfg.train.steps, seed=cfg.train.seed)
    stats = engine.train_step(micro_batches, step)   # this data-parallel rank's full sequences

The stage (parallel.parallel_transformer) is wrapped in Megatron-core's DistributedDataParallel
(contiguous fp32 gradient buffers) and stepped by its DistributedOptimizer (AdamW on this data
rank's shard of the parameters, then an all-gather), or its plain data-parallel optimizer with
`distributed_optimizer=False`. A step: shard every micro-batch along the sequence for this cp
rank (the step boundary), run Megatron's forward/backward schedule
(`get_forward_backward_func`: no pipelining for pp=1, 1F1B otherwise) with summed losses and
token counts (`calculate_per_token_loss`), and let `finalize_model_grads` sum the gradients
over the data x context group, all-reduce the tied embedding between the first and last stage
and divide by the tokens of the whole step; the optimizer clips by the global norm and updates.
Learning rate and weight decay follow train.engine's schedule (lr_at), set on Megatron's
parameter groups each step. The result equals the single-process `LocalEngine` step on the
concatenated micro-batches of all data-parallel ranks (tests/distributed/test_megatron_parity.py).
Switches:
- `optim.precision="bf16"`: the stage's parameters, activations and gradients are bf16; DDP
  accumulates and reduces the gradients in an fp32 buffer (`grad_reduce_in_fp32`) and Megatron's
  mixed-precision optimizer (OptimizerConfig(bf16=True)) steps fp32 master weights (with the
  DistributedOptimizer: this rank's shard of them) and copies them back to the bf16
  parameters. No loss scaling (bf16 has fp32's exponent range). The fp32 master weights are
  part of `state_dict`, so a resume continues exactly.
- `model.recompute`: every block is an activation checkpoint (model.transformer.run_blocks).
- `parallel.sequence_parallel` (`layout.sequence_parallel`): Megatron's tensor-parallel
  sequence parallelism, wired in the stage (parallel.parallel_transformer): activations outside
  the tp regions are split along the sequence over tp, the pipeline sends [n/tp, b, c] and
  finalize_model_grads sums the norms' gradients over tp. Same result as without it (parity
  tested with tp, tp x cp, tp x pp); the parameter shards are the same either way. It
  uses our own RMSNorm: neither Apex nor Transformer Engine is needed.
On CPU, parallel.megatron_shims stands in for the CUDA calls; with `device="cuda"` (and an
NCCL process group) the stage and the batches are moved to the GPU, which this slice has not
run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from torch import nn

from model.sparse import SparsityConfig
from model.transformer import ModelArgs, Transformer
from parallel.layout import Layout, ParallelGroups, shard_sequence
from parallel.megatron_shims import apply_cpu_shims, cuda_typed_parameters
from parallel.parallel_transformer import ParallelTransformer, parallel_lm_loss
from parallel.traffic import TrafficCounter
from train.engine import (
    Engine,
    OptimArgs,
    ScheduleArgs,
    StepStats,
    lr_at,
    nonfinite_on_any_rank,
    sync_clock,
)
from train.preemption import injected_nan

__all__ = ["MegatronEngine"]

STATE_VERSION = 1


class MegatronEngine:
    """One rank's share of a tp x pp x cp x dp training step; implements train.engine.Engine.

    `model` is the DistributedDataParallel-wrapped stage, `stage` the ParallelTransformer.
    """

    def __init__(
        self,
        model_args: ModelArgs,
        attn_cfg: SparsityConfig,
        layout: Layout,
        groups: ParallelGroups,
        optim: OptimArgs,
        schedule: ScheduleArgs,
        total_steps: int,
        seed: int = 0,
        full: Transformer | None = None,
        distributed_optimizer: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        apply_cpu_shims()
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # Megatron-LM's seeding: the tracker's model-parallel state differs per tp rank
            # (dropout inside tp regions); checkpoints save it (train.run_setup.rng_state).
            model_parallel_cuda_manual_seed(seed)
        self.layout = layout
        self.groups = groups
        self.optim_args = optim
        self.schedule_args = schedule
        self.total_steps = total_steps
        self.precision = optim.precision
        self.traffic = TrafficCounter() if layout.cp > 1 else None
        """Bytes and time of the context-parallel exchanges (None without cp)."""
        self.stage = ParallelTransformer(
            model_args, attn_cfg, layout, groups, seed, full, params_dtype=optim.dtype,
            traffic=self.traffic,
        )  # fmt: skip
        self.stage.to(self.device)  # before DDP builds its buffers on the parameters' device
        cuda_typed_parameters(self.stage)
        config = self.stage.config
        self.ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
            ),
            module=self.stage,
        )
        self.model: nn.Module = self.ddp
        config.no_sync_func = self.ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.betas[0],
                adam_beta2=optim.betas[1],
                adam_eps=optim.eps,
                clip_grad=optim.grad_clip,
                use_distributed_optimizer=distributed_optimizer,
                # bf16: Megatron's mixed-precision optimizer keeps fp32 master copies of the
                # bf16 parameters (DistributedOptimizer: of this rank's shard) and steps those.
                bf16=optim.precision == "bf16",
                params_dtype=optim.dtype,
            ),
            [self.ddp],
            use_gloo_process_groups=False,
        )

    # ---- the step ----------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepStats:
        t0 = sync_clock(self.device)
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self._set_lr(step)
        local = [self._local(b) for b in micro_batches]
        loss_sum, n_tokens = self._run_schedule(local, micro_batches, step, forward_only=False)
        t1 = sync_clock(self.device)
        # Before optimizer.step: a NaN/Inf step leaves parameters and optimizer state alone
        # (the gradient buffers are zeroed at the start of the next step).
        skipped = nonfinite_on_any_rank(loss_sum, self.device)
        grad_norm = None
        if not skipped:
            _, grad_norm, _ = self.optimizer.step()
        return StepStats(
            loss=loss_sum / max(n_tokens, 1.0),
            n_tokens=int(n_tokens),
            grad_norm=math.nan if grad_norm is None else float(grad_norm),
            lr=lr,
            fwd_bwd_s=t1 - t0,
            optimizer_s=sync_clock(self.device) - t1,
            skipped=skipped,
        )

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(summed loss, tokens) of `batch` over every cp slice and dp rank (each dp rank passes
        its own batch); step=0 fixes the random-block draw."""
        self.model.eval()
        local = [self._local(batch)]
        loss_sum, n_tokens = self._run_schedule(local, [batch], 0, forward_only=True)
        return loss_sum, int(n_tokens)

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This cp rank's slice of `batch` (the step boundary), on the engine's device."""
        local = shard_sequence(batch, self.groups.cp_rank, self.layout.cp)
        return {k: v.to(self.device, non_blocking=True) for k, v in local.items()}

    def _set_lr(self, step: int) -> float:
        """lr_at(step) and the weight decay on Megatron's parameter groups, scaled by their
        lr_mult / wd_mult (0 for norms) as Megatron's own scheduler does."""
        lr = lr_at(step, self.optim_args, self.schedule_args, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.optim_args.weight_decay * group.get("wd_mult", 1.0)
        return lr

    def _run_schedule(
        self,
        local: list[dict[str, torch.Tensor]],
        full: list[dict[str, torch.Tensor]],
        step: int,
        forward_only: bool,
    ) -> tuple[float, float]:
        """Megatron's forward/backward over the micro-batches; the summed loss and tokens of
        the whole step (all stages, cp slices and dp ranks)."""
        stage = self.stage

        def forward_step(data_iterator: Any, model: nn.Module) -> tuple[torch.Tensor, Any]:
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], step, batch.get("padding_mask"))

            def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
                loss_sum, count = parallel_lm_loss(
                    logits, batch["labels"], batch["loss_mask"], stage
                )
                if not forward_only and injected_nan(step + 1):
                    loss_sum = loss_sum * math.nan
                return loss_sum, count.int(), {"loss_sum": loss_sum.detach(), "count": count}

            return output, loss_func

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(local),
            model=[self.ddp],
            num_microbatches=len(local),
            seq_length=full[0]["tokens"].shape[1],
            micro_batch_size=full[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for out in outputs:  # only the last stage has any
            totals += torch.stack([out["loss_sum"], out["count"]]).double()
        if self.groups.dp_cp.size() > 1:
            dist.all_reduce(totals, group=self.groups.dp_cp)
        if self.layout.pp > 1:
            dist.all_reduce(totals, group=self.groups.pp)
        return float(totals[0]), float(totals[1])

    # ---- state -------------------------------------------------------------------------------

    def _layout_key(self) -> list[int]:
        return [self.layout.tp, self.layout.pp, self.layout.cp, self.layout.dp]

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch AdamW instances inside Megatron's (chained) optimizer, one per group of
        parameters, each over this rank's shards."""
        chained = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [opt.optimizer for opt in chained]

    def _master_params(self) -> list[list[list[torch.Tensor]]]:
        """bf16: the fp32 master copies Megatron's mixed-precision optimizer steps, per
        optimizer and parameter group (DistributedOptimizer: this rank's shards); fp32: none
        (the optimizer steps the model's own parameters)."""
        chained = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        masters = []
        for opt in chained:
            groups = getattr(opt, "shard_fp32_from_float16_groups", None)
            if groups is None:
                groups = getattr(opt, "fp32_from_float16_groups", [])
            masters.append(groups)
        return masters

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards: the stage's parameters, the AdamW state of the parameter shards
        it updates and, in bf16, their fp32 master weights, with the layout and precision they
        belong to (resume needs the same)."""
        return {
            "version": STATE_VERSION,
            "layout": self._layout_key(),
            "precision": self.precision,
            "model": self.stage.state_dict(),
            "optimizer": [opt.state_dict() for opt in self._torch_optimizers()],
            "master_params": [
                [[p.detach().clone() for p in group] for group in groups]
                for groups in self._master_params()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"engine state version {state.get('version')!r} is not {STATE_VERSION}; "
                "it was written by another version of the Megatron engine"
            )
        if state["layout"] != self._layout_key():
            raise ValueError(
                f"the checkpoint was written with parallel (tp, pp, cp, dp) = {state['layout']} "
                f"but this run uses {self._layout_key()}; this per-rank state loads only under its "
                "own layout (checkpoints reshard through sharded_state_dict)"
            )
        precision = state.get("precision", "fp32")
        if precision != self.precision:
            raise ValueError(
                f"the checkpoint was written with optim.precision={precision!r} but this run "
                f"uses {self.precision!r}; changing precision on resume is not supported"
            )
        self.stage.load_state_dict(state["model"])
        if "master_params" in state:  # absent from fp32 states written before bf16 existed
            self._load_master_params(state["master_params"])
        optimizers = self._torch_optimizers()
        if len(optimizers) != len(state["optimizer"]):
            raise ValueError(
                f"the checkpoint holds {len(state['optimizer'])} optimizer states, this run "
                f"has {len(optimizers)}: it was written with other optimizer settings"
            )
        for opt, opt_state in zip(optimizers, state["optimizer"], strict=True):
            opt.load_state_dict(opt_state)

    def sharded_state_dict(self) -> dict[str, Any]:
        """The checkpoint state: parameters and AdamW state in the single-process model's
        names and shapes (train.model_space), which any other layout loads. Collective."""
        from train.model_space import megatron_sharded_state

        return megatron_sharded_state(self)

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Load a `sharded_state_dict` saved under any layout (via CheckpointManager)."""
        from train.model_space import load_megatron_sharded_state

        load_megatron_sharded_state(self, state)

    @torch.no_grad()
    def _load_master_params(self, saved: list[list[list[torch.Tensor]]]) -> None:
        masters = self._master_params()
        shapes = [[[p.shape for p in g] for g in groups] for groups in masters]
        if shapes != [[[p.shape for p in g] for g in groups] for groups in saved]:
            raise ValueError(
                "the checkpoint's fp32 master weights do not match this run's optimizer "
                "shards: it was written with other optimizer settings"
            )
        for groups, saved_groups in zip(masters, saved, strict=True):
            for group, saved_group in zip(groups, saved_groups, strict=True):
                for param, value in zip(group, saved_group, strict=True):
                    param.copy_(value)


if TYPE_CHECKING:  # mypy checks that the loop can use this engine where it takes an Engine
    _implements_engine: type[Engine] = MegatronEngine
