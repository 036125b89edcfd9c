"""Pre-norm decoder language model whose attention is an injected (block-sparse) function.

    from model.sparse import SparsityConfig, sparse_attention
    from model.transformer import ModelArgs, Transformer, lm_loss
    model = Transformer(ModelArgs(), SparsityConfig(causal=True), attention_fn=sparse_attention)
    logits = model(tokens_bn, position_ids_bn, step=0)          # [b, n, vocab]
    loss_sum, n_tokens = lm_loss(logits, labels_bn, loss_mask_bn)

Each block is x + attn(norm(x)), then x + mlp(norm(x)); `ModelArgs.recompute` checkpoints every
block (activation recomputation, `run_blocks`). The attention layer computes q, k, v
as [b, h, n, d], rotates q and k with RoPE at `position_ids` (global positions, so a
context-parallel rank passes its own slice of positions) and calls
`attention_fn(q, k, v, attn_cfg, layer=i, step=step, padding_mask=...)`: single-device
`sparse_attention` here, the context-parallel exchange in issue 4. Shapes: b batch, n tokens,
h heads, d head dim, v vocab. In bf16 (parameters or autocast) the attention function is
called in fp32 and its output cast back: the softmax and its log-sum-exp stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.layers import MLP, Linears, LocalLinears, RMSNorm
from model.rope import apply_rope
from model.sparse import SparsityConfig

__all__ = [
    "ModelArgs", "ModelBase", "Transformer", "lm_loss", "run_blocks", "AttentionFn",
    "token_embedding",
]  # fmt: skip

AttentionFn = Callable[..., torch.Tensor]


@dataclass
class ModelArgs:
    """Shape and initialisation of the transformer."""

    arch: str = "transformer"
    """The architecture (model.registry.ARCHITECTURES): "transformer", the decoder-only model
    of this file, or "encoder", the HF RoBERTa / Longformer / BigBird-shaped bidirectional
    encoder with an MLM head (model/encoder.py)."""
    vocab_size: int = 4096
    """Embedding rows; must be >= the tokenizer's vocabulary (checked against the manifest)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model, and d_model / n_heads must be even (RoPE)."""
    ffn_hidden: int | None = None
    """Hidden width of the MLP; None picks 4*d_model for gelu and ~8/3*d_model (a multiple of
    32) for swiglu, which keeps the parameter count equal."""
    mlp: str = "swiglu"
    """Feed-forward kind: "swiglu", "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation,
    HF's "gelu_new" of BigBird). The encoder's feed-forward and MLM head use its GELU."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base; larger values suit longer contexts."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2 * n_layers)."""
    recompute: bool = False
    """Activation recomputation: keep only each block's input during the forward and recompute
    the block's activations during the backward (torch.utils.checkpoint, non-reentrant). Same
    gradients, less memory, about one extra forward of compute. The random-block draw depends on
    (seed, step, layer) only, so the recomputed attention pattern is the original one."""
    max_positions: int = 0
    """Encoder: rows of the learned absolute position embedding (HF max_position_embeddings);
    0 for the decoder (RoPE). Position p of a sequence reads row p + position_offset."""
    position_offset: int = 0
    """Encoder: the first position's row of the position embedding: 2 for RoBERTa and
    Longformer (HF counts from padding_idx + 1; the rows below belong to the padding), 0 for
    BigBird."""
    type_vocab_size: int = 0
    """Encoder: rows of the token type embedding (HF type_vocab_size; every token adds row 0);
    0 for none."""
    pooler: bool = False
    """Encoder: keep HF's pooler (dense over the first token, tanh), which BigBird's MLM
    checkpoints carry; the MLM logits do not use it, it only travels back on export."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} / model.n_heads={self.n_heads} = "
                f"{self.d_model // self.n_heads} must be even for rotary embeddings"
            )
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"model.ffn_hidden={self.ffn_hidden!r} must be positive or null")
        if self.mlp not in ("swiglu", "gelu", "gelu_tanh"):
            raise ValueError(f"model.mlp={self.mlp!r} must be 'swiglu', 'gelu' or 'gelu_tanh'")
        for name in ("max_positions", "position_offset", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"model.{name}={value!r} must be a non-negative integer")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"model.recompute={self.recompute!r} must be true or false")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp != "swiglu":
            return 4 * self.d_model
        return 32 * -(-(8 * self.d_model) // (3 * 32))


def fused_attention(device_type: str) -> bool:
    """Whether the attention on this device runs the fused FlexAttention kernel (the
    backend "auto" of `sparse_attention` / `cp_sparse_attention`): on CUDA."""
    return device_type == "cuda"


class Attention(nn.Module):
    """Multi-head attention through `attention_fn`: one fused [q | k | v] projection (and with
    attention.global_projections a second one for the global queries, keys and values), q and k
    rotated with RoPE (`rope`, the decoder) or not (the encoder, whose positions are learned
    embeddings), the output projection; `bias`: the projections carry biases (BERT's)."""

    def __init__(
        self,
        args: ModelArgs,
        attn_cfg: SparsityConfig,
        attention_fn: AttentionFn,
        layer: int,
        linears: Linears,
        rope: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if args.n_heads % linears.tp_size:
            raise ValueError(
                f"model.n_heads={args.n_heads} must be divisible by the tensor-parallel size "
                f"{linears.tp_size}"
            )
        self.local_heads = args.n_heads // linears.tp_size
        self.head_dim = args.head_dim
        self.rope_theta = args.rope_theta if rope else None
        self.attn_cfg = attn_cfg
        self.attention_fn = attention_fn
        self.layer = layer
        c = args.d_model
        self.qkv = linears.column(c, 3 * c, bias=bias)
        self.out = linears.row(c, c, bias=bias)
        # Longformer's query_global / key_global / value_global (attention.global_projections)
        self.qkv_global = (
            linears.column(c, 3 * c, bias=bias) if attn_cfg.global_projections else None
        )

    def forward(
        self,
        x_bnc: torch.Tensor,
        position_ids_bn: torch.Tensor,
        step: int,
        padding_mask_bn: torch.Tensor | None,
        global_mask_bn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        qkv = self._project(self.qkv, x_bnc, position_ids_bn)  # q, k, v [b, h, n, d]
        if self.qkv_global is not None:
            qkv += self._project(self.qkv_global, x_bnc, position_ids_bn)
        b, _, n, _ = qkv[0].shape
        device_type = x_bnc.device.type
        autocast = torch.is_autocast_enabled(device_type)
        low_precision = qkv[0].dtype in (torch.bfloat16, torch.float16)
        if not (low_precision or autocast):
            o_bhnd = self._attend(qkv, step, padding_mask_bn, global_mask_bn)
        elif fused_attention(device_type):
            # FlexAttention takes bf16 q, k, v as they are and keeps its softmax statistics in
            # fp32 (as FlashAttention does): no fp32 copies of q, k, v.
            dtype = torch.get_autocast_dtype(device_type) if autocast else qkv[0].dtype
            with torch.autocast(device_type, enabled=False):
                qkv = tuple(t.to(dtype) for t in qkv)
                o_bhnd = self._attend(qkv, step, padding_mask_bn, global_mask_bn)
        else:
            # The blocked CPU kernel: its math (scores, softmax, log-sum-exp) stays in fp32. It
            # keeps its log-sum-exp in the input dtype and, under autocast, mixes bf16 matmul
            # outputs with fp32 buffers; fp32 inputs avoid both.
            with torch.autocast(device_type, enabled=False):
                fp32 = tuple(t.float() for t in qkv)
                o_bhnd = self._attend(fp32, step, padding_mask_bn, global_mask_bn)
            o_bhnd = o_bhnd.to(qkv[0].dtype)
        return self.out(o_bhnd.transpose(1, 2).reshape(b, n, -1))

    def _project(self, linear: nn.Module, x_bnc: torch.Tensor, position_ids_bn: torch.Tensor):
        """(q, k, v) [b, h, n, d] of one fused projection, q and k rotated (with RoPE)."""
        qkv = linear(x_bnc)
        # n from the projection: under Megatron's sequence parallelism x is this tensor-parallel
        # rank's 1/tp of the sequence and the column projection all-gathers it.
        b, n, _ = qkv.shape
        qkv = qkv.view(b, n, 3, self.local_heads, self.head_dim)
        q_bhnd, k_bhnd, v_bhnd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.rope_theta is not None:
            q_bhnd = apply_rope(q_bhnd, position_ids_bn, self.rope_theta)
            k_bhnd = apply_rope(k_bhnd, position_ids_bn, self.rope_theta)
        return (q_bhnd, k_bhnd, v_bhnd)

    def _attend(self, qkv, step, padding_mask_bn, global_mask_bn) -> torch.Tensor:
        """The attention of q, k, v (and, with global projections, of the global q, k, v)."""
        extra = {} if len(qkv) == 3 else {"global_qkv": tuple(qkv[3:])}
        return self.attention_fn(
            *qkv[:3],
            self.attn_cfg,
            layer=self.layer,
            step=step,
            padding_mask=padding_mask_bn,
            global_mask=global_mask_bn,
            **extra,
        )


class Block(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        attn_cfg: SparsityConfig,
        attention_fn: AttentionFn,
        layer: int,
        linears: Linears,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args, attn_cfg, attention_fn, layer, linears)
        self.mlp_norm = RMSNorm(args.d_model, args.norm_eps)
        self.mlp = MLP(args.d_model, args.hidden, args.mlp, linears)

    def forward(self, x, position_ids, step, padding_mask, global_mask=None):
        x = x + self.attn(self.attn_norm(x), position_ids, step, padding_mask, global_mask)
        return x + self.mlp(self.mlp_norm(x))


class ModelBase(nn.Module):
    """What every architecture (model.registry) shares and what parallel.parallelize reads of it:
    `args`, the blocks (`blocks`, each with an `attn` Attention), the modules of the first and
    the last pipeline stage, and an initialisation that is a pure function of (args, seed), one
    parameter at a time (`initial_values`), so that a model built on the meta device can be
    filled shard by shard."""

    args: ModelArgs
    attn_cfg: SparsityConfig
    embed: nn.Module | None
    lm_head: nn.Module | None
    blocks: nn.ModuleList | nn.ModuleDict
    split_sequence: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Under sequence parallelism, for a model that `sums_embeddings`: this tp rank's shard of
    the embeddings' sum (set by parallel.parallelize); None: the whole sequence stays."""
    first_stage: tuple[str, ...] = ()
    """Modules only the first pipeline stage keeps (None on the others: the input is then the
    previous stage's hidden states)."""
    last_stage: tuple[str, ...] = ()
    """Modules only the last pipeline stage keeps (None on the others, which return the hidden
    states); the forward returns the hidden states when `lm_head` is None."""
    whole_sequence: tuple[str, ...] = ()
    """Modules whose replicated parameters see the whole sequence under sequence parallelism
    (they run before the model enters the sequence-parallel region): their gradients are
    complete on every tp rank, unlike those of the norms that see one shard."""
    sums_embeddings = False
    """The first stage adds more than the word embedding (learned positions) before the
    sequence is split over tp ranks: under sequence parallelism the embedding then all-reduces
    and the model splits the sum with its `split_sequence` (Megatron's rule), instead of the
    embedding reduce-scattering its output."""

    def initial_values(self, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, initial value) of every parameter (parameter_shapes), one at a time, drawn
        on CPU from `seed` alone."""
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        if any(p.is_meta for p in self.parameters()):
            return  # built on the meta device: parallel.parallelize fills each rank's shard
        params = dict(self.named_parameters())
        for name, value in self.initial_values(seed):
            params[name].copy_(value)

    def parameter_shapes(self) -> list[tuple[str, torch.Size]]:
        """(name, shape) of every parameter, in order (a tied LM head is the embedding)."""
        return [(name, param.shape) for name, param in self.named_parameters()]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Transformer(ModelBase):
    """Token embedding, `n_layers` pre-norm blocks, final norm, LM head (optionally tied).

    `seed` makes the initialisation a pure function of (args, seed), independent of the global
    RNG and of what was constructed before.
    """

    # Projections that write into the residual stream get the depth-scaled init.
    _residual_outputs = ("attn.out.weight", "mlp.down.weight")
    first_stage = ("embed", "etc")
    last_stage = ("norm", "lm_head")

    def __init__(
        self,
        args: ModelArgs,
        attn_cfg: SparsityConfig,
        attention_fn: AttentionFn | None = None,
        linears: Linears | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if attention_fn is None:
            from model.sparse import sparse_attention

            attention_fn = sparse_attention
        linears = linears or LocalLinears()
        self.args = args
        self.attn_cfg = attn_cfg
        embed = linears.embedding(args.vocab_size, args.d_model)
        lm_head = linears.column(args.d_model, args.vocab_size)
        # Optional for a pipeline stage (parallel.parallelize): none of them on every stage.
        self.embed: nn.Module | None = embed
        # ETC (attention.etc_tokens): learned global tokens in the sequence's leading slots,
        # which the data pipeline marks with the ids -1 ... -n (data.packing.reserve_etc_slots).
        self.etc: nn.Parameter | None = None
        if attn_cfg.etc_tokens:
            self.etc = nn.Parameter(torch.empty(attn_cfg.etc_tokens, args.d_model))
        self.blocks = nn.ModuleList(
            Block(args, attn_cfg.for_layer(i, args.n_layers), attention_fn, i, linears)
            for i in range(args.n_layers)
        )
        self.norm: RMSNorm | None = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head: nn.Module | None = lm_head
        self.init_weights(seed)
        if args.tie_embeddings:
            lm_head.weight = embed.weight

    def initial_values(self, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        return initial_values(self.args, self.parameter_shapes(), seed)

    def forward(
        self,
        tokens_bn: torch.Tensor,
        position_ids_bn: torch.Tensor | None = None,
        step: int = 0,
        padding_mask_bn: torch.Tensor | None = None,
        global_mask_bn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [b, n, vocab] in float32. `step` seeds the random-block draw of this step;
        `padding_mask_bn` (True = padded key) keeps padded tokens out of every attention;
        `global_mask_bn` (True = global token) adds the sample's own global tokens (CLS,
        question or document-start marks) to the pattern's. Under context parallelism both
        masks are the whole sequence's [b, N], on the host."""
        if position_ids_bn is None:
            position_ids_bn = torch.arange(tokens_bn.shape[1], device=tokens_bn.device)
            position_ids_bn = position_ids_bn.expand_as(tokens_bn)
        # A later pipeline stage (parallel.parallelize) has no embedding: its input is the
        # previous stage's hidden states [b, n, c]; all but the last return theirs.
        x = tokens_bn if self.embed is None else token_embedding(self.embed, self.etc, tokens_bn)
        x = run_blocks(
            self.blocks, x, position_ids_bn, step, padding_mask_bn, self.args.recompute,
            global_mask_bn,
        )  # fmt: skip
        if self.lm_head is None or self.norm is None:
            return x
        return self.lm_head(self.norm(x)).float()


def token_embedding(
    embed: nn.Module, etc: nn.Parameter | None, tokens_bn: torch.Tensor
) -> torch.Tensor:
    """The word embedding of `tokens_bn` [b, n, c], with the learned ETC vectors `etc` [e, c]
    (attention.etc_tokens) in the slots the data pipeline marked with the ids -1 ... -e."""
    if etc is None:
        return embed(tokens_bn)
    slot = tokens_bn < 0  # ETC slot e holds the id -1 - e
    x = embed(tokens_bn.clamp(min=0))
    # A one-hot product, not an index: its backward is a matmul, the same sum in every run
    # (an index's accumulating scatter of the many zero gradients is not).
    one_hot = F.one_hot((-1 - tokens_bn).clamp(min=0), etc.shape[0]) * slot[..., None]
    vectors = one_hot.to(etc.dtype) @ etc
    return torch.where(slot.unsqueeze(-1), vectors.to(x.dtype), x)


def initial_values(
    args: ModelArgs, shapes: list[tuple[str, torch.Size]], seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, initial value) of the parameters `shapes` names (Transformer.parameter_shapes),
    one at a time and in order, drawn on CPU from `seed` alone: the values do not depend on
    the device, and a rank that builds the model on the meta device keeps only its shard of
    each (parallel.parallelize)."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = args.init_std / (2 * args.n_layers) ** 0.5
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
            continue
        std = residual_std if name.endswith(Transformer._residual_outputs) else args.init_std
        yield name, torch.randn(shape, generator=gen, device="cpu") * std


def run_blocks(
    blocks: nn.ModuleList | nn.ModuleDict,
    x: torch.Tensor,
    position_ids: torch.Tensor | None,
    step: int,
    padding_mask: torch.Tensor | None,
    recompute: bool,
    global_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` through `blocks` in order; with `recompute` (and gradients on) each block is an
    activation checkpoint: only its input is kept, its activations are recomputed in the
    backward. Non-reentrant checkpointing, so the gradients still reach the parameters through
    the original graph (what Megatron's DDP hooks watch) and communication inside a block (tp
    all-reduce, cp exchanges) simply runs again, in the same order on every rank."""
    # A pipeline stage keeps its blocks in a ModuleDict keyed by their global index.
    for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
        if recompute and torch.is_grad_enabled():
            x = checkpoint(
                block, x, position_ids, step, padding_mask, global_mask, use_reentrant=False
            )
        else:
            x = block(x, position_ids, step, padding_mask, global_mask)
    return x


def lm_loss(
    logits_bnv: torch.Tensor, labels_bn: torch.Tensor, loss_mask_bn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy over unmasked tokens, and their count.

    Returned as a (sum, count) pair rather than a mean so that micro-batches, data-parallel and
    context-parallel ranks can add both and divide once: a token-weighted mean.
    """
    mask = loss_mask_bn.flatten().float()
    # Masked labels may hold anything (e.g. -1); give them a valid class so CE does not fail.
    labels = labels_bn.flatten().masked_fill(mask == 0, 0)
    losses = F.cross_entropy(logits_bnv.float().flatten(0, 1), labels, reduction="none")
    return (losses * mask).sum(), mask.sum()
