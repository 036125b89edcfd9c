"""The DeepSpeed engine's settings: the recipe's `deepspeed:` section and the config dict
handed to `deepspeed.initialize`.

    args = DeepSpeedArgs(zero_stage=2, config={"zero_optimization": {"reduce_bucket_size": 5e7}})
    config = deepspeed_config(args, cfg.optim, micro_batch_size=2, micro_batches=4, world=8)

The keys the trainer derives from other sections (`OWNED_KEYS`: batch sizes, clipping,
precision, optimizer, scheduler) are generated and refused in `deepspeed.config`; the rest of
`deepspeed.config` is merged into the generated dict (nested dicts merge). `deepspeed_refusal`
says why a layout cannot run on train.deepspeed_engine.DeepSpeedEngine (pp > 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.engine import OptimArgs

__all__ = ["DeepSpeedArgs", "OWNED_KEYS", "deepspeed_config", "deepspeed_refusal"]

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


def deepspeed_refusal(pp: int) -> str | None:
    """Why train.engine=deepspeed cannot run `parallel.pp=pp`, or None when it can (every tp,
    cp and dp can)."""
    if pp > 1:
        return (
            f"parallel.pp={pp} with train.engine=deepspeed is not supported: DeepSpeed's pipeline "
            "engine needs the model as a deepspeed.pipe.PipelineModule, which this model is "
            "not; use train.engine=megatron for pipeline parallelism, or parallel.pp=1"
        )
    return None


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
