"""The DeepSpeed engine: ZeRO stage 1, 2 or 3 data parallelism, composed with our context
parallelism and Megatron tensor parallelism, behind `Engine`.

    layout = Layout.create(cfg.parallel, world_size, cfg.model, cfg.attention, cfg.train.seq_len)
    groups = layout.initialize()          # after torch.distributed.init_process_group
    engine = DeepSpeedEngine(cfg.model, cfg.attention, layout, groups, cfg.optim, cfg.schedule,
                             cfg.deepspeed, micro_batches=cfg.train.grad_accum,
                             micro_batch_size=cfg.train.micro_batch_size,
                             total_steps=cfg.train.steps, seed=cfg.train.seed)
    stats = engine.train_step(micro_batches, step)   # this data-parallel rank's full sequences
    engine.save_checkpoint("runs/x/checkpoints/engine", "step_000010")  # DeepSpeed's own

Selected with `train.engine: deepspeed`; the recipe's `deepspeed:` section is `DeepSpeedArgs`
(train/deepspeed_config.py, with the config dict it generates).
The model is the single-device `Transformer` for tp = 1, or for tp > 1 this tp rank's
parallel.parallelize.ParallelStage (Megatron-core column / row / vocab-parallel
layers, weights sliced from the same seed's Transformer, vocab-parallel cross entropy); its
attention is `cp_sparse_attention` over the cp group (plain `sparse_attention` for cp = 1).
It is wrapped by `deepspeed.initialize` with torch's AdamW (same parameter groups as
LocalEngine: decay on matrices only) and `ModelParallelUnit`, our groups in Megatron's `mpu`
interface: DeepSpeed's data-parallel group is data x context (`groups.dp_cp`), its
model-parallel group the tp group. DeepSpeed owns the gradient accumulation
(`gradient_accumulation_steps` = train.grad_accum: `engine.step()` after every micro-batch
updates at the boundary), the gradient all-reduce / reduce-scatter and ZeRO's partitioning over
the data x context ranks, clipping (`gradient_clipping` = optim.grad_clip; the norm sums the
squares of the tp shards, marked `tensor_model_parallel`, over the tp group and counts the
replicated norms' once) and bf16 (optim.precision=bf16: bf16 parameters and activations, fp32
master weights in ZeRO's partitions). With parallel.sequence_parallel (tp > 1, Megatron's
sequence parallelism in the stage) the norm weights' gradients are summed over tp by a hook
(`_sum_over`), the step Megatron's finalize_model_grads would take. Each rank back-propagates
its (cp slice's) summed loss divided by the tokens of the whole step and multiplied by the
data x context size, which undoes DeepSpeed's averaging over those ranks (tp ranks hold the
same tokens): the update equals the single-process LocalEngine step on all ranks' micro-batches
(tests/distributed/test_deepspeed_parity.py). The learning rate follows lr_at, set on the
optimizer's groups each step (so resume needs no scheduler state).
Refused with a ValueError naming the key: parallel.pp > 1 (DeepSpeed's pipeline engine needs a
PipelineModule, which this model is not; use train.engine=megatron).
Checkpoints are DeepSpeed's (`save_checkpoint` / `load_checkpoint`: model states per tp rank,
`mp_rank_XX_model_states.pt`, and one ZeRO optimizer shard per rank), called by the loop next
to its own per-rank file; a resume needs the same layout. With tp = 1 ZeRO's fp32 weights can
be gathered offline with deepspeed.utils.zero_to_fp32 (it does not join tp shards; with tp > 1
use `full_parameters`). On CPU DeepSpeed's shared-memory all-reduce op is not built
(`deepspeed.shm_comm`): gloo carries every collective.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from model.registry import build_model
from model.sparse import SparsityConfig, sparse_attention
from model.transformer import ModelArgs, lm_loss
from parallel.traffic import TrafficCounter
from train.deepspeed_config import DeepSpeedArgs, deepspeed_config, deepspeed_refusal
from train.engine import Engine, OptimArgs, ScheduleArgs, _param_groups, engine_tag

if TYPE_CHECKING:
    from parallel.layout import Layout, ParallelGroups
    from parallel.parallelize import ParallelStage

__all__ = ["DeepSpeedEngine"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


class ModelParallelUnit:
    """Megatron's `mpu` interface over our groups, for `deepspeed.initialize(mpu=...)`.

    DeepSpeed asks it for its data-parallel group (gradient all-reduce / reduce-scatter, ZeRO
    partitions, the parameter broadcast at start-up, the train_batch_size check) and its
    model-parallel group (the gradient norm: the squares of parameters marked
    `tensor_model_parallel` are summed over it, the others counted on model-parallel rank 0
    only; the checkpoint's mp_rank). Data parallel here is data x context (`groups.dp_cp`):
    context-parallel ranks hold slices of the same sequences whose gradients are summed like
    data-parallel ones. Model parallel is the tp group (pp is 1). No sequence-parallel
    methods: DeepSpeed would take them for its own Ulysses layout.
    """

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.dp_cp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.groups.dp_cp)

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_cp.size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.groups.dp_cp)

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.tp.size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.groups.tp)[0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.pp.size()


def _sum_over(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A gradient hook for sequence parallelism: the norm weights are replicated over tp but
    each rank's gradient covers only its 1/tp of the sequence, so it is summed over the tp
    group as it is computed, before DeepSpeed's hooks accumulate and reduce it (what Megatron's
    finalize_model_grads does for the parameters marked `sequence_parallel`). Every tp rank
    runs the same backward, so the all-reduces line up."""
    total = grad.clone()
    dist.all_reduce(total, group=group)
    return total


def _skip_shm_comm() -> None:
    """Make DeepSpeed skip its shared-memory comm op. Its communication backend builds the op
    when `deepspeed.ops.__compatible_ops__` (probed lazily by compiling test programs for every
    op) says it is compatible; a dict set on the module beforehand is used as the probe result
    (deepspeed/ops/__init__.py keeps it), so the probe and the build never run."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # type: ignore[attr-defined]


@contextmanager
def _optimizer_step_suppressed(ds: Any, suppress: bool) -> Iterator[None]:
    """While active (when `suppress`), the optimizer inside DeepSpeed's engine does not step:
    `engine.step()` at the accumulation boundary then only zeroes the gradients and advances
    DeepSpeed's counters, leaving parameters and optimizer state as they were."""
    if not suppress:
        yield
        return
    optimizer = ds.optimizer
    optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method
    try:
        yield
    finally:
        del optimizer.step


class DeepSpeedEngine(Engine):
    """One rank's share of a tp x cp x dp step under DeepSpeed ZeRO (train.engine.Engine owns
    the step's shared parts: learning rate, sequence slice, token count, NaN skip, timing).

    `model` is the Transformer (`ds.module`), `ds` the deepspeed.DeepSpeedEngine.
    """

    def __init__(
        self,
        model_args: ModelArgs,
        attn_cfg: SparsityConfig,
        layout: Layout,
        groups: ParallelGroups,
        optim: OptimArgs,
        schedule: ScheduleArgs,
        args: DeepSpeedArgs,
        micro_batches: int,
        micro_batch_size: int,
        total_steps: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        reason = deepspeed_refusal(layout.pp)
        if reason is not None:
            raise ValueError(reason)
        import deepspeed

        if not args.shm_comm and not torch.cuda.is_available():
            _skip_shm_comm()
        super().__init__(
            optim, schedule, total_steps, device, groups.cp_rank, layout.cp, groups.dp_cp
        )
        self.layout, self.groups, self.args = layout, groups, args
        self.model_args = model_args
        self.micro_batches = micro_batches
        self.mpu = ModelParallelUnit(groups)
        self.stage: ParallelStage | None = None  # the model when tp > 1
        self.traffic = TrafficCounter() if layout.cp > 1 else None
        """Bytes and time of the context-parallel exchanges (None without cp)."""
        module = self._build_module(model_args, attn_cfg, seed)
        optimizer = torch.optim.AdamW(
            _param_groups(module, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
        )
        self.config = deepspeed_config(
            args, optim, micro_batch_size, micro_batches, self.mpu.get_data_parallel_world_size()
        )
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=self.config,
            mpu=self.mpu,
            dist_init_required=False,
        )
        self.model: nn.Module = self.ds.module

    def _build_module(
        self, model_args: ModelArgs, attn_cfg: SparsityConfig, seed: int
    ) -> nn.Module:
        """The Transformer (tp = 1) or this tp rank's ParallelStage of it (tp > 1: Megatron's
        column / row / vocab-parallel layers, sliced from the same seed's weights), with
        cp_sparse_attention over the cp group when cp > 1."""
        if self.layout.tp == 1:
            attention_fn: Any = sparse_attention
            if self.layout.cp > 1:
                from parallel.context_parallel import cp_sparse_attention

                attention_fn = functools.partial(
                    cp_sparse_attention, group=self.groups.cp, traffic=self.traffic
                )
            module = build_model(model_args, attn_cfg, attention_fn=attention_fn, seed=seed)
            return module.to(self.device)
        from parallel.megatron_shims import apply_cpu_shims
        from parallel.parallelize import parallelize

        apply_cpu_shims()
        with torch.device("meta"):  # each rank materialises only its shard
            model = build_model(model_args, attn_cfg, seed=seed)
        self.stage = parallelize(
            model, self.layout, self.groups, self.optim_args.dtype, self.traffic, seed
        )
        if self.layout.sequence_parallel:
            for param in self.stage.parameters():
                if getattr(param, "sequence_parallel", False):
                    param.register_hook(functools.partial(_sum_over, group=self.groups.tp))
        # ZeRO-3: the LM head's use of the tied embedding weight (read as `self.embed.weight`
        # during the forward) is detected and gathered by DeepSpeed's parameter dict itself.
        return self.stage.to(self.device)

    # ---- what differs from the other engines (train.engine.Engine) --------------------------

    def _loss(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.ds(
            batch["tokens"], batch["position_ids"], step, batch.get("padding_mask"),
            batch.get("global_mask"),
        )  # fmt: skip
        if self.stage is None:
            return lm_loss(logits, batch["labels"], batch["loss_mask"])
        from parallel.tensor_parallel import parallel_lm_loss

        labels, loss_mask = batch["labels"], batch["loss_mask"]
        return parallel_lm_loss(
            logits, labels, loss_mask, self.model_args.vocab_size, self.groups.tp
        )

    def forward_backward(
        self, local: list[dict[str, torch.Tensor]], step: int, n_tokens: float
    ) -> float:
        if len(local) != self.micro_batches:
            raise ValueError(
                f"{len(local)} micro-batches for a DeepSpeed engine configured with "
                f"gradient_accumulation_steps={self.micro_batches} (train.grad_accum)"
            )
        # Undoes DeepSpeed's mean over its data-parallel (data x context) ranks.
        scale = self.groups.dp_cp.size() / max(n_tokens, 1.0)
        loss_total = 0.0
        for i, batch in enumerate(local):
            loss_sum = self.with_fault(self._loss(batch, step)[0], step)
            self.ds.backward(loss_sum * scale, scale_wrt_gas=False)
            loss_total += float(loss_sum.detach())
            if i < len(local) - 1:
                self.ds.step()  # not the accumulation boundary: DeepSpeed counts it only
        (loss_total,) = self.all_sum([loss_total])
        return loss_total

    def forward_only(self, local: list[dict[str, torch.Tensor]]) -> float:
        (total,) = self.all_sum([sum(float(self._loss(b, step=0)[0]) for b in local)])
        return total

    def update(self, skipped: bool) -> float:
        before = self.ds.skipped_steps
        with _optimizer_step_suppressed(self.ds, skipped and not self._skips_overflow()):
            self.ds.step()  # the accumulation boundary: the update
        if skipped and self._skips_overflow() and self.ds.skipped_steps == before:
            log.warning("NaN/Inf loss but DeepSpeed did not skip its update")
        grad_norm = None if skipped else self.ds.get_global_grad_norm()
        return math.nan if grad_norm is None else float(grad_norm)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _skips_overflow(self) -> bool:
        """Whether DeepSpeed skips a step with non-finite gradients on its own: ZeRO 1 and 2
        (fp32: a non-finite gradient norm counts as an overflow; bf16: with
        bf16.check_grad_overflow, on by default). Stage 0 and 3 check only fp16 overflows."""
        if self.args.zero_stage not in (1, 2):
            return False
        return self.optim_args.precision == "fp32" or bool(
            self.config["bf16"].get("check_grad_overflow", True)
        )

    # ---- state -------------------------------------------------------------------------------

    def _key(self) -> dict[str, Any]:
        return {
            "layout": [self.layout.tp, self.layout.pp, self.layout.cp, self.layout.dp],
            "zero_stage": self.args.zero_stage,
            "precision": self.optim_args.precision,
        }

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed writes the tensors into `checkpoint_dir/step_N/` (its own format, a
        collective); the state names that directory and the settings it belongs to."""
        if self.checkpoint_dir is None:
            raise RuntimeError("DeepSpeedEngine.checkpoint_dir must be set before a checkpoint")
        tag = engine_tag(self.steps_done)
        self.ds.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
        return {"version": STATE_VERSION, "deepspeed": True, "tag": tag, **self._key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that `state` fits this run and load the DeepSpeed checkpoint it names."""
        if state.get("version") != STATE_VERSION or not state.get("deepspeed"):
            raise ValueError(
                "the checkpoint was not written by the DeepSpeed engine (train.engine=deepspeed); "
                "resume it with the engine that wrote it (train.engine=auto or megatron)"
            )
        saved = {k: state.get(k) for k in self._key()}
        if saved != self._key():
            raise ValueError(
                f"the checkpoint was written with {saved} (parallel (tp, pp, cp, dp), "
                f"deepspeed.zero_stage, optim.precision) but this run uses {self._key()}; "
                "DeepSpeed resumes only the same layout, ZeRO stage and precision"
            )
        if self.checkpoint_dir is None:
            raise RuntimeError("DeepSpeedEngine.checkpoint_dir must be set before a resume")
        path = self.checkpoint_dir / state["tag"]
        if not path.is_dir():
            raise FileNotFoundError(
                f"the DeepSpeed checkpoint {path} named by the run's checkpoint is missing"
            )
        loaded, _ = self.ds.load_checkpoint(
            str(self.checkpoint_dir), tag=state["tag"], load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )  # fmt: skip
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint {path}")

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole and fp32, named as in Transformer: ZeRO-3 gathers its
        partitions, tp > 1 its tensor-parallel shards (a collective over the tp group)."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.args.zero_stage == 3):
            local = {k: v.detach().clone().float() for k, v in self.model.named_parameters()}
        if self.stage is None:
            return local
        from parallel.tensor_parallel import unshard_param

        tp_group = self.groups.tp
        full = {}
        for name, shard in local.items():
            shards = [torch.empty_like(shard) for _ in range(tp_group.size())]
            dist.all_gather(shards, shard, group=tp_group)
            global_name = self.stage.global_name(name)
            full[global_name] = unshard_param(global_name, shards, self.model_args)
        return full
