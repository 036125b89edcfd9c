"""Which parameters tensor parallelism splits, and how: the one rule that parallelize (which
layer replaces which module), tensor_parallel (slicing weights) and plan (memory) read.

    from parallel.tp_plan import tp_kind, split_view
    tp_kind("blocks.0.attn.qkv")                 # "column"
    split_view("blocks.0.attn.qkv.bias", shape, args)   # ((3, heads, head_dim), 1)

A module is matched by its trailing path components, never by a bare suffix of its name:
"embed" is the word embedding, "pos_embed" (the encoder's learned positions) is not. Both
architectures (model/transformer.py, model/encoder.py) name their projections alike, so one
plan serves both. Megatron-free: the planner imports it without megatron-core.
"""

from __future__ import annotations

import torch

from model.transformer import ModelArgs

__all__ = ["TP_PLAN", "tp_kind", "split_view", "is_vocab"]

TP_PLAN = {
    "attn.qkv": "column",
    "attn.qkv_global": "column",
    "attn.out": "row",
    "mlp.up": "column",
    "mlp.down": "row",
    "embed": "embedding",
    "lm_head": "column",
}
"""How each projection of the model is split over tp (by its module path's trailing
components): a column layer splits its output features (and its bias), a row layer its input
features (its bias, added after the reduction, stays whole), the embedding its (padded)
vocabulary rows. Every other parameter (norms, learned positions, the encoder's MLM-head
dense, ETC vectors) is replicated."""


def tp_kind(module: str) -> str | None:
    """The TP_PLAN kind of the module at path `module`, or None (replicated)."""
    return next(
        (kind for key, kind in TP_PLAN.items() if module == key or module.endswith("." + key)),
        None,
    )


def is_vocab(name: str) -> bool:
    """Whether parameter `name` has a row per vocabulary entry (padded under tp)."""
    return name in ("embed.weight", "lm_head.weight", "lm_head.bias")


def split_view(name: str, shape: torch.Size, args: ModelArgs) -> tuple[tuple[int, ...], int]:
    """How parameter `name` of the single-process model (its full `shape`) is split over tp:
    (a view of the full tensor, the dimension of that view to chunk); dimension -1: replicated.
    QKV is viewed as [3, heads, head_dim, ...] (each rank keeps [q | k | v] of its heads),
    SwiGLU's up as [2, hidden, ...] ([gate | up] of its hidden units)."""
    module, _, kind_of_param = name.rpartition(".")
    kind = tp_kind(module)
    if kind is None:
        return tuple(shape), -1
    if kind == "row":
        return tuple(shape), 1 if kind_of_param == "weight" else -1
    rest = tuple(shape[1:])
    if module.endswith(("attn.qkv", "attn.qkv_global")):
        return (3, args.n_heads, args.head_dim, *rest), 1
    if module.endswith("mlp.up") and args.mlp == "swiglu":
        return (2, args.hidden, *rest), 1
    return tuple(shape), 0
