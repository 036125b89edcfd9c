"""Bidirectional encoder with an MLM head, shaped like HF RoBERTa / Longformer / BigBird, whose
attention is the injected (block-sparse) function.

    from model.encoder import Encoder
    from model.sparse import SparsityConfig
    args = ModelArgs(arch="encoder", mlp="gelu", max_positions=514, position_offset=2,
                     type_vocab_size=1, norm_eps=1e-5)
    model = Encoder(args, SparsityConfig(causal=False, window_tokens=512, global_blocks=0,
                                         random_blocks=0))
    logits = model(tokens_bn, position_ids_bn, step=0)          # [b, n, vocab] float32

Embeddings: word + token type (row 0, when type_vocab_size > 0) + learned absolute position
(row position_id + position_offset), then LayerNorm. Each block is post-LN, as BERT's:
x = norm(x + out(attn(x))), then x = norm(x + down(gelu(up(x)))), every projection with a bias.
The attention computes q, k, v [b, h, n, d] from one fused projection (rows [q | k | v]) and,
with attention.global_projections, the global q, k, v from a second one (Longformer's
query_global / key_global / value_global), and calls
`attention_fn(q, k, v, attn_cfg, layer=i, step=step, padding_mask=..., global_mask=...,
global_qkv=...)`. MLM head: dense, GELU, LayerNorm, decoder tied to the word embedding (or
not, model.tie_embeddings) with a bias. The GELU is model.mlp's ("gelu": erf, "gelu_tanh":
HF's "gelu_new"). One process: no tensor / pipeline parallel step exists for it yet.
train/hf_encoder.py converts HF checkpoints to it and back.
Legend: b batch, n tokens, h heads, d head dim, c d_model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.sparse import SparsityConfig
from model.transformer import AttentionFn, ModelArgs, run_blocks

__all__ = ["Encoder", "encoder_initial_values"]


def _gelu(kind: str):
    approximate = "tanh" if kind == "gelu_tanh" else "none"
    return lambda x: F.gelu(x, approximate=approximate)


class EncoderAttention(nn.Module):
    def __init__(
        self, args: ModelArgs, attn_cfg: SparsityConfig, attention_fn: AttentionFn, layer: int
    ) -> None:
        super().__init__()
        c = args.d_model
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.attn_cfg, self.attention_fn, self.layer = attn_cfg, attention_fn, layer
        self.qkv = nn.Linear(c, 3 * c)
        self.qkv_global = nn.Linear(c, 3 * c) if attn_cfg.global_projections else None
        self.out = nn.Linear(c, c)

    def _heads(self, linear: nn.Module, x_bnc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = x_bnc.shape
        qkv = linear(x_bnc).view(b, n, 3, self.n_heads, self.head_dim)
        # The attention math in fp32 (as the decoder's blocked CPU path): exact softmax and
        # log-sum-exp under bf16 autocast too.
        return tuple(t.float() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x_bnc, step, padding_mask_bn, global_mask_bn) -> torch.Tensor:
        b, n, _ = x_bnc.shape
        qkv = self._heads(self.qkv, x_bnc)
        extra = {}
        if self.qkv_global is not None:
            extra["global_qkv"] = self._heads(self.qkv_global, x_bnc)
        with torch.autocast(x_bnc.device.type, enabled=False):
            o_bhnd = self.attention_fn(
                *qkv,
                self.attn_cfg,
                layer=self.layer,
                step=step,
                padding_mask=padding_mask_bn,
                global_mask=global_mask_bn,
                **extra,
            )
        o_bnc = o_bhnd.transpose(1, 2).reshape(b, n, -1).to(x_bnc.dtype)
        return self.out(o_bnc)


class EncoderBlock(nn.Module):
    """Post-LN: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(
        self, args: ModelArgs, attn_cfg: SparsityConfig, attention_fn: AttentionFn, layer: int
    ) -> None:
        super().__init__()
        self.attn = EncoderAttention(args, attn_cfg, attention_fn, layer)
        self.attn_norm = nn.LayerNorm(args.d_model, eps=args.norm_eps)
        up, down = nn.Linear(args.d_model, args.hidden), nn.Linear(args.hidden, args.d_model)
        self.mlp = nn.ModuleDict({"up": up, "down": down})
        self.mlp_norm = nn.LayerNorm(args.d_model, eps=args.norm_eps)
        self.act = _gelu(args.mlp)

    def forward(self, x, position_ids, step, padding_mask, global_mask=None):
        # position_ids: the embedding used them already (run_blocks passes them to every block)
        x = self.attn_norm(x + self.attn(x, step, padding_mask, global_mask))
        return self.mlp_norm(x + self.mlp["down"](self.act(self.mlp["up"](x))))


class Encoder(nn.Module):
    """Embeddings, `n_layers` post-LN blocks, MLM head (module docstring).

    `seed` makes the initialisation a pure function of (args, seed): every parameter's value
    depends only on (seed, its name), independent of the global RNG."""

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
        if attn_cfg.etc_tokens:
            raise ValueError("attention.etc_tokens is not supported by model.arch=encoder yet")
        if attention_fn is None:
            from model.sparse import sparse_attention

            attention_fn = sparse_attention
        self.args, self.attn_cfg = args, attn_cfg
        c = args.d_model
        self.embed = nn.Embedding(args.vocab_size, c)
        self.pos_embed = nn.Embedding(args.max_positions, c)
        self.type_embed = nn.Embedding(args.type_vocab_size, c) if args.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(c, eps=args.norm_eps)
        self.blocks = nn.ModuleList(
            EncoderBlock(args, attn_cfg.for_layer(i, args.n_layers), attention_fn, i)
            for i in range(args.n_layers)
        )
        norm = nn.LayerNorm(c, eps=args.norm_eps)
        self.head = nn.ModuleDict({"dense": nn.Linear(c, c), "norm": norm})
        self.lm_head = nn.Linear(c, args.vocab_size)
        self.pooler = nn.Linear(c, c) if args.pooler else None
        self.act = _gelu(args.mlp)
        self.init_weights(seed)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        if any(p.is_meta for p in self.parameters()):
            return
        params = dict(self.named_parameters())
        for name, value in encoder_initial_values(self.args, self.parameter_shapes(), seed):
            params[name].copy_(value)

    def parameter_shapes(self) -> list[tuple[str, torch.Size]]:
        """(name, shape) of every parameter, in order (a tied LM head is the embedding)."""
        return [(name, param.shape) for name, param in self.named_parameters()]

    def forward(
        self,
        tokens_bn: torch.Tensor,
        position_ids_bn: torch.Tensor | None = None,
        step: int = 0,
        padding_mask_bn: torch.Tensor | None = None,
        global_mask_bn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits [b, n, vocab] in float32. `position_ids_bn` (default 0, 1, ... over the
        unpadded tokens) index the position embedding from its row position_offset, and with a
        position_offset a padded token reads row position_offset - 1 (HF's padding_idx);
        `padding_mask_bn` (True = padded key) and `global_mask_bn` (True = global token, HF
        Longformer's global_attention_mask) go to the attention; `step` seeds its random-block
        draw."""
        offset = self.args.position_offset
        pad_bn = None if padding_mask_bn is None or not offset else padding_mask_bn.bool()
        if position_ids_bn is None and pad_bn is not None:
            # HF's create_position_ids_from_input_ids: the real tokens count 0, 1, ...
            position_ids_bn = (~pad_bn).long().cumsum(1) - 1
        elif position_ids_bn is None:
            position_ids_bn = torch.arange(tokens_bn.shape[1], device=tokens_bn.device)
            position_ids_bn = position_ids_bn.expand_as(tokens_bn)
        rows_bn = position_ids_bn + offset
        if pad_bn is not None:  # HF (RoBERTa, Longformer): a padded token reads padding_idx
            rows_bn = rows_bn.masked_fill(pad_bn, offset - 1)
        x = self.embed(tokens_bn)
        if self.type_embed is not None:
            x = x + self.type_embed.weight[0]
        x = x + self.pos_embed(rows_bn)
        x = self.embed_norm(x)
        x = run_blocks(
            self.blocks, x, position_ids_bn, step, padding_mask_bn, self.args.recompute,
            global_mask_bn,
        )  # fmt: skip
        h = self.head["norm"](self.act(self.head["dense"](x)))
        return self.lm_head(h).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


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
