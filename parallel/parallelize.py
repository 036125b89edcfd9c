"""Tensor, pipeline and context parallelism applied to the single-device model.

    from parallel.parallelize import parallelize
    stage = parallelize(build_model(args, attn_cfg, seed=0), layout, groups)   # this rank's
    logits_local = stage(tokens_bn, position_ids_bn, step=0)       # last stage: [b, n, V/tp]

Each architecture is defined once (model/transformer.py's decoder, model/encoder.py's
encoder, registered in model.registry; both model.transformer.ModelBase); this module turns
one instance into this rank's pipeline stage, the split torchtitan makes between a model.py
and its parallelize.py:
1. pipeline: the blocks of this stage stay (a ModuleDict keyed by their global index, so the
   parameter names are the single-process ones), the model's `first_stage` modules (the
   embeddings) only on the first stage, its `last_stage` ones (final norm or MLM head, LM head)
   only on the last;
2. tensor: each projection named in parallel.tp_plan.TP_PLAN is replaced by its Megatron-core
   tensor-parallel layer (parallel.tensor_parallel) holding this tp rank's slice of the
   original weight (and bias); with sequence parallelism a model that adds learned positions
   to the word embedding (`sums_embeddings`) gets `split_sequence` for the sum;
3. context: with cp > 1 every attention computes with cp_sparse_attention on the cp group.
`ParallelStage` wraps the result for Megatron's schedules: `set_input_tensor` (a later stage's
input, [n, b, c]), `config`, `model_type`, the tied embedding's bookkeeping, and the map from
its parameters to the single-process names and boxes (`global_name`, `sharded_pieces`) that
checkpoints reshard with. Its forward is the model's own.
Shapes: b batch, n local tokens (this cp rank's), c d_model; V the padded vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.enums import ModelType
from torch import nn

from model.sparse import SparsityConfig
from model.transformer import Attention, ModelArgs, ModelBase
from parallel.context_parallel import cp_sparse_attention
from parallel.layout import Layout, ParallelGroups
from parallel.tensor_parallel import (
    MegatronLinears,
    full_shape,
    megatron_config,
    shard_param,
    split_sequence,
)
from parallel.tp_plan import TP_PLAN, is_vocab, split_view, tp_kind
from parallel.traffic import TrafficCounter

__all__ = ["TP_PLAN", "ParallelStage", "parallelize"]


def parallelize(
    module: nn.Module,
    layout: Layout,
    groups: ParallelGroups,
    params_dtype: torch.dtype = torch.float32,
    traffic: TrafficCounter | None = None,
    seed: int | None = None,
) -> ParallelStage:
    """This rank's stage of `module` (modified in place) under `layout`. Its weights are the
    model's, sliced; a model built on the meta device (`with torch.device("meta")`) takes them
    from `seed` instead, one parameter at a time (the one-process model's initial values,
    ModelBase.initial_values), so that a rank never holds more than its shard and one full
    parameter. traffic: counts the context-parallel exchanges (cp > 1)."""
    if not isinstance(module, ModelBase):
        raise TypeError(f"parallelize knows model.registry's architectures, not {module!r}")
    model, args = module, module.args
    values: Iterator[tuple[str, torch.Tensor]]
    if any(p.is_meta for p in model.parameters()):
        if seed is None:
            raise ValueError("parallelize needs the seed of a model built on the meta device")
        values = model.initial_values(seed)
    else:  # the model's own weights (a reference for tests), listed before the stage drops any
        values = iter([(n, p.detach()) for n, p in model.named_parameters()])
    config = megatron_config(layout, args, params_dtype)
    first, last = groups.is_first_stage, groups.is_last_stage
    # 1. pipeline
    blocks = list(
        model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks
    )
    layers = layout.layers_of_stage(args.n_layers, groups.pp_rank)
    model.blocks = nn.ModuleDict({str(i): blocks[i] for i in layers})
    for name in () if first else model.first_stage:
        setattr(model, name, None)
    for name in () if last else model.last_stage:
        setattr(model, name, None)
    # 2. tensor: new layers, their weights filled below
    linears = MegatronLinears(config, groups.tp)
    padded_vocab = layout.padded_vocab(args.vocab_size)
    for name, old in list(model.named_modules()):
        kind = tp_kind(name)
        if kind is None:
            continue
        shares = name == "lm_head" and args.tie_embeddings and first  # the embedding's weight
        new = _tp_layer(linears, kind, name, old, padded_vocab, shares, model.sums_embeddings)
        if shares:
            assert model.embed is not None
            new.weight = model.embed.weight
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    if layout.sequence_parallel and model.sums_embeddings and first:
        model.split_sequence = functools.partial(split_sequence, tp_group=groups.tp)
    # 3. context
    for block in model.blocks.values():
        assert isinstance(block.attn, Attention)
        block.attn.local_heads = args.n_heads // layout.tp
        if layout.cp > 1:
            block.attn.attention_fn = functools.partial(
                cp_sparse_attention, group=groups.cp, traffic=traffic
            )
    _fill(model, values, groups.tp_rank, layout.tp)
    return ParallelStage(model, model.attn_cfg, layout, groups, config, params_dtype)


@torch.no_grad()
def _fill(
    model: ModelBase, values: Iterator[tuple[str, torch.Tensor]], tp_rank: int, tp: int
) -> None:
    """Give every parameter of the stage its tp shard of the single-process value of the same
    name (the last stage's own copy of a tied embedding: the embedding's); parameters still on
    the meta device (the norms) are allocated on CPU first."""
    for module in model.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, key, nn.Parameter(torch.empty(param.shape), param.requires_grad))
    args = model.args
    wanted: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        wanted.setdefault(_global_name(name, args), []).append(param)
    for name, full in values:
        for target in wanted.pop(name, []):
            target.copy_(shard_param(name, full, tp_rank, tp, args))
    if wanted:
        raise ValueError(f"no initial value for {sorted(wanted)}")


def _global_name(name: str, args: ModelArgs) -> str:
    """The single-process name of the stage model's parameter `name` (blocks keep their global
    index; the last stage's own copy of a tied embedding is the embedding)."""
    return "embed.weight" if name == "lm_head.weight" and args.tie_embeddings else name


def _tp_layer(
    linears: MegatronLinears,
    kind: str,
    name: str,
    module: nn.Module,
    padded_vocab: int,
    shares: bool,
    sums_embeddings: bool,
) -> nn.Module:
    """The tensor-parallel layer replacing `module` (an nn.Linear, with or without a bias, or
    an nn.Embedding); the embedding and the LM head get the padded vocabulary's rows. A model
    that `sums_embeddings` splits the sequence itself, after the sum (ModelBase)."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    if kind == "embedding":
        return linears.embedding(padded_vocab, weight.shape[1], reduce_scatter=not sums_embeddings)
    out_features, in_features = weight.shape
    if name == "lm_head":
        out_features = padded_vocab
    bias = getattr(module, "bias", None) is not None
    if kind == "row":
        return linears.row(in_features, out_features, bias=bias)
    return linears.column(in_features, out_features, tied=shares, bias=bias)


class ParallelStage(nn.Module):
    """One rank's stage of the model for Megatron's schedules (module doc).

    Parameter names are `model.` and the single-process ones (`model.blocks.{i}...` with i
    global); `global_name` drops the prefix. With tied embeddings and pp > 1 the last stage
    holds its own copy of the embedding as `lm_head.weight` (marked `shared`); Megatron's
    finalize_model_grads all-reduces the two copies' gradients over the embedding group.
    """

    def __init__(
        self,
        model: ModelBase,
        attn_cfg: SparsityConfig,
        layout: Layout,
        groups: ParallelGroups,
        config: Any,
        params_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.model = model
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        self.config = config
        self.args, self.attn_cfg, self.layout, self.groups = model.args, attn_cfg, layout, groups
        self.pre_process, self.post_process = groups.is_first_stage, groups.is_last_stage
        self.layers = layout.layers_of_stage(self.args.n_layers, groups.pp_rank)
        self.padded_vocab = layout.padded_vocab(self.args.vocab_size)
        self.vocab_per_rank = self.padded_vocab // layout.tp
        self.input_tensor: torch.Tensor | None = None
        # Read by Megatron's finalize_model_grads (with shared_embedding_or_output_weight).
        self.share_embeddings_and_output_weights = self.args.tie_embeddings
        if self.args.tie_embeddings and self.post_process and not self.pre_process:
            # The last stage's copy of the embedding: Megatron's gradient norm counts
            # parameters marked shared only once (on the first stage).
            model.lm_head.weight.shared = True  # type: ignore[union-attr]
        tied = self.shared_embedding_or_output_weight()
        if tied is not None and layout.pp > 1:
            # Megatron's DDP gives parameters marked so a bucket of their own, so that both
            # stages shard the embedding's gradient alike over data x context ranks: the
            # first/last-stage all-reduce then adds matching, already reduced, shards.
            tied.shared_embedding = True  # type: ignore[attr-defined]
        # bf16: every parameter (the norms' too) in bf16, the cast Megatron's Float16Module
        # makes. Its wrapper is not needed: the inputs are integer tokens and the logits are
        # already returned in fp32.
        self.to(params_dtype)
        if layout.sequence_parallel:
            for name, param in model.named_parameters():
                if getattr(param, "tensor_model_parallel", False) or not param.requires_grad:
                    continue
                if name.split(".")[0] in model.whole_sequence:
                    continue
                # A replicated parameter (norms, biases of row layers, the MLM head's dense)
                # applied to this rank's sequence shard: its gradient covers that shard only,
                # and finalize_model_grads sums the parameters marked so over tp (with
                # config.sequence_parallel).
                param.sequence_parallel = True  # type: ignore[attr-defined]

    def set_input_tensor(self, input_tensor: Any) -> None:
        """Megatron schedules hand a non-first stage its input here (a list of one tensor)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(
        self,
        tokens_bn: torch.Tensor | None,
        position_ids_bn: torch.Tensor,
        step: int = 0,
        padding_mask_bn: torch.Tensor | None = None,
        global_mask_bn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last stage: this tp rank's logits [b, n, V/tp] (float32); other stages: the hidden
        states [n, b, c] for the next stage ([n/tp, b, c] with sequence parallelism: this tp
        rank's shard). The masks are the full [b, N] ones."""
        if self.pre_process:
            x = tokens_bn
        elif self.input_tensor is None:
            raise RuntimeError("a non-first pipeline stage needs set_input_tensor first")
        else:
            x = self.input_tensor.transpose(0, 1)
        out = self.model(x, position_ids_bn, step, padding_mask_bn, global_mask_bn)
        return out if self.post_process else out.transpose(0, 1).contiguous()

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The parameter holding the tied word embedding on this stage, if any (Megatron's
        finalize_model_grads all-reduces its gradient between the first and last stage)."""
        if not self.args.tie_embeddings:
            return None
        holder = self.model.embed if self.model.embed is not None else self.model.lm_head
        weight = None if holder is None else holder.weight
        assert weight is None or isinstance(weight, torch.Tensor)
        return weight

    def global_name(self, name: str) -> str:
        """The single-process parameter name of local parameter `name`."""
        return _global_name(name.removeprefix("model."), self.args)

    def sharded_pieces(
        self, name: str, local: torch.Tensor
    ) -> tuple[str, torch.Size, list[tuple[tuple[int, ...], torch.Tensor]]]:
        """Where `local`, shaped like local parameter `name` (the parameter itself or, say, its
        Adam moment), lies in the single-process model: (global name, global shape, pieces),
        a piece being (offset in the global tensor, a view of `local`). The global tensors are
        the unpadded single-process ones, so a checkpoint of pieces reshards to any tp / pp:
        QKV gives three pieces ([q | k | v] of this rank's heads), SwiGLU's up two, the
        vocab-sharded embedding / LM head its rows below vocab_size (none when all are
        padding). The inverse of shard_param, piece by piece (train.model_space uses it)."""
        gname = self.global_name(name)
        tp, rank, args = self.layout.tp, self.groups.tp_rank, self.args
        offset_rest = (0,) * (local.dim() - 1)
        if is_vocab(gname):
            start = rank * local.shape[0]
            rows = max(0, min(args.vocab_size - start, local.shape[0]))
            shape = torch.Size([args.vocab_size, *local.shape[1:]])
            return gname, shape, [((start, *offset_rest), local[:rows])] if rows else []
        shape = full_shape(gname, local.shape, tp, args)
        view, dim = split_view(gname, shape, args)
        if dim < 0:
            return gname, local.shape, [((0,) * local.dim(), local)]
        if dim == 1 and len(view) == local.dim():  # a row layer's weight: split along its inputs
            return gname, shape, [((0, rank * local.shape[1]), local)]
        # [q | k | v] (3 parts) or [gate | up] (2 parts) or one part, each split over tp.
        parts = view[0] if len(view) > local.dim() else 1
        rows = local.shape[0] // parts
        pieces: list[tuple[tuple[int, ...], torch.Tensor]] = [
            ((part * rows * tp + rank * rows, *offset_rest), local[part * rows : (part + 1) * rows])
            for part in range(parts)
        ]
        return gname, shape, pieces
