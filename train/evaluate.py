"""Validation loss: the token-weighted mean next-token loss over fixed validation batches.

    val_batches = build_val_batches(data_args, seq_len, micro_batch_size, max_batches=4)
    val_loss = evaluate(engine, val_batches)

The batches come from the held-out split and are the same at every evaluation, and the engine
evaluates with a fixed random-block draw, so successive values are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from train.engine import Engine

__all__ = ["evaluate"]


def evaluate(engine: Engine, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Summed loss over summed tokens of all `batches`; nan when they hold no token."""
    total, n_tokens = 0.0, 0
    for batch in batches:
        loss_sum, n = engine.eval_step(batch)
        total += loss_sum
        n_tokens += n
    return total / n_tokens if n_tokens else math.nan
