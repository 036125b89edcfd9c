"""The DeepSpeed engine: ZeRO stage 1, 2 or 3 data parallelism (with our context parallelism)
behind `Engine`.

    layout = Layout.create(cfg.parallel, world_size, cfg.model, cfg.attention, cfg.train.seq_len)
    groups = layout.initialize()          # after torch.distributed.init_process_group
    engine = DeepSpeedEngine(cfg.model, cfg.attention, layout, groups, cfg.optim, cfg.schedule,
                             cfg.deepspeed, micro_batches=cfg.train.grad_accum,
                             micro_batch_size=cfg.train.micro_batch_size,
                             total_steps=cfg.train.steps, seed=cfg.train.seed)
    stats = engine.train_step(micro_batches, step)   # this data-parallel rank's full sequences
    engine.save_checkpoint("runs/x/checkpoints/engine", "step_000010")  # DeepSpeed's own

Selected with `train.engine: deepspeed`; the recipe's `deepspeed:` section is `DeepSpeedArgs`.
The model is the single-device `Transformer` whose attention is `cp_sparse_attention` over the
cp group (plain `sparse_attention` for cp=1), wrapped by `deepspeed.initialize` with torch's
AdamW (same parameter groups as LocalEngine: decay on matrices only). DeepSpeed owns the
gradient accumulation (`gradient_accumulation_steps` = train.grad_accum: `engine.step()` after
every micro-batch updates at the boundary), the gradient all-reduce / reduce-scatter and ZeRO's
partitioning over all ranks, clipping (`gradient_clipping` = optim.grad_clip) and bf16
(optim.precision=bf16: bf16 parameters and activations, fp32 master weights in ZeRO's
partitions). Every rank is a DeepSpeed data-parallel rank: with tp = pp = 1 the ranks whose
gradients are summed (data x context) are the whole world, so DeepSpeed needs no `mpu`. Each
rank back-propagates its (cp slice's) summed loss divided by the tokens of the whole step and
multiplied by the world size, which undoes DeepSpeed's averaging over ranks: the update equals
the single-process LocalEngine step on all ranks' micro-batches
(tests/distributed/test_deepspeed_parity.py). The learning rate follows lr_at, set on the
optimizer's groups each step (so resume needs no scheduler state).
Refused with a ValueError naming the key: parallel.tp > 1 (Megatron's tensor-parallel layers
and vocab-parallel loss are not wired into DeepSpeed here; use train.engine=megatron) and
parallel.pp > 1 (DeepSpeed's pipeline engine needs a PipelineModule, which this model is not).
Checkpoints are DeepSpeed's (`save_checkpoint` / `load_checkpoint`: model states on rank 0 and
one ZeRO optimizer shard per rank), called by the loop next to its own per-rank file; ZeRO-3's
fp32 weights can be gathered offline with deepspeed.utils.zero_to_fp32. On CPU DeepSpeed's
shared-memory all-reduce op is not built (`deepspeed.shm_comm`): gloo carries every collective.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from model.sparse import SparsityConfig, sparse_attention
from model.transformer import ModelArgs, Transformer, lm_loss
from train.engine import Engine, OptimArgs, ScheduleArgs, StepStats, _param_groups, lr_at

if TYPE_CHECKING:
    from parallel.layout import Layout, ParallelGroups

__all__ = ["DeepSpeedArgs", "DeepSpeedEngine", "deepspeed_refusal", "OWNED_KEYS"]

log = logging.getLogger(__name__)

STATE_VERSION = 1

OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size and train.grad_accum",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "optim.precision",
    "fp16": "optim.precision",
    "optimizer": "the optim section",
    "scheduler": "the schedule section",
}
"""DeepSpeed config keys the trainer derives from other sections (and the key to set instead)."""


@dataclass
class DeepSpeedArgs:
    """DeepSpeed settings of `train.engine: deepspeed` (ignored by the other engines)."""

    zero_stage: int = 1
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states partitioned), 2 (+ gradients)
    or 3 (+ parameters)."""
    shm_comm: bool = False
    """CPU only: let DeepSpeed probe its ops and JIT-build its shared-memory all-reduce (a C++
    compile on first use, a minute on small machines). Off: collectives go through gloo."""
    config: Any = None
    """Further DeepSpeed config values (null: none), merged into the generated config (nested
    dicts merge),
    e.g. {"zero_optimization": {"reduce_bucket_size": 5e7}, "steps_per_print": 100}. Keys the
    trainer derives from other sections (batch sizes, clipping, precision, optimizer,
    scheduler) are refused with the key to use instead."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        config = {} if self.config is None else self.config
        if not isinstance(config, dict):
            raise ValueError(f"deepspeed.config={self.config!r} must be a mapping of keys")
        for key, instead in OWNED_KEYS.items():
            if key in config:
                raise ValueError(f"deepspeed.config.{key} is set by the trainer; set {instead}")
        stage = (config.get("zero_optimization") or {}).get("stage")
        if stage is not None and stage != self.zero_stage:
            raise ValueError(
                f"deepspeed.config.zero_optimization.stage={stage!r} contradicts "
                f"deepspeed.zero_stage={self.zero_stage}; set deepspeed.zero_stage only"
            )


def deepspeed_refusal(tp: int, pp: int) -> str | None:
    """Why train.engine=deepspeed cannot run the layout (tp, pp), or None when it can."""
    if tp > 1:
        return (
            f"parallel.tp={tp} with train.engine=deepspeed is not supported: Megatron's tensor-"
            "parallel layers and vocab-parallel loss are wired into the Megatron engine only "
            "(DeepSpeed would need Megatron's mpu and its own tp-aware checkpoints); use "
            "train.engine=megatron for tensor parallelism, or parallel.tp=1"
        )
    if pp > 1:
        return (
            f"parallel.pp={pp} with train.engine=deepspeed is not supported: DeepSpeed's pipeline "
            "engine needs the model as a deepspeed.pipe.PipelineModule, which this model is "
            "not; use train.engine=megatron for pipeline parallelism, or parallel.pp=1"
        )
    return None


def _skip_shm_comm() -> None:
    """Make DeepSpeed skip its shared-memory comm op. Its communication backend builds the op
    when `deepspeed.ops.__compatible_ops__` (probed lazily by compiling test programs for every
    op) says it is compatible; a dict set on the module beforehand is used as the probe result
    (deepspeed/ops/__init__.py keeps it), so the probe and the build never run."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # type: ignore[attr-defined]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_config(
    args: DeepSpeedArgs, optim: OptimArgs, micro_batch_size: int, micro_batches: int, world: int
) -> dict[str, Any]:
    """The DeepSpeed config dict: generated from our sections, then `args.config` merged in."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batch_size * micro_batches * world,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": optim.precision == "bf16"},
        "zero_optimization": {"stage": args.zero_stage},
        # torch's AdamW, handed in as a client optimizer (LocalEngine's exact update).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, args.config or {})


class DeepSpeedEngine:
    """One rank's share of a cp x dp step under DeepSpeed ZeRO; implements train.engine.Engine.

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
        reason = deepspeed_refusal(layout.tp, layout.pp)
        if reason is not None:
            raise ValueError(reason)
        import deepspeed

        if not args.shm_comm and not torch.cuda.is_available():
            _skip_shm_comm()
        self.device = torch.device(device)
        self.layout, self.groups = layout, groups
        self.optim_args, self.schedule_args, self.args = optim, schedule, args
        self.total_steps = total_steps
        self.micro_batches = micro_batches
        self.world = dist.get_world_size()
        attention_fn: Any = sparse_attention
        if layout.cp > 1:
            from parallel.context_parallel import cp_sparse_attention

            attention_fn = functools.partial(cp_sparse_attention, group=groups.cp)
        module = Transformer(model_args, attn_cfg, attention_fn=attention_fn, seed=seed)
        module.to(self.device)
        optimizer = torch.optim.AdamW(
            _param_groups(module, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
        )
        self.config = deepspeed_config(args, optim, micro_batch_size, micro_batches, self.world)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.config, dist_init_required=False
        )
        self.model: nn.Module = self.ds.module

    # ---- the step ----------------------------------------------------------------------------

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from parallel.layout import shard_sequence

        local = shard_sequence(batch, self.groups.cp_rank, self.layout.cp)
        return {k: v.to(self.device, non_blocking=True) for k, v in local.items()}

    def _loss(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.ds(batch["tokens"], batch["position_ids"], step, batch.get("padding_mask"))
        return lm_loss(logits, batch["labels"], batch["loss_mask"])

    def _all_sum(self, values: list[float]) -> list[float]:
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        return totals.tolist()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepStats:
        if len(micro_batches) != self.micro_batches:
            raise ValueError(
                f"{len(micro_batches)} micro-batches for a DeepSpeed engine configured with "
                f"gradient_accumulation_steps={self.micro_batches} (train.grad_accum)"
            )
        self.ds.train()
        lr = lr_at(step, self.optim_args, self.schedule_args, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local = [self._local(b) for b in micro_batches]
        # cp ranks count their slice's tokens; the sum over all ranks is the step's tokens.
        (n_tokens,) = self._all_sum([sum(float(b["loss_mask"].sum()) for b in local)])
        scale = self.world / max(n_tokens, 1.0)  # undoes DeepSpeed's mean over the ranks
        loss_total = 0.0
        for batch in local:
            loss_sum, _ = self._loss(batch, step)
            self.ds.backward(loss_sum * scale, scale_wrt_gas=False)
            self.ds.step()  # DeepSpeed updates at the accumulation boundary only
            loss_total += float(loss_sum.detach())
        (loss_total,) = self._all_sum([loss_total])
        grad_norm = self.ds.get_global_grad_norm()
        return StepStats(
            loss=loss_total / max(n_tokens, 1.0),
            n_tokens=int(n_tokens),
            grad_norm=math.nan if grad_norm is None else float(grad_norm),
            lr=lr,
        )

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(summed loss, tokens) of `batch` over every cp slice and dp rank (each dp rank passes
        its own batch); step=0 fixes the random-block draw."""
        self.ds.eval()
        loss_sum, n_tokens = self._loss(self._local(batch), step=0)
        total, count = self._all_sum([float(loss_sum), float(n_tokens)])
        return total, int(count)

    # ---- state -------------------------------------------------------------------------------

    def _key(self) -> dict[str, Any]:
        return {
            "layout": [self.layout.tp, self.layout.pp, self.layout.cp, self.layout.dp],
            "zero_stage": self.args.zero_stage,
            "precision": self.optim_args.precision,
        }

    def state_dict(self) -> dict[str, Any]:
        """What the loop's own checkpoint file holds for this engine: the settings the
        DeepSpeed checkpoint (written by `save_checkpoint`) belongs to, not the tensors."""
        return {"version": STATE_VERSION, "deepspeed": True, **self._key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that `state` (from `state_dict`) fits this run; the tensors come from
        `load_checkpoint`."""
        if state.get("version") != STATE_VERSION or not state.get("deepspeed"):
            raise ValueError(
                "the checkpoint was not written by the DeepSpeed engine (train.engine=deepspeed) "
                f"of this version; its engine state has keys {sorted(state)}"
            )
        saved = {k: state.get(k) for k in self._key()}
        if saved != self._key():
            raise ValueError(
                f"the checkpoint was written with {saved} (parallel (tp, pp, cp, dp), "
                f"deepspeed.zero_stage, optim.precision) but this run uses {self._key()}; "
                "DeepSpeed resumes only the same layout, ZeRO stage and precision"
            )

    def save_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        """DeepSpeed's checkpoint `directory/tag/` (a collective: every rank calls it)."""
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        path = Path(directory) / tag
        if not path.is_dir():
            raise FileNotFoundError(
                f"the DeepSpeed checkpoint {path} named by the run's checkpoint is missing"
            )
        loaded, _ = self.ds.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint {path}")

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole (ZeRO-3 gathers its partitions), named as in Transformer."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.args.zero_stage == 3):
            return {k: v.detach().clone().float() for k, v in self.model.named_parameters()}


if TYPE_CHECKING:  # mypy checks that the loop can use this engine where it takes an Engine
    _implements_engine: type[Engine] = DeepSpeedEngine
