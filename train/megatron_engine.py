"""The Megatron-core engine: tensor, pipeline, context and data parallelism behind `Engine`.

    layout = Layout.create(cfg.parallel, world_size, cfg.model, cfg.attention, cfg.train.seq_len)
    groups = layout.initialize()                 # after torch.distributed.init_process_group
    engine = MegatronEngine(cfg.model, cfg.attention, layout, groups, cfg.optim, cfg.schedule,
                            total_steps=cfg.train.steps, seed=cfg.train.seed)
    stats = engine.train_step(micro_batches, step)   # this data-parallel rank's full sequences

The stage (`parallel.parallelize` of the single-process Transformer) is wrapped in
Megatron-core's DistributedDataParallel (contiguous fp32 gradient buffers) and stepped by its
DistributedOptimizer (AdamW on this data rank's shard of the parameters, then an all-gather),
or its plain data-parallel optimizer with `distributed_optimizer=False`. A step: shard every
micro-batch along the sequence for this cp rank (the step boundary), run Megatron's
forward/backward schedule
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
  sequence parallelism, wired in the stage's layers (parallel.tensor_parallel): activations outside
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
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from torch import nn

from model.registry import build_model
from model.sparse import SparsityConfig
from model.transformer import ModelArgs, Transformer
from parallel.layout import Layout, ParallelGroups
from parallel.megatron_shims import apply_cpu_shims, cuda_typed_parameters
from parallel.parallelize import parallelize
from parallel.tensor_parallel import parallel_lm_loss
from parallel.traffic import TrafficCounter
from train.engine import Engine, OptimArgs, ScheduleArgs
from train.model_space import load_megatron_sharded_state, megatron_sharded_state

__all__ = ["MegatronEngine"]


class MegatronEngine(Engine):
    """One rank's share of a tp x pp x cp x dp training step (train.engine.Engine owns the
    step's shared parts: learning rate, sequence slice, token count, NaN skip, timing).

    `model` is the DistributedDataParallel-wrapped stage, `stage` the ParallelStage
    (parallel.parallelize).
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
        super().__init__(
            optim, schedule, total_steps, device, groups.cp_rank, layout.cp, groups.dp_cp
        )
        apply_cpu_shims()
        if self.device.type == "cuda":
            # Megatron-LM's seeding: the tracker's model-parallel state differs per tp rank
            # (dropout inside tp regions); checkpoints save it (train.run_setup.rng_state).
            model_parallel_cuda_manual_seed(seed)
        self.layout = layout
        self.groups = groups
        self.precision = optim.precision
        self.traffic = TrafficCounter() if layout.cp > 1 else None
        """Bytes and time of the context-parallel exchanges (None without cp)."""
        model: nn.Module
        if full is not None:
            model = full
        else:  # each rank materialises only its shard (parallel.parallelize)
            with torch.device("meta"):
                model = build_model(model_args, attn_cfg, seed=seed)
        self.stage = parallelize(model, layout, groups, optim.dtype, self.traffic, seed)
        self.stage.to(self.device)  # before DDP builds its buffers on the parameters' device
        cuda_typed_parameters(self.stage)
        config = self.stage.config
        self.megatron_groups = groups.megatron()
        """Our groups as megatron-core's ProcessGroupCollection, passed to every megatron
        call that communicates (none of them reads parallel_state's globals)."""
        self.ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
            ),
            module=self.stage,
            pg_collection=self.megatron_groups,
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
            pg_collection=self.megatron_groups,
        )
        # The pipeline's sends and receives go over our pp group (pp > 1 only).
        self.p2p = P2PCommunicator(pp_group=groups.pp, config=config) if layout.pp > 1 else None

    # ---- what differs from the other engines (train.engine.Engine) --------------------------

    def forward_backward(
        self, local: list[dict[str, torch.Tensor]], step: int, n_tokens: float
    ) -> float:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self._run_schedule(local, step, forward_only=False)

    def forward_only(self, local: list[dict[str, torch.Tensor]]) -> float:
        return self._run_schedule(local, 0, forward_only=True)

    def update(self, skipped: bool) -> float:
        # A skipped step's gradients stay in the buffers until the next step zeroes them.
        if skipped:
            return math.nan
        _, grad_norm, _ = self.optimizer.step()
        return math.nan if grad_norm is None else float(grad_norm)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def set_lr(self, step: int) -> float:
        """The base's learning rate, and the weight decay times each group's wd_mult (0 for
        norms and biases), as Megatron's own scheduler sets them."""
        lr = super().set_lr(step)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.optim_args.weight_decay * group.get("wd_mult", 1.0)
        return lr

    def _run_schedule(
        self, local: list[dict[str, torch.Tensor]], step: int, forward_only: bool
    ) -> float:
        """Megatron's forward/backward over this rank's micro-batches (with summed losses and
        token counts, `calculate_per_token_loss`: finalize_model_grads divides the gradients
        by the step's tokens); the summed loss of the whole step (all stages, cp slices and dp
        ranks)."""
        vocab_size = self.stage.args.vocab_size

        def forward_step(data_iterator: Any, model: nn.Module) -> tuple[torch.Tensor, Any]:
            batch = next(data_iterator)
            output = model(
                batch["tokens"], batch["position_ids"], step, batch.get("padding_mask"),
                batch.get("global_mask"),
            )  # fmt: skip

            def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
                loss_sum, count = parallel_lm_loss(
                    logits, batch["labels"], batch["loss_mask"], vocab_size, self.groups.tp
                )
                if not forward_only:
                    loss_sum = self.with_fault(loss_sum, step)
                return loss_sum, count.int(), {"loss_sum": loss_sum.detach()}

            return output, loss_func

        outputs = get_forward_backward_func(pp_size=self.layout.pp)(
            forward_step_func=forward_step,
            data_iterator=iter(local),
            model=[self.ddp],
            num_microbatches=len(local),
            seq_length=local[0]["tokens"].shape[1] * self.layout.cp,
            micro_batch_size=local[0]["tokens"].shape[0],
            forward_only=forward_only,
            pg_collection=self.megatron_groups,
            p2p_communicator=self.p2p,
        )
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for out in outputs:  # only the last stage has any
            total += out["loss_sum"].double()
        if self.groups.dp_cp.size() > 1:
            dist.all_reduce(total, group=self.groups.dp_cp)
        if self.layout.pp > 1:
            dist.all_reduce(total, group=self.groups.pp)
        return float(total)

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
        """Parameters and AdamW state in model space (train.model_space), which any layout
        and the one-process engine load. Collective over the engine's groups."""
        return megatron_sharded_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a `state_dict` saved under any layout or engine (via CheckpointManager)."""
        load_megatron_sharded_state(self, state)
