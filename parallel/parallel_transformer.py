"""The transformer with Megatron-core tensor-parallel layers, one pipeline stage per module.

    from parallel.parallel_transformer import MegatronLinears, ParallelTransformer, parallel_lm_loss
    stage = ParallelTransformer(args, attn_cfg, layout, groups, seed=0)  # = Transformer(seed=0)
    logits_local = stage(tokens_bn, position_ids_bn, step=0)       # last stage: [b, n, V/tp]
    loss_sum, n_tokens = parallel_lm_loss(logits_local, labels_bn, loss_mask_bn, stage)

The blocks are model.transformer's own `Block`s built through `MegatronLinears`:
ColumnParallelLinear for the QKV and MLP-in projections, RowParallelLinear for the attention
output and MLP-out, VocabParallelEmbedding for the tokens and a ColumnParallelLinear LM head
(sharing the embedding's weight when tied) whose vocab-sharded logits go to
parallel.vocab_loss (Megatron's arithmetic, on our tp group). Attention is
`cp_sparse_attention` on the cp group, which needs
the sequence already sharded (parallel.layout.shard_sequence): a rank sees n = N / cp tokens
and their global positions. The weights are the single-process `Transformer(args, seed=seed)`'s,
sliced (`shard_param`): that is what makes the parallel run comparable to one process.
With `params_dtype=torch.bfloat16` the weights and the activations between blocks and stages
are bf16 (the logits and the loss fp32); `ModelArgs.recompute` checkpoints every block.
Pipeline stages other than the first take their input from `set_input_tensor` ([n, b, c], the
layout Megatron's schedules send) and all but the last return that layout too.

Sequence parallelism (`layout.sequence_parallel`, Megatron-LM's --sequence-parallel): outside
the tensor-parallel regions (norms, residual adds, pipeline sends) a tp rank holds only its
1/tp of the sequence, [b, n/tp, c]. Megatron's own layers do the communication: the embedding
reduce-scatters its partial sums to the sequence shard, every ColumnParallelLinear (QKV, MLP-in,
LM head) all-gathers its input along the sequence, every RowParallelLinear (attention out,
MLP-out) reduce-scatters its output along it (all in the backward mirrored), and the norm
weights, replicated over tp but fed one shard each, carry `sequence_parallel=True` so that
finalize_model_grads sums their gradients over tp. Those layers split dim 0 of Megatron's
[n, b, c]; the blocks keep [b, n, c], so the wrappers below transpose around them (views: the
residual stream stays physically [n/tp, b, c], and with b = 1 nothing is copied). The pipeline
sends [n/tp, b, c], the shape Megatron's schedules derive from config.sequence_parallel. The
norms are our RMSNorm either way: Apex / Transformer Engine norms are not needed.
Shapes: b batch, n local tokens (this cp rank's), c d_model, v vocab; V the padded vocab.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.enums import ModelType
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from model.layers import RMSNorm
from model.sparse import SparsityConfig, sparse_attention
from model.transformer import Block, ModelArgs, Transformer, run_blocks
from parallel.context_parallel import cp_sparse_attention
from parallel.layout import Layout, ParallelGroups
from parallel.traffic import TrafficCounter
from parallel.vocab_loss import vocab_parallel_cross_entropy

__all__ = [
    "MegatronLinears",
    "ParallelTransformer",
    "parallel_lm_loss",
    "megatron_config",
    "shard_param",
    "unshard_param",
]


def megatron_config(
    layout: Layout, args: ModelArgs, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """The config our layers and Megatron's schedules read: `params_dtype` (fp32 or bf16) for
    the weights and the pipeline's p2p activations, CPU allocation, no Megatron init (the
    weights are copied from the single-process model). A TransformerConfig rather than a
    ModelParallelConfig because the schedules read its fields (hidden_size for the p2p shape
    [n, b, hidden], calculate_per_token_loss: our loss function already divides by the step's
    tokens). `sequence_parallel` switches Megatron's layers, schedules (p2p shape
    [n/tp, b, hidden]) and finalize_model_grads (tp all-reduce of the norms' gradients)."""
    return TransformerConfig(
        num_layers=args.n_layers,
        hidden_size=args.d_model,
        num_attention_heads=args.n_heads,
        ffn_hidden_size=args.hidden,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,
        calculate_per_token_loss=True,
        # gloo has no coalesced batch_isend_irecv: plain isend/irecv pairs.
        batch_p2p_comm=False,
    )


def _no_init(weight: torch.Tensor) -> None:
    """Megatron's init hook; unused because the weights are copied in afterwards."""


class _Column(ColumnParallelLinear):
    """ColumnParallelLinear returning only its output (no bias term), [b, n, out/tp]. With
    sequence parallelism it takes this rank's sequence shard [b, n/tp, in] and all-gathers it
    along the sequence (Megatron's dim 0, hence the transposes)."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None) -> Any:  # type: ignore[override]
        if not self.sequence_parallel:
            return super().forward(input_, weight)[0]
        # contiguous: the all-gather sends the tensor's memory as is.
        output_nbo = super().forward(input_.transpose(0, 1).contiguous(), weight)[0]
        return output_nbo.transpose(0, 1)


class _Row(RowParallelLinear):
    """RowParallelLinear (input already split) returning only its reduced output [b, n, out];
    with sequence parallelism reduce-scattered along the sequence to [b, n/tp, out]."""

    def forward(self, input_: torch.Tensor) -> Any:  # type: ignore[override]
        if not self.sequence_parallel:
            return super().forward(input_)[0]
        return super().forward(input_.transpose(0, 1))[0].transpose(0, 1)


class _Embedding(VocabParallelEmbedding):
    """VocabParallelEmbedding of [b, n] tokens as [b, n, c]; with sequence parallelism
    (`reduce_scatter_embeddings`) Megatron returns the reduce-scattered [n/tp, b, c] and this
    gives it back as this rank's sequence shard [b, n/tp, c]."""

    def forward(self, input_: torch.Tensor) -> Any:  # type: ignore[override]
        output = super().forward(input_)
        return output.transpose(0, 1) if self.reduce_scatter_embeddings else output


class MegatronLinears:
    """model.layers.Linears with Megatron-core tensor-parallel layers over `tp_group`."""

    def __init__(self, config: ModelParallelConfig, tp_group: dist.ProcessGroup) -> None:
        self.config = config
        self.tp_group = tp_group
        self.tp_size = tp_group.size()

    def column(self, in_features: int, out_features: int, tied: bool = False) -> nn.Module:
        return _mark_sharded(
            _Column(
                in_features,
                out_features,
                config=self.config,
                init_method=_no_init,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=tied,
                tp_group=self.tp_group,
            ),
            dim=0,
        )

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return _mark_sharded(
            _Row(
                in_features,
                out_features,
                config=self.config,
                init_method=_no_init,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=False,
                tp_group=self.tp_group,
            ),
            dim=1,
        )

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return _mark_sharded(
            _Embedding(
                vocab_size,
                dim,
                init_method=_no_init,
                reduce_scatter_embeddings=self.config.sequence_parallel,
                config=self.config,
                tp_group=self.tp_group,
            ),
            dim=0,
        )


def _mark_sharded(layer: nn.Module, dim: int) -> nn.Module:
    """Flag the weight as a tensor-parallel shard split along `dim` (what gradient clipping and
    checkpoints read). Megatron sets these attributes only inside its own weight init, which
    `perform_initialization=False` skips."""
    weight = getattr(layer, "weight", None)
    if weight is not None:
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(weight, attr):
                delattr(weight, attr)
        set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
    return layer


class ParallelTransformer(nn.Module):
    """This rank's pipeline stage of `Transformer`, tensor- and context-parallel.

    Parameter names are the single-process model's (`embed.weight`, `blocks.{i}.attn.qkv.weight`
    with i local to the stage, `norm.weight`, `lm_head.weight`); `global_name` maps them back.
    With tied embeddings and pp > 1 the last stage holds its own copy of the embedding as
    `lm_head.weight` (marked `shared`); Megatron's finalize_model_grads all-reduces the two
    copies' gradients over the embedding group.
    """

    def __init__(
        self,
        args: ModelArgs,
        attn_cfg: SparsityConfig,
        layout: Layout,
        groups: ParallelGroups,
        seed: int = 0,
        full: Transformer | None = None,
        params_dtype: torch.dtype = torch.float32,
        traffic: TrafficCounter | None = None,
    ) -> None:
        """traffic: counts the bytes and time of the context-parallel exchanges (cp > 1)."""
        super().__init__()
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        self.args = args
        self.attn_cfg = attn_cfg
        self.layout = layout
        self.groups = groups
        self.config = megatron_config(layout, args, params_dtype)
        self.pre_process = groups.is_first_stage
        self.post_process = groups.is_last_stage
        self.padded_vocab = layout.padded_vocab(args.vocab_size)
        self.vocab_per_rank = self.padded_vocab // layout.tp
        self.layers = layout.layers_of_stage(args.n_layers, groups.pp_rank)
        self.input_tensor: torch.Tensor | None = None
        linears = MegatronLinears(self.config, groups.tp)
        attention_fn: Any = sparse_attention
        if layout.cp > 1:
            attention_fn = functools.partial(cp_sparse_attention, group=groups.cp, traffic=traffic)
        self.embed: nn.Module | None = None
        if self.pre_process:
            self.embed = linears.embedding(self.padded_vocab, args.d_model)
        self.blocks = nn.ModuleList(
            Block(args, attn_cfg, attention_fn, i, linears) for i in self.layers
        )
        self.norm: RMSNorm | None = None
        self.lm_head: nn.Module | None = None
        # Read by Megatron's finalize_model_grads (with shared_embedding_or_output_weight).
        self.share_embeddings_and_output_weights = args.tie_embeddings
        self.shares_embedding = args.tie_embeddings and self.pre_process
        if self.post_process:
            self.norm = RMSNorm(args.d_model, args.norm_eps)
            self.lm_head = linears.column(
                args.d_model, self.padded_vocab, tied=self.shares_embedding
            )
            if args.tie_embeddings and not self.pre_process:
                # The last stage's copy of the embedding: Megatron's gradient norm counts
                # parameters marked shared only once (on the first stage).
                self.lm_head.weight.shared = True  # type: ignore[union-attr]
        tied = self.shared_embedding_or_output_weight()
        if tied is not None and layout.pp > 1:
            # Megatron's DDP gives parameters marked so a bucket of their own, so that both
            # stages shard the embedding's gradient alike over data x context ranks: the
            # first/last-stage all-reduce then adds matching, already reduced, shards.
            tied.shared_embedding = True  # type: ignore[attr-defined]
        self.load_full(full if full is not None else Transformer(args, attn_cfg, seed=seed))
        # bf16: every parameter (the norms' too) in bf16, the cast Megatron's Float16Module
        # makes. Its wrapper is not needed: the inputs are integer tokens and the logits are
        # already returned in fp32.
        self.to(params_dtype)
        if layout.sequence_parallel:
            for norm in (m for m in self.modules() if isinstance(m, RMSNorm)):
                # Each tp rank's gradient covers its sequence shard only: finalize_model_grads
                # sums the parameters marked so over tp (with config.sequence_parallel).
                norm.weight.sequence_parallel = True  # type: ignore[attr-defined]

    def global_name(self, name: str) -> str:
        """The single-process parameter name of local parameter `name`."""
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            return f"blocks.{self.layers[int(index)]}.{rest}"
        if name == "lm_head.weight" and self.args.tie_embeddings:
            return "embed.weight"
        return name

    @torch.no_grad()
    def load_full(self, full: Transformer) -> None:
        """Copy this rank's slices of the single-process model's parameters."""
        full_params = dict(full.named_parameters(remove_duplicate=False))
        for name, param in self.named_parameters():
            source = full_params[self.global_name(name)]
            param.copy_(
                shard_param(
                    self.global_name(name), source, self.groups.tp_rank, self.layout.tp, self.args
                )
            )

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
    ) -> torch.Tensor:
        """Last stage: this tp rank's logits [b, n, V/tp] (float32); other stages: the hidden
        states [n, b, c] for the next stage ([n/tp, b, c] with sequence parallelism: this tp
        rank's shard). `padding_mask_bn` is the full [b, N] mask."""
        if self.embed is not None:
            assert tokens_bn is not None
            x = self.embed(tokens_bn)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a non-first pipeline stage needs set_input_tensor first")
            x = self.input_tensor.transpose(0, 1)
        x = run_blocks(self.blocks, x, position_ids_bn, step, padding_mask_bn, self.args.recompute)
        if not self.post_process:
            return x.transpose(0, 1).contiguous()
        assert self.norm is not None and self.lm_head is not None
        weight = None
        if self.shares_embedding:
            assert self.embed is not None
            weight = self.embed.weight
        return self.lm_head(self.norm(x), weight).float()

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The parameter holding the tied word embedding on this stage, if any (Megatron's
        finalize_model_grads all-reduces its gradient between the first and last stage)."""
        if not self.args.tie_embeddings:
            return None
        holder = self.embed if self.embed is not None else self.lm_head
        weight = None if holder is None else holder.weight
        assert weight is None or isinstance(weight, torch.Tensor)
        return weight

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
        if gname.endswith(("embed.weight", "lm_head.weight")):
            start = rank * local.shape[0]
            rows = max(0, min(args.vocab_size - start, local.shape[0]))
            shape = torch.Size([args.vocab_size, local.shape[1]])
            return gname, shape, [((start, 0), local[:rows])] if rows else []
        full_shape = torch.Size([local.shape[0] * tp, *local.shape[1:]])
        if gname.endswith(("attn.out.weight", "mlp.down.weight")):
            shape = torch.Size([local.shape[0], local.shape[1] * tp])
            return gname, shape, [((0, rank * local.shape[1]), local)]
        view, dim = _split_view(gname, full_shape, args)
        if dim < 0:
            return gname, local.shape, [((0,) * local.dim(), local)]
        # [q | k | v] (3 parts) or [gate | up] (2 parts) or one part, each split over tp.
        parts = view[0] if len(view) > local.dim() else 1
        rows = local.shape[0] // parts
        pieces: list[tuple[tuple[int, ...], torch.Tensor]] = [
            ((part * rows * tp + rank * rows, 0), local[part * rows : (part + 1) * rows])
            for part in range(parts)
        ]
        return gname, full_shape, pieces


def parallel_lm_loss(
    logits_bnv: torch.Tensor,
    labels_bn: torch.Tensor,
    loss_mask_bn: torch.Tensor,
    stage: ParallelTransformer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """model.transformer.lm_loss over vocab-sharded logits: (summed CE, token count) of this
    rank's tokens. The padded vocabulary rows are masked out of the softmax."""
    start = stage.groups.tp_rank * stage.vocab_per_rank
    cols = torch.arange(start, start + stage.vocab_per_rank, device=logits_bnv.device)
    padded = cols >= stage.args.vocab_size
    if bool(padded.any()):
        logits_bnv = logits_bnv.masked_fill(padded, torch.finfo(logits_bnv.dtype).min)
    else:
        logits_bnv = logits_bnv.clone()  # Megatron's CE subtracts the max in place
    mask = loss_mask_bn.float()
    labels = labels_bn.masked_fill(mask == 0, 0)
    losses = vocab_parallel_cross_entropy(logits_bnv.contiguous(), labels, stage.groups.tp)
    return (losses * mask).sum(), mask.sum()


# ---- slicing the single-process weights ------------------------------------------------------


def _split_view(name: str, shape: torch.Size, args: ModelArgs) -> tuple[tuple[int, ...], int]:
    """How `name` is split over tp: (a view of the full weight, the dimension to chunk)."""
    if name.endswith("attn.qkv.weight"):
        return (3, args.n_heads, args.head_dim, args.d_model), 1
    if name.endswith("mlp.up.weight") and args.mlp == "swiglu":
        return (2, args.hidden, args.d_model), 1
    if name.endswith(("attn.out.weight", "mlp.down.weight")):
        return tuple(shape), 1
    if name.endswith(("embed.weight", "lm_head.weight", "mlp.up.weight")):
        return tuple(shape), 0
    return tuple(shape), -1  # replicated (norms)


def _pad_vocab(name: str, weight: torch.Tensor, args: ModelArgs, tp: int) -> torch.Tensor:
    if not name.endswith(("embed.weight", "lm_head.weight")):
        return weight
    padded = Layout(tp=tp).padded_vocab(args.vocab_size)
    return torch.cat([weight, weight.new_zeros(padded - weight.shape[0], weight.shape[1])])


def shard_param(
    name: str, full: torch.Tensor, tp_rank: int, tp: int, args: ModelArgs
) -> torch.Tensor:
    """Tensor-parallel rank `tp_rank`'s slice of the single-process parameter `name`. QKV keeps
    [q | k | v] of this rank's heads, SwiGLU's up keeps [gate | up] of its hidden units."""
    full = _pad_vocab(name, full.detach(), args, tp)
    view, dim = _split_view(name, full.shape, args)
    if dim < 0:
        return full.clone()
    piece = full.reshape(view).chunk(tp, dim=dim)[tp_rank]
    if len(view) > full.dim():  # split inside a [q | k | v] or [gate | up] view
        piece = piece.reshape(-1, full.shape[-1])
    return piece.clone()


def unshard_param(name: str, shards: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """The single-process parameter `name` from its tp shards (in tp-rank order)."""
    tp = len(shards)
    width = shards[0].shape[-1] if shards[0].dim() > 1 else 0
    padded = Layout(tp=tp).padded_vocab(args.vocab_size)
    full_shape = torch.Size([shards[0].shape[0] * tp, width])
    if name.endswith(("attn.out.weight", "mlp.down.weight")):
        full_shape = torch.Size([shards[0].shape[0], width * tp])
    elif name.endswith(("embed.weight", "lm_head.weight")):
        full_shape = torch.Size([padded, width])
    view, dim = _split_view(name, full_shape, args)
    if dim < 0:
        return shards[0].clone()
    local_view = list(view)
    local_view[dim] //= tp
    full = torch.cat([s.reshape(local_view) for s in shards], dim=dim).reshape(full_shape)
    if name.endswith(("embed.weight", "lm_head.weight")):
        full = full[: args.vocab_size]
    return full
