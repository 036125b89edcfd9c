"""The model architectures a recipe can name, and building one.

    from model.registry import build_model
    model = build_model(cfg.model, cfg.attention, seed=0)       # cfg.model.arch picks the class

An architecture is a single-device nn.Module class constructed as
`cls(args, attn_cfg, attention_fn=None, seed=0)` whose parameters are named as the model space
of checkpoints expects (train.model_space), plus, to run under tp / pp, the parallelize step
that parallel.parallelize applies to it. Today: the decoder-only "transformer"
(RoPE, RMSNorm, SwiGLU or GELU; model/transformer.py), and the HF RoBERTa / Longformer /
BigBird-shaped "encoder" with an MLM head (model/encoder.py). Both are
model.transformer.ModelBase, which is what parallel.parallelize splits.
`model.arch` in a recipe chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from model.encoder import Encoder
from model.sparse_pattern import SparsityConfig
from model.transformer import ModelArgs, Transformer

__all__ = ["ARCHITECTURES", "build_model"]

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "transformer": Transformer,
    "encoder": Encoder,
}
"""model.arch values and their model classes."""


def build_model(
    args: ModelArgs, attn_cfg: SparsityConfig, attention_fn: Any = None, seed: int = 0
) -> nn.Module:
    """The single-device model `args.arch` names, initialised from `seed`."""
    if args.arch not in ARCHITECTURES:
        raise ValueError(
            f"model.arch={args.arch!r} is not one of {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[args.arch](args, attn_cfg, attention_fn=attention_fn, seed=seed)
