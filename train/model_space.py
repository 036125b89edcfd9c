"""The engines' training state in model space: what makes checkpoints reshard.

    state = megatron_sharded_state(engine)          # {"version", "layout", ..., "tensors"}
    manager.save(step, {"engine": state, ...}, config)   # tensors written with DCP
    load_megatron_sharded_state(engine, loaded["engine"])  # any tp / pp / cp / dp layout
    local_sharded_state(engine) / load_local_sharded_state(engine, state)  # one process

Every tensor is keyed by the single-process model's parameter name and has its unpadded
shape: `model.<name>` the parameter (in bf16 runs the fp32 master weights, the exact values),
`optim.exp_avg.<name>` / `optim.exp_avg_sq.<name>` AdamW's moments; Adam's step count is one
number. A rank contributes the pieces of its stage's tp shards (ParallelStage.
sharded_pieces); cp and dp replicas, and the last stage's copy of a tied embedding, are not
written. Megatron's DistributedOptimizer keeps each parameter's fp32 master / moments split
over the data x context ranks (flat ranges of the parameter); saving sums those ranges into
whole tp-shard-shaped tensors over that group (one all-reduce per kind, memory three times this
rank's parameters), loading cuts this rank's range out again. Padded vocabulary rows are zero
in the weights and moments (their gradient is always zero), so they load as zeros for any tp.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from train.sharded_state import ShardedState, ShardedStateRef


class MegatronState(Protocol):
    """What is read of a MegatronEngine (train.megatron_engine) here."""

    stage: Any
    """The ParallelStage (parallel.parallelize): named_parameters, sharded_pieces."""
    optimizer: Any
    """Megatron's (chained, distributed or mixed-precision) optimizer."""
    groups: Any
    device: torch.device
    precision: str

    def _layout_key(self) -> list[int]: ...


class LocalState(Protocol):
    """What is read of a LocalEngine (train.engine) here."""

    model: torch.nn.Module
    optimizer: Any
    """torch's AdamW."""
    optim_args: Any


__all__ = [
    "SHARDED_VERSION", "megatron_sharded_state", "load_megatron_sharded_state",
    "local_sharded_state", "load_local_sharded_state",
]  # fmt: skip

SHARDED_VERSION = 2
"""Version of the engine's model-space state (1 was the per-rank, same-layout state_dict)."""

KINDS = ("model", "optim.exp_avg", "optim.exp_avg_sq")
_STATE_OF_KIND = {"model": "param", "optim.exp_avg": "exp_avg", "optim.exp_avg_sq": "exp_avg_sq"}

log = logging.getLogger(__name__)


class _Owned:
    """This rank's optimizer range of one model parameter: elements [start, end) of its flat
    view, the fp32 main tensor of those elements and the torch optimizer holding its state."""

    def __init__(self, start: int, end: int, main: torch.Tensor, opt: torch.optim.Optimizer):
        self.start, self.end, self.main, self.opt = start, end, main, opt

    def state(self) -> dict[str, Any]:
        return self.opt.state.setdefault(self.main, {})


def _owned_ranges(engine: MegatronState) -> tuple[dict[torch.Tensor, _Owned], Any]:
    """Per model parameter this rank's _Owned range, and the group over which the ranges are
    split (None when every rank holds its parameters' whole state)."""
    owned: dict[torch.Tensor, _Owned] = {}
    group = None
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        if hasattr(opt, "model_param_group_index_map"):  # DistributedOptimizer
            group = opt.data_parallel_group
            for param in opt.model_param_group_index_map:
                rng = opt._get_model_param_range_map(param)["param"]
                gi, order = opt.model_param_group_index_map[param]
                main = opt.optimizer.param_groups[gi]["params"][order]
                owned[param] = _Owned(rng.start, rng.end, main, opt.optimizer)
        elif hasattr(opt, "float16_groups"):  # plain mixed precision: fp32 copies
            for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True):
                for param, main in zip(models, mains, strict=True):
                    owned[param] = _Owned(0, param.numel(), main, opt.optimizer)
            for params in opt.fp32_from_fp32_groups:
                for param in params:
                    owned[param] = _Owned(0, param.numel(), param, opt.optimizer)
        else:  # FP32Optimizer: the parameters themselves
            for group_ in opt.optimizer.param_groups:
                for param in group_["params"]:
                    owned[param] = _Owned(0, param.numel(), param, opt.optimizer)
    return owned, group


def _checked_ref(state: dict[str, Any]) -> ShardedStateRef:
    """The tensors of a model-space engine state, after checking its version."""
    if state.get("version") != SHARDED_VERSION:
        raise ValueError(
            f"engine state version {state.get('version')!r} is not {SHARDED_VERSION}: it was "
            "written by another version of halotron's engines, or by the DeepSpeed engine "
            "(whose checkpoints resume only with train.engine=deepspeed)"
        )
    ref = state.get("tensors")
    if not isinstance(ref, ShardedStateRef):
        raise TypeError("the engine state's tensors must come from CheckpointManager.load_latest")
    return ref


def _adam_step(states: Iterable[dict[str, Any]]) -> int:
    """Adam's step count: the largest of its per-parameter states' (0 before any step)."""
    return max((int(s["step"]) for s in states if "step" in s), default=0)


def megatron_sharded_state(engine: MegatronState) -> dict[str, Any]:
    """The engine's state in model space (module doc); collective over the engine's groups."""
    stage = engine.stage
    params = dict(stage.named_parameters())
    owned, group = _owned_ranges(engine)
    total = sum(p.numel() for p in params.values())
    flats = {}
    for kind in KINDS:
        flat = torch.zeros(total, dtype=torch.float32, device=engine.device)
        offset = 0
        for param in params.values():
            own = owned.get(param)
            if own is not None:
                key = _STATE_OF_KIND[kind]
                source = own.main if key == "param" else own.state().get(key)
                if source is not None:
                    flat[offset + own.start : offset + own.end] = source.detach().view(-1)
            elif (
                kind == "model" and not param.requires_grad and (group is None or group.rank() == 0)
            ):
                # A frozen parameter (no optimizer holds it; the encoder's pooler): its value,
                # from one rank of the group that the sum below runs over.
                flat[offset : offset + param.numel()] = param.detach().float().view(-1)
            offset += param.numel()
        if group is not None and group.size() > 1:
            dist.all_reduce(flat, group=group)
        flats[kind] = flat
    step = torch.tensor(float(_adam_step(o.state() for o in owned.values())), device=engine.device)
    if group is not None and group.size() > 1:
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
    tensors = ShardedState()
    writer = engine.groups.cp_rank == 0 and engine.groups.dp_rank == 0
    for kind, flat in flats.items():
        offset = 0
        for name, param in params.items():
            local = flat[offset : offset + param.numel()].view(param.shape)
            offset += param.numel()
            gname, shape, pieces = stage.sharded_pieces(name, local)
            # The last stage's copy of a tied embedding is the first stage's, written there.
            write = writer and not getattr(param, "shared", False)
            tensors.add(f"{kind}.{gname}", shape, pieces, write=write)
    return {
        "version": SHARDED_VERSION,
        "layout": engine._layout_key(),
        "precision": engine.precision,
        "adam_step": int(step),
        "tensors": tensors,
    }


@torch.no_grad()
def load_megatron_sharded_state(engine: MegatronState, state: dict[str, Any]) -> None:
    """Load a model-space state written under any layout (collective: DCP reads)."""
    ref = _checked_ref(state)
    if state["layout"] != engine._layout_key():
        log.info(
            "resharding the Megatron state from (tp, pp, cp, dp) = %s to %s",
            state["layout"], engine._layout_key(),
        )  # fmt: skip
    if state.get("precision") != engine.precision:
        log.warning(
            "the checkpoint was written with optim.precision=%s, this run uses %s: its fp32 "
            "weights and AdamW state are cast", state.get("precision"), engine.precision,
        )  # fmt: skip
    stage = engine.stage
    template = ShardedState()
    locals_: dict[tuple[str, str], torch.Tensor] = {}
    for kind in KINDS:
        for name, param in stage.named_parameters():
            local = torch.zeros(param.shape, dtype=torch.float32, device=engine.device)
            locals_[kind, name] = local
            gname, shape, pieces = stage.sharded_pieces(name, local)
            template.add(f"{kind}.{gname}", shape, pieces)
    ref.load_into(template)
    owned, _ = _owned_ranges(engine)
    step = torch.tensor(float(state["adam_step"]))
    for name, param in stage.named_parameters():
        param.copy_(locals_["model", name])
        own = owned.get(param)
        if own is None:
            continue
        # DistributedOptimizer: a flat range; the other optimizers: the parameter's shape.
        shape = own.main.shape
        own.main.copy_(locals_["model", name].view(-1)[own.start : own.end].view(shape))
        opt_state = own.state()
        for kind in KINDS[1:]:
            value = locals_[kind, name].view(-1)[own.start : own.end].view(shape)
            opt_state[_STATE_OF_KIND[kind]] = value.to(own.main.dtype).clone()
        opt_state["step"] = step.clone()
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        for group in opt.optimizer.param_groups:  # fused Adams keep the step per group
            if "step" in group:
                group["step"] = int(step)


def local_sharded_state(engine: LocalState) -> dict[str, Any]:
    """The one-process engine's state in model space: the same tensors as a Megatron
    engine's (module doc), each whole, so that either engine resumes the other's checkpoint."""
    tensors = ShardedState()
    opt_state = engine.optimizer.state
    for name, param in engine.model.named_parameters():  # a tied weight appears once
        state = opt_state.get(param, {})
        for kind in KINDS:
            key = _STATE_OF_KIND[kind]
            value = param if key == "param" else state.get(key, torch.zeros_like(param))
            origin = (0,) * param.dim()
            tensors.add(f"{kind}.{name}", param.shape, [(origin, value.detach().float())])
    return {
        "version": SHARDED_VERSION,
        "layout": [1, 1, 1, 1],
        "precision": engine.optim_args.precision,
        "adam_step": _adam_step(opt_state.values()),
        "tensors": tensors,
    }


@torch.no_grad()
def load_local_sharded_state(engine: LocalState, state: dict[str, Any]) -> None:
    """Load a model-space state written by any engine and layout into the one-process engine."""
    ref = _checked_ref(state)
    template = ShardedState()
    buffers: dict[tuple[str, str], torch.Tensor] = {}
    named = dict(engine.model.named_parameters())
    for kind in KINDS:
        for name, param in named.items():
            buffer = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            buffers[kind, name] = buffer
            template.add(f"{kind}.{name}", param.shape, [((0,) * param.dim(), buffer)])
    ref.load_into(template)
    step = torch.tensor(float(state["adam_step"]))
    for name, param in named.items():
        param.copy_(buffers["model", name])
        if state["adam_step"] > 0:
            opt_state = engine.optimizer.state[param]
            opt_state["exp_avg"] = buffers["optim.exp_avg", name].to(param.dtype)
            opt_state["exp_avg_sq"] = buffers["optim.exp_avg_sq", name].to(param.dtype)
            opt_state["step"] = step.clone()
