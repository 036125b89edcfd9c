"""Megatron-core tensor-parallel layers for the model's projections, and slicing its weights.

    from parallel.tensor_parallel import MegatronLinears, shard_param, parallel_lm_loss
    linears = MegatronLinears(megatron_config(layout, args), groups.tp)
    qkv = linears.column(d_model, 3 * d_model)          # ColumnParallelLinear, [b, n, 3c/tp]
    qkv.weight.copy_(shard_param("blocks.0.attn.qkv.weight", full_weight, tp_rank, tp, args))

parallel.parallelize uses these to turn a single-device model (the decoder or the encoder) into
one rank's stage:
ColumnParallelLinear for the QKV and MLP-in projections, RowParallelLinear for the attention
output and MLP-out, VocabParallelEmbedding for the tokens and a ColumnParallelLinear LM head
whose vocab-sharded logits go to parallel.vocab_loss (`parallel_lm_loss`: Megatron's
arithmetic, on our tp group). `shard_param` / `unshard_param` cut the single-process weights
into tp shards and join them back (the rule: parallel.tp_plan): QKV keeps [q | k | v] of a
rank's heads, SwiGLU's up [gate | up] of its hidden units, the vocabulary is padded to
Layout.padded_vocab rows; a column layer's bias is cut like its weight's rows, a row layer's
bias stays whole (Megatron adds it after the reduction).

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

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    scatter_to_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from model.transformer import ModelArgs
from parallel.layout import Layout
from parallel.tp_plan import is_vocab, split_view, tp_kind
from parallel.vocab_loss import vocab_parallel_cross_entropy

__all__ = [
    "MegatronLinears",
    "parallel_lm_loss",
    "megatron_config",
    "shard_param",
    "unshard_param",
    "full_shape",
    "split_sequence",
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

    def column(
        self, in_features: int, out_features: int, tied: bool = False, bias: bool = False
    ) -> nn.Module:
        return _mark_sharded(
            _Column(
                in_features,
                out_features,
                config=self.config,
                init_method=_no_init,
                bias=bias,
                gather_output=False,
                skip_weight_param_allocation=tied,
                tp_group=self.tp_group,
            ),
            dim=0,
        )

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return _mark_sharded(
            _Row(
                in_features,
                out_features,
                config=self.config,
                init_method=_no_init,
                bias=bias,
                input_is_parallel=True,
                skip_bias_add=False,
                tp_group=self.tp_group,
            ),
            dim=1,
        )

    def embedding(self, vocab_size: int, dim: int, reduce_scatter: bool = True) -> nn.Module:
        """The vocab-parallel embedding; with sequence parallelism it reduce-scatters its output
        to the sequence shard, unless `reduce_scatter` is False (a model that adds position
        embeddings first and splits the sum itself, `split_sequence`: Megatron's rule)."""
        return _mark_sharded(
            _Embedding(
                vocab_size,
                dim,
                init_method=_no_init,
                reduce_scatter_embeddings=self.config.sequence_parallel and reduce_scatter,
                config=self.config,
                tp_group=self.tp_group,
            ),
            dim=0,
        )


def split_sequence(x_bnc: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """This tp rank's sequence shard [b, n/tp, c] of `x_bnc`, whole on every tp rank (its
    backward all-gathers the shards' gradients): where a model enters the sequence-parallel
    region after summing more than the word embedding (the encoder's learned positions)."""
    x_nbc = scatter_to_sequence_parallel_region(x_bnc.transpose(0, 1).contiguous(), tp_group)
    return x_nbc.transpose(0, 1)


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


def parallel_lm_loss(
    logits_bnv: torch.Tensor,
    labels_bn: torch.Tensor,
    loss_mask_bn: torch.Tensor,
    vocab_size: int,
    tp_group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """model.transformer.lm_loss over vocab-sharded logits (tp rank r holds rows
    [r * v, (r + 1) * v) of the padded vocabulary): (summed CE, token count) of this rank's
    tokens. The padded vocabulary rows (>= vocab_size) are masked out of the softmax."""
    per_rank = logits_bnv.shape[-1]
    start = dist.get_rank(tp_group) * per_rank
    if start + per_rank > vocab_size:  # decided on the host: no device sync
        cols = torch.arange(start, start + per_rank, device=logits_bnv.device)
        padded = cols >= vocab_size
        logits_bnv = logits_bnv.masked_fill(padded, torch.finfo(logits_bnv.dtype).min)
    else:
        logits_bnv = logits_bnv.clone()  # Megatron's CE subtracts the max in place
    mask = loss_mask_bn.float()
    labels = labels_bn.masked_fill(mask == 0, 0)
    losses = vocab_parallel_cross_entropy(logits_bnv.contiguous(), labels, tp_group)
    return (losses * mask).sum(), mask.sum()


# ---- slicing the single-process weights ------------------------------------------------------


def _pad_vocab(name: str, tensor: torch.Tensor, args: ModelArgs, tp: int) -> torch.Tensor:
    """`tensor` with its vocabulary rows padded with zeros to Layout.padded_vocab (a vocabulary
    tensor, parallel.tp_plan.is_vocab), else itself."""
    if not is_vocab(name):
        return tensor
    padded = Layout(tp=tp).padded_vocab(args.vocab_size)
    return torch.cat([tensor, tensor.new_zeros(padded - tensor.shape[0], *tensor.shape[1:])])


def shard_param(
    name: str, full: torch.Tensor, tp_rank: int, tp: int, args: ModelArgs
) -> torch.Tensor:
    """Tensor-parallel rank `tp_rank`'s slice of the single-process parameter `name`
    (parallel.tp_plan.split_view). QKV keeps [q | k | v] of this rank's heads, SwiGLU's up
    keeps [gate | up] of its hidden units; biases are cut like their weights' rows."""
    full = _pad_vocab(name, full.detach(), args, tp)
    view, dim = split_view(name, full.shape, args)
    if dim < 0:
        return full.clone()
    piece = full.reshape(view).chunk(tp, dim=dim)[tp_rank]
    if len(view) > full.dim():  # split inside a [q | k | v] or [gate | up] view
        piece = piece.reshape(-1, *full.shape[1:])
    return piece.clone()


def full_shape(name: str, local: torch.Size, tp: int, args: ModelArgs) -> torch.Size:
    """The single-process shape (vocabulary padded for `tp`) of parameter `name` whose tp shard
    has shape `local`."""
    if is_vocab(name):
        return torch.Size([Layout(tp=tp).padded_vocab(args.vocab_size), *local[1:]])
    module, _, param = name.rpartition(".")
    kind = tp_kind(module)
    if kind is None or (kind == "row" and param != "weight"):
        return local
    if kind == "row":
        return torch.Size([local[0], local[1] * tp])
    return torch.Size([local[0] * tp, *local[1:]])


def unshard_param(name: str, shards: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """The single-process parameter `name` from its tp shards (in tp-rank order)."""
    tp = len(shards)
    shape = full_shape(name, shards[0].shape, tp, args)
    view, dim = split_view(name, shape, args)
    if dim < 0:
        return shards[0].clone()
    local_view = list(view)
    local_view[dim] //= tp
    full = torch.cat([s.reshape(local_view) for s in shards], dim=dim).reshape(shape)
    return full[: args.vocab_size] if is_vocab(name) else full
