"""Per-rank bodies of the Megatron parity tests (module level so spawned ranks import them).

`reference(case)` trains the single-process model (LocalEngine) on the whole global batch;
`parity_rank` runs each `Run`: it builds the Layout, its Megatron groups and a MegatronEngine on
this rank's share of the same batch (data-parallel rank d takes micro-batches [d*k, (d+1)*k)),
trains the same steps (optionally resuming from a state_dict half-way) and returns its losses
and its parameter shards named as in the single-process model.
`assemble` puts the shards back together. Used by test_megatron_parity.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from model.registry import build_model
from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from train.engine import LocalEngine, OptimArgs, ScheduleArgs

STEPS = 3
SEED = 11


@dataclass(frozen=True)
class Case:
    """A tiny model and a global batch of `micro_batches` micro-batches per step."""

    n_layers: int = 2
    micro_batches: int = 4
    micro_batch_size: int = 1
    seq_len: int = 256
    vocab_size: int = 250  # padded to 256 (or 512) rows: exercises the masked padded vocab
    tie_embeddings: bool = True
    recompute: bool = False
    attention: dict = field(
        default_factory=lambda: dict(
            block_size=16, window_blocks=3, global_blocks=1, random_blocks=2, causal=True, seed=3
        )
    )
    mlm: bool = False
    """Masked-LM batches (labels at 15% of the positions, -100 elsewhere) with per-sample
    global marks (`global_mask`), for a bidirectional `attention`."""
    arch: str = "transformer"
    """model.arch: the decoder, or the HF-shaped "encoder" (GELU, biases, post-LN, learned
    positions from row 2, a token type row, the MLM head and a frozen pooler)."""

    def model_args(self) -> ModelArgs:
        if self.arch == "encoder":
            return ModelArgs(
                arch="encoder", vocab_size=self.vocab_size, d_model=32, n_layers=self.n_layers,
                n_heads=4, mlp="gelu", ffn_hidden=64, tie_embeddings=self.tie_embeddings,
                recompute=self.recompute, max_positions=self.seq_len + 2, position_offset=2,
                type_vocab_size=1, pooler=True,
            )  # fmt: skip
        return ModelArgs(
            vocab_size=self.vocab_size,
            d_model=32,
            n_layers=self.n_layers,
            n_heads=4,
            mlp="swiglu",
            ffn_hidden=64,
            tie_embeddings=self.tie_embeddings,
            recompute=self.recompute,
        )

    def attn_cfg(self) -> SparsityConfig:
        return SparsityConfig(**self.attention)


OPTIM = OptimArgs(lr=3e-3, weight_decay=0.1, grad_clip=0.15)
SCHEDULE = ScheduleArgs(warmup_steps=2, min_lr=3e-4)


def batches(case: Case, step: int) -> list[dict[str, torch.Tensor]]:
    """The global batch of optimizer step `step` (the same on every process)."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(case.micro_batches):
        shape = (case.micro_batch_size, case.seq_len)
        tokens = torch.randint(0, case.vocab_size, shape, generator=gen)
        labels = torch.randint(0, case.vocab_size, shape, generator=gen)
        loss_mask = (torch.rand(shape, generator=gen) > 0.2).float()
        position_ids = torch.arange(case.seq_len).expand(shape).contiguous()
        batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids)
        if case.mlm:
            chosen = torch.rand(shape, generator=gen) < 0.15
            batch["labels"] = torch.where(chosen, tokens, -100)
            batch["loss_mask"] = chosen.float()
            batch["global_mask"] = torch.rand(shape, generator=gen) < 0.02
        etc = case.attention.get("etc_tokens", 0)
        if etc:  # the leading slots of the model's ETC tokens (data.packing.reserve_etc_slots)
            batch["tokens"][:, :etc] = -1 - torch.arange(etc)
            batch["labels"][:, :etc] = -100
            batch["loss_mask"][:, :etc] = 0
        out.append(batch)
    return out


MLM = Case(
    mlm=True,
    attention=dict(
        block_size=16, window_blocks=3, global_blocks=2, random_blocks=2, causal=False, seed=3,
        global_tokens=(40,),
    ),
)  # fmt: skip
"""A bidirectional BigBird encoder trained with masked-LM targets, with ITC global blocks, an
explicit global position and per-sample global marks."""
MLM_GLOBAL_PROJECTIONS = Case(mlm=True, attention=dict(MLM.attention, global_projections=True))
"""The same with Longformer's separate global query / key / value projections."""
MLM_ETC = Case(mlm=True, attention=dict(MLM.attention, etc_tokens=2))
"""The same with two learned ETC tokens in the leading slots. (With three, one element of
layer 0's qkv weight, of 3072, ends 2.6e-5 from the one-process value, all others within
1e-6 and the losses equal: AdamW's step m / (sqrt(v) + eps) amplifies rounding differences
of a gradient element near eps.)"""
ENCODER = Case(mlm=True, arch="encoder", attention=MLM_GLOBAL_PROJECTIONS.attention)
"""MLM_GLOBAL_PROJECTIONS on the HF-shaped encoder (model/encoder.py): biases split with their
projections (or whole after a row layer's reduction), LayerNorms, learned positions and the
MLM head's dense replicated, a frozen pooler."""
ENCODER_ETC = Case(mlm=True, arch="encoder", attention=MLM_ETC.attention)
"""The encoder with two ETC tokens."""


def reference(case: Case) -> dict:
    """Losses, grad norms, token counts, final parameters and per-micro-batch validation
    (loss sum, tokens) of the single-process run."""
    model = build_model(case.model_args(), case.attn_cfg(), seed=SEED)
    engine = LocalEngine(model, OPTIM, SCHEDULE, total_steps=STEPS)
    stats = [engine.train_step(batches(case, s), s) for s in range(STEPS)]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return {
        "losses": [s.loss for s in stats],
        "grad_norms": [s.grad_norm for s in stats],
        "n_tokens": [s.n_tokens for s in stats],
        "val": [engine.eval_step(b) for b in batches(case, STEPS)],  # per micro-batch
        "params": params,
    }


@dataclass(frozen=True)
class Run:
    """One parallel training run to compare with the single-process reference."""

    degrees: dict
    """ParallelArgs keys (tp, pp, cp, dp, sequence_parallel); dp is derived from the world size
    when left out."""
    case: Case = field(default_factory=Case)
    distributed_optimizer: bool = True
    """Megatron's DistributedOptimizer (sharded AdamW state) or its plain data-parallel one."""
    resume_after: int | None = None
    """Rebuild the engine from the state_dict after this many steps (a resume)."""
    precision: str = "fp32"
    """optim.precision of the run."""
    steps: int = STEPS
    """Optimizer steps to train (the schedule still spans max(STEPS, steps))."""
    fixed_batch: bool = False
    """Train every step on the batch of step 0 (a loss that can fall on random tokens)."""
    without_megatron_globals: bool = False
    """Clear megatron-core's parallel_state globals once the engine is built: every megatron
    call must then get its groups from the engine (ParallelGroups.megatron), or fail."""


def parity_rank(rank: int, world: int, runs: list[Run]) -> list[dict]:
    """Each run in turn on these ranks: STEPS steps of MegatronEngine on this rank's share,
    then one eval_step; what to compare, per run."""
    return [_parity_run(world, run) for run in runs]


def _through_disk(state: dict) -> dict:
    """`state` with its model-space tensors written to a directory (every rank's pieces, as a
    checkpoint does) and replaced by the reference that loads them back."""
    import tempfile

    from train.sharded_state import ShardedStateRef

    where = [tempfile.mkdtemp(prefix="halotron-resume-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where, src=0)
    path = Path(where[0]) / "engine.tensors"
    state["tensors"].save(path)
    dist.barrier()
    return {**state, "tensors": ShardedStateRef(path.name, path)}


def _parity_run(world: int, run: Run) -> dict:
    from parallel.layout import Layout
    from train.config import ParallelArgs
    from train.megatron_engine import MegatronEngine

    case = run.case
    layout = Layout.create(
        ParallelArgs(**run.degrees), world, case.model_args(), case.attn_cfg(), case.seq_len
    )
    groups = layout.initialize()

    def build() -> MegatronEngine:
        return MegatronEngine(
            case.model_args(),
            case.attn_cfg(),
            layout,
            groups,
            dataclasses.replace(OPTIM, precision=run.precision),
            SCHEDULE,
            total_steps=max(STEPS, run.steps),
            seed=SEED,
            distributed_optimizer=run.distributed_optimizer,
        )

    try:
        engine = build()
        if run.without_megatron_globals:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()  # the groups live on; the globals are None
        per_dp = case.micro_batches // layout.dp
        lo = groups.dp_rank * per_dp
        stats = []
        for step in range(run.steps):
            if step == run.resume_after:
                state = _through_disk(engine.state_dict())
                engine = build()  # starts again from the seed's weights ...
                engine.load_state_dict(state)  # ... and continues from the saved step
                dist.barrier()
                if dist.get_rank() == 0:
                    shutil.rmtree(state["tensors"].path.parent)
            data = batches(case, 0 if run.fixed_batch else step)
            stats.append(engine.train_step(data[lo : lo + per_dp], step))
        # The gradient buffer of the last step (reduced where this rank owns it).
        main_grads = {
            engine.stage.global_name(k): v.main_grad.detach().clone()
            for k, v in engine.stage.named_parameters()
            if v.requires_grad  # not the encoder's frozen pooler
        }
        master_dtypes = {p.dtype for groups in engine._master_params() for g in groups for p in g}
        # Each dp rank evaluates its own batch; eval_step sums over all of them.
        val = engine.eval_step(batches(case, STEPS)[groups.dp_rank])
        shards = {
            engine.stage.global_name(k): v.detach().clone()
            for k, v in engine.stage.named_parameters()
        }
        dist.barrier()
    finally:
        Layout.destroy()
    return {
        "losses": [s.loss for s in stats],
        "grad_norms": [s.grad_norm for s in stats],
        "n_tokens": [s.n_tokens for s in stats],
        "val": val,
        "shards": shards,
        "main_grads": main_grads,
        "param_dtypes": {v.dtype for v in shards.values()},
        "master_dtypes": master_dtypes,
        "coords": (groups.tp_rank, groups.pp_rank, groups.cp_rank, groups.dp_rank),
    }


def assemble(results: list[dict], case: Case) -> dict[str, torch.Tensor]:
    """The single-process parameters from the shards of the (cp, dp) = (0, 0) ranks, after
    checking that every cp / dp replica (and the tied embedding's copies) agree exactly, and so
    do the tp ranks' copies of the replicated norm weights (under sequence parallelism each tp
    rank computes their gradient on its own shard of the sequence)."""
    from parallel.tensor_parallel import unshard_param
    from parallel.tp_plan import split_view

    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for res in results:
        tp_rank = res["coords"][0]
        for name, tensor in res["shards"].items():
            held = pieces.setdefault(name, {})
            if tp_rank in held:
                if not torch.equal(held[tp_rank], tensor):
                    raise AssertionError(f"replicas of {name} (tp rank {tp_rank}) differ")
            else:
                held[tp_rank] = tensor
    args = case.model_args()
    for name, held in pieces.items():
        _, dim = split_view(name, held[0].shape, args)
        if dim < 0 and any(not torch.equal(held[0], t) for t in held.values()):
            raise AssertionError(f"the tp ranks' copies of {name} differ")
    return {
        name: unshard_param(name, [held[r] for r in sorted(held)], args)
        for name, held in pieces.items()
    }
