"""Bidirectional encoder with an MLM head, shaped like HF RoBERTa / Longformer / BigBird, whose
attention is the injected (block-sparse) function.

    from model.encoder import Encoder
    from model.sparse import SparsityConfig
    args = ModelArgs(arch="encoder", mlp="gelu", max_positions=514, position_offset=2,
                     type_vocab_size=1, norm_eps=1e-5)
    model = Encoder(args, SparsityConfig(causal=False, window_tokens=512, global_blocks=0,
                                         random_blocks=0))
    logits = model(tokens_bn, position_ids_bn, step=0)          # [b, n, vocab] float32

Embeddings: word (with attention.etc_tokens, the ETC vectors in the leading slots) + token
type (row 0, when type_vocab_size > 0) + learned absolute position (row position_id +
position_offset), then LayerNorm. Each block is post-LN, as BERT's: x = norm(x + attn(x)), then
x = norm(x + mlp(x)), every projection with a bias; the attention is the decoder's
(model.transformer.Attention, without RoPE): one fused projection (rows [q | k | v]) and, with
attention.global_projections, a second one for the global q, k, v (Longformer's query_global /
key_global / value_global), its precision handling (bf16 into the fused kernel on CUDA, fp32
into the blocked CPU kernel) included. MLM head: dense, GELU, LayerNorm, decoder tied to the word
embedding (or not, model.tie_embeddings) with a bias. The GELU is model.mlp's ("gelu": erf,
"gelu_tanh": HF's "gelu_new"). The parameter names are the decoder's where the module is the
same (embed, blocks.i.attn.qkv / qkv_global / out, mlp.up / down, lm_head), so
parallel.parallelize splits both alike: tensor, pipeline (embeddings first, head last),
sequence (the embeddings' sum is split after the positions are added: `split_sequence`) and
context parallelism. HF's pooler (model.pooler) is frozen: the MLM loss does not use it, it
travels to export unchanged. train/hf_encoder.py converts HF checkpoints to it and back.
Legend: b batch, n tokens, h heads, d head dim, c d_model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from model.layers import MLP, LocalLinears, gelu
from model.sparse import SparsityConfig
from model.transformer import (
    Attention,
    AttentionFn,
    ModelArgs,
    ModelBase,
    run_blocks,
    token_embedding,
)

__all__ = ["Encoder", "encoder_initial_values"]


class EncoderBlock(nn.Module):
    """Post-LN: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(
        self, args: ModelArgs, attn_cfg: SparsityConfig, attention_fn: AttentionFn, layer: int
    ) -> None:
        super().__init__()
        linears = LocalLinears()
        self.attn = Attention(args, attn_cfg, attention_fn, layer, linears, rope=False, bias=True)
        self.attn_norm = nn.LayerNorm(args.d_model, eps=args.norm_eps)
        self.mlp = MLP(args.d_model, args.hidden, args.mlp, linears, bias=True)
        self.mlp_norm = nn.LayerNorm(args.d_model, eps=args.norm_eps)

    def forward(self, x, position_ids, step, padding_mask, global_mask=None):
        # position_ids: the embedding used them already (run_blocks passes them to every block)
        x = self.attn_norm(x + self.attn(x, position_ids, step, padding_mask, global_mask))
        return self.mlp_norm(x + self.mlp(x))


class Encoder(ModelBase):
    """Embeddings, `n_layers` post-LN blocks, MLM head (module docstring).

    `seed` makes the initialisation a pure function of (args, seed): every parameter's value
    depends only on (seed, its name), independent of the global RNG."""

    first_stage = ("embed", "etc", "pos_embed", "type_embed", "embed_norm")
    last_stage = ("head", "lm_head", "pooler")
    whole_sequence = ("etc", "pos_embed", "type_embed")
    sums_embeddings = True

    def __init__(
        self,
        args: ModelArgs,
        attn_cfg: SparsityConfig,
        attention_fn: AttentionFn | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if args.mlp not in ("gelu", "gelu_tanh"):
            raise ValueError(
                f"model.mlp={args.mlp!r}: the encoder's feed-forward is 'gelu' or 'gelu_tanh'"
            )
        if args.max_positions < 1:
            raise ValueError("model.max_positions must be positive for model.arch=encoder")
        if attn_cfg.causal:
            raise ValueError("model.arch=encoder is bidirectional: set attention.causal=false")
        if attention_fn is None:
            from model.sparse import sparse_attention

            attention_fn = sparse_attention
        self.args, self.attn_cfg = args, attn_cfg
        c = args.d_model
        # Every module is optional for a pipeline stage (parallel.parallelize): first_stage,
        # last_stage.
        self.embed: nn.Module | None = nn.Embedding(args.vocab_size, c)
        self.etc: nn.Parameter | None = None
        if attn_cfg.etc_tokens:  # ETC vectors (attention.etc_tokens), as the decoder's
            self.etc = nn.Parameter(torch.empty(attn_cfg.etc_tokens, c))
        self.pos_embed: nn.Module | None = nn.Embedding(args.max_positions, c)
        self.type_embed: nn.Embedding | None = None
        if args.type_vocab_size:
            self.type_embed = nn.Embedding(args.type_vocab_size, c)
        self.embed_norm: nn.Module | None = nn.LayerNorm(c, eps=args.norm_eps)
        self.blocks = nn.ModuleList(
            EncoderBlock(args, attn_cfg.for_layer(i, args.n_layers), attention_fn, i)
            for i in range(args.n_layers)
        )
        norm = nn.LayerNorm(c, eps=args.norm_eps)
        self.head: nn.ModuleDict | None = nn.ModuleDict({"dense": nn.Linear(c, c), "norm": norm})
        lm_head = nn.Linear(c, args.vocab_size)
        self.lm_head: nn.Module | None = lm_head
        self.pooler: nn.Module | None = nn.Linear(c, c) if args.pooler else None
        self.init_weights(seed)
        if self.pooler is not None:
            self.pooler.requires_grad_(False)
        if args.tie_embeddings:
            lm_head.weight = self.embed.weight  # type: ignore[union-attr]

    def initial_values(self, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        return encoder_initial_values(self.args, self.parameter_shapes(), seed)

    def forward(
        self,
        tokens_bn: torch.Tensor,
        position_ids_bn: torch.Tensor | None = None,
        step: int = 0,
        padding_mask_bn: torch.Tensor | None = None,
        global_mask_bn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits [b, n, vocab] in float32. `position_ids_bn` (positions from 0; under
        context parallelism this rank's slice of them) index the position embedding from its
        row position_offset; without them the positions are HF's (`_hf_position_rows`: with a
        position_offset the real tokens count from 0 and a padded token reads row
        position_offset - 1, HF's padding_idx). `padding_mask_bn` (True = padded key) and
        `global_mask_bn` (True = global token, HF Longformer's global_attention_mask) go to the
        attention; `step` seeds its random-block draw."""
        # A later pipeline stage (parallel.parallelize) has no embeddings: its input is the
        # previous stage's hidden states [b, n, c]; all but the last return theirs.
        if self.embed is None:
            x = tokens_bn
        else:
            x = self._embed(tokens_bn, position_ids_bn, padding_mask_bn)
        x = run_blocks(
            self.blocks, x, position_ids_bn, step, padding_mask_bn, self.args.recompute,
            global_mask_bn,
        )  # fmt: skip
        if self.lm_head is None or self.head is None:
            return x
        h = self.head["norm"](gelu(self.head["dense"](x), self.args.mlp))
        return self.lm_head(h).float()

    def _embed(self, tokens_bn, position_ids_bn, padding_mask_bn) -> torch.Tensor:
        """The embeddings' sum after their LayerNorm (module docstring): HF's positions when
        `position_ids_bn` is None (module docstring of forward), `position_ids_bn` + offset
        otherwise."""
        assert self.embed is not None and self.pos_embed is not None
        assert self.embed_norm is not None
        offset = self.args.position_offset
        if position_ids_bn is None:
            rows_bn = self._hf_position_rows(tokens_bn, padding_mask_bn)
        else:
            rows_bn = position_ids_bn + offset
        x = token_embedding(self.embed, self.etc, tokens_bn)
        if self.type_embed is not None:
            x = x + self.type_embed.weight[0]
        x = x + self.pos_embed(rows_bn)
        if self.split_sequence is not None:
            x = self.split_sequence(x)
        return self.embed_norm(x)

    def _hf_position_rows(
        self, tokens_bn: torch.Tensor, padding_mask_bn: torch.Tensor | None
    ) -> torch.Tensor:
        """HF's position rows (create_position_ids_from_input_ids): the real tokens count
        offset, offset + 1, ...; with an offset a padded token reads row offset - 1 (HF's
        padding_idx)."""
        offset = self.args.position_offset
        if padding_mask_bn is None or not offset:
            positions = torch.arange(tokens_bn.shape[1], device=tokens_bn.device)
            return positions.expand_as(tokens_bn) + offset
        pad_bn = padding_mask_bn.bool().to(tokens_bn.device)
        rows_bn = (~pad_bn).long().cumsum(1) - 1 + offset
        return rows_bn.masked_fill(pad_bn, offset - 1)


def encoder_initial_values(
    args: ModelArgs, shapes: list[tuple[str, torch.Size]], seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, initial value) of the parameters `shapes` names (Encoder.parameter_shapes), drawn
    on CPU: LayerNorm gains 1, biases 0, every other tensor normal(0, init_std) from a generator
    seeded by (seed, name), so a parameter's value does not depend on the others (BERT's init,
    as HF's _init_weights)."""
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape)
        else:
            key = hashlib.blake2b(f"halotron-init:{seed}:{name}".encode(), digest_size=8)
            gen = torch.Generator().manual_seed(int.from_bytes(key.digest(), "little") >> 1)
            yield name, torch.randn(shape, generator=gen) * args.init_std
