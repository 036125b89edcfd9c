"""The parallel layout: tensor (tp), pipeline (pp), context (cp) and data (dp) degrees.

    from parallel.layout import Layout
    layout = Layout.create(cfg.parallel, world_size, cfg.model, cfg.attention, cfg.train.seq_len)
    groups = layout.initialize()          # after torch.distributed.init_process_group
    batch_local = shard_sequence(batch, groups.cp_rank, layout.cp)

One object, validated when it is built and before any process group exists: the degrees
multiply to the world size, tp divides the heads and the MLP width, pp the layers, cp the
sequence blocks; the vocabulary is padded to a multiple of tp * VOCAB_MULTIPLE (Megatron's
VocabParallelEmbedding splits rows evenly). With `sequence_parallel` (Megatron's tensor-parallel
sequence parallelism) tp must be > 1 (refused otherwise, as Megatron's own config does: there is
nothing to split over) and divide each cp rank's n = seq_len / cp tokens. Every failure is a
ValueError naming the key.
`initialize()` builds the groups with megatron-core's parallel_state (rank order tp, cp, dp, pp:
tp varies fastest) once, and returns them as `ParallelGroups`; from there every user gets them
explicitly: the model's layers and `cp_sparse_attention`, megatron-core's DDP, optimizer,
schedules and finalize_model_grads (`ParallelGroups.megatron()`, a ProcessGroupCollection),
DeepSpeed (`mpu`). Nothing reads megatron's parallel_state globals after `initialize`
(tests/distributed/test_megatron_parity.py clears them and trains). Shapes: b batch, n tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.sparse import SparsityConfig
from model.transformer import ModelArgs

__all__ = [
    "Layout",
    "ParallelGroups",
    "VOCAB_MULTIPLE",
    "shard_sequence",
    "SEQUENCE_KEYS",
    "sequence_parallel_refusal",
    "check_split",
]

VOCAB_MULTIPLE = 128
"""The vocabulary is padded to a multiple of tp * VOCAB_MULTIPLE rows (as Megatron does)."""

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Batch entries [b, n] that a context-parallel rank keeps only its slice of."""


def sequence_parallel_refusal(tp: int, sequence_parallel: object) -> str | None:
    """Why `parallel.sequence_parallel` cannot be used with `parallel.tp`, or None. Checked by
    train.config when the config loads and by Layout when it is built."""
    if not isinstance(sequence_parallel, bool):
        return f"parallel.sequence_parallel={sequence_parallel!r} must be true or false"
    if sequence_parallel and tp == 1:
        return (
            "parallel.sequence_parallel=true splits the sequence over the tensor-parallel ranks "
            "and needs parallel.tp > 1, but parallel.tp=1; set it to false"
        )
    return None


def check_split(
    tp: int,
    pp: int,
    cp: int,
    sequence_parallel: bool,
    model: ModelArgs,
    attention: SparsityConfig,
    seq_len: int,
) -> None:
    """Raise ValueError (naming the key) if these degrees cannot split the model or sequence:
    the one check, made when the config loads (train.config) and when the Layout is built."""
    if model.n_heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.n_heads={model.n_heads}")
    if model.hidden % tp:
        raise ValueError(
            f"parallel.tp={tp} must divide the MLP width {model.hidden} (model.ffn_hidden)"
        )
    if model.n_layers % pp:
        raise ValueError(f"parallel.pp={pp} must divide model.n_layers={model.n_layers}")
    block = attention.block_size
    if cp > 1 and (seq_len % block or (seq_len // block) % cp):
        raise ValueError(
            f"parallel.cp={cp} * attention.block_size={block} = {cp * block} must "
            f"divide train.seq_len={seq_len} (each cp rank holds whole blocks)"
        )
    n_local = seq_len // cp
    if sequence_parallel and n_local % tp:
        raise ValueError(
            f"parallel.sequence_parallel=true splits each cp rank's train.seq_len / "
            f"parallel.cp = {n_local} tokens over parallel.tp={tp} ranks, which must "
            "divide them"
        )


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups and this rank's coordinates, as built by `Layout.initialize`."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    """Data parallel without cp (ranks that hold the same sequence slice of other samples)."""
    dp_cp: dist.ProcessGroup
    """Data x context parallel: the ranks whose gradients are summed."""
    model: dist.ProcessGroup
    """Tensor x pipeline parallel: the ranks that together hold one copy of the model."""
    embedding: dist.ProcessGroup | None
    """First and last pipeline stage (the tied embedding's two copies); None without pp."""
    expert: dist.ProcessGroup
    """megatron-core's expert-model-parallel group: this rank alone (the model has no experts;
    megatron's DistributedDataParallel asks for it)."""
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp.size() - 1

    def megatron(self) -> Any:
        """These groups as megatron-core's ProcessGroupCollection, handed explicitly to its
        DistributedDataParallel, optimizer, forward/backward schedule and finalize_model_grads
        (train.megatron_engine), so that none of them reads parallel_state's globals. No
        experts: the expert groups are the dense ones (expert data parallel = data x context,
        expert tensor x pipeline = model); one distributed-optimizer instance spans the world."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        pgs = ProcessGroupCollection()
        pgs.tp, pgs.pp, pgs.cp, pgs.dp, pgs.dp_cp = self.tp, self.pp, self.cp, self.dp, self.dp_cp
        pgs.mp, pgs.tp_ep_pp = self.model, self.model
        pgs.embd, pgs.pos_embd = self.embedding, None
        pgs.ep, pgs.expt_dp = self.expert, self.dp_cp
        pgs.intra_dist_opt = dist.group.WORLD
        return pgs


@dataclass(frozen=True)
class Layout:
    """Degrees of the four parallel dimensions; tp * pp * cp * dp = world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    """Megatron's sequence parallelism: between the tensor-parallel regions (norms, residual
    adds, pipeline sends) each tp rank holds 1/tp of the sequence instead of all of it."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name}={value!r} must be a positive integer")
        reason = sequence_parallel_refusal(self.tp, self.sequence_parallel)
        if reason is not None:
            raise ValueError(reason)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @classmethod
    def create(
        cls,
        parallel: object,
        world_size: int,
        model: ModelArgs,
        attention: SparsityConfig,
        seq_len: int,
    ) -> Layout:
        """The layout of `parallel` (a ParallelArgs: tp, pp, cp, dp or None, sequence_parallel)
        on `world_size` ranks, checked against the model and the sequence length."""
        tp, pp, cp = (getattr(parallel, k) for k in ("tp", "pp", "cp"))
        sequence_parallel = getattr(parallel, "sequence_parallel", False)
        dp = getattr(parallel, "dp", None)
        if dp is None:
            if world_size % (tp * pp * cp):
                raise ValueError(
                    f"parallel.tp={tp} * parallel.pp={pp} * parallel.cp={cp} = {tp * pp * cp} "
                    f"must divide the world size {world_size} (parallel.dp is derived from it)"
                )
            dp = world_size // (tp * pp * cp)
        layout = cls(tp, pp, cp, dp, sequence_parallel=sequence_parallel)
        layout.check_world(world_size)
        layout.check_model(model, attention, seq_len)
        return layout

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"parallel.tp={self.tp} * parallel.pp={self.pp} * parallel.cp={self.cp} * "
                f"parallel.dp={self.dp} = {self.world_size} must equal the world size "
                f"{world_size}"
            )

    def check_model(self, model: ModelArgs, attention: SparsityConfig, seq_len: int) -> None:
        """Raise ValueError (naming the key) if the model or sequence cannot be split."""
        check_split(self.tp, self.pp, self.cp, self.sequence_parallel, model, attention, seq_len)

    def padded_vocab(self, vocab_size: int) -> int:
        """Rows of the vocab-parallel embedding: vocab_size rounded up to tp * VOCAB_MULTIPLE."""
        multiple = self.tp * VOCAB_MULTIPLE
        return -(-vocab_size // multiple) * multiple

    def layers_of_stage(self, n_layers: int, pp_rank: int) -> range:
        """Global indices of the transformer blocks on pipeline stage `pp_rank`."""
        per = n_layers // self.pp
        return range(pp_rank * per, (pp_rank + 1) * per)

    def initialize(self, timeout_minutes: float = 10.0) -> ParallelGroups:
        """Create the groups with megatron-core (torch.distributed must be initialised with
        this layout's world size) and return them with this rank's coordinates. A collective
        on them that waits longer than `timeout_minutes` fails (megatron-core's own default
        is 30 minutes); each group carries megatron's `group_desc` (e.g.
        CONTEXT_PARALLEL_GROUP); parallel.collective_timeout names the group in the error."""
        if not dist.is_initialized():
            raise RuntimeError("Layout.initialize needs torch.distributed to be initialised")
        from megatron.core import parallel_state as ps

        self.check_world(dist.get_world_size())
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            create_gloo_process_groups=False,
            distributed_timeout_minutes=timeout_minutes,  # type: ignore[arg-type]
        )
        return ParallelGroups(
            tp=ps.get_tensor_model_parallel_group(),
            pp=ps.get_pipeline_model_parallel_group(),
            cp=ps.get_context_parallel_group(),
            dp=ps.get_data_parallel_group(),
            dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
            model=ps.get_model_parallel_group(),
            embedding=ps.get_embedding_group() if self.pp > 1 else None,
            expert=ps.get_expert_model_parallel_group(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            cp_rank=ps.get_context_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
        )

    @staticmethod
    def destroy() -> None:
        """Forget megatron-core's groups (before another initialize in the same process)."""
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()


def shard_sequence(
    batch: dict[str, torch.Tensor], cp_rank: int, cp: int
) -> dict[str, torch.Tensor]:
    """This cp rank's contiguous slice [r*n/cp, (r+1)*n/cp) of every SEQUENCE_KEYS entry.

    Other entries (a full [b, N] padding_mask, which cp_sparse_attention wants whole) are kept.
    """
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in batch:
            value = batch[key]
            n_local = value.shape[1] // cp
            out[key] = value[:, cp_rank * n_local : (cp_rank + 1) * n_local]
    return out
