"""Cross entropy over vocabulary-sharded logits, on the tensor-parallel group it is handed.

    losses_bn = vocab_parallel_cross_entropy(logits_bnv, labels_bn, group=groups.tp)

Each tp rank holds the logits of its vocab_per_rank = V / tp rows; the loss of a token needs
the softmax over all V. Three all-reduces over `group`: the max logit (for a stable exp), the
target's logit (held by one rank) and the sum of exps; backward is local (softmax minus the
one-hot of the target on the rank that holds it). The arithmetic is megatron-core's
(`VocabParallelCrossEntropy`'s helpers); megatron-core's own autograd Function reads the
tp group from its parallel_state globals, which this one does not.
Legend: b batch, n tokens, v this rank's vocabulary rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_bnv: torch.Tensor, target_bn: torch.Tensor, group: Any):  # type: ignore[override]
        logits_bnv, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits_bnv)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        per_rank = logits_bnv.shape[-1]
        start = dist.get_rank(group) * per_rank
        target_mask, masked_target, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits_bnv, target_bn, logits_max, start, start + per_rank
            )
        )
        dist.all_reduce(predicted, group=group)
        dist.all_reduce(sum_exp, group=group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted, sum_exp
        )
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_bn: torch.Tensor):  # type: ignore[override]
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        grad = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target, update, grad_input, grad_bn
        )
        return grad, None, None


def vocab_parallel_cross_entropy(
    logits_bnv: torch.Tensor, target_bn: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Per-token cross entropy [b, n] of logits split by vocabulary rows over `group` (rank r
    holds rows [r * v, (r + 1) * v)); `logits_bnv` is modified in place, as megatron's is."""
    return _VocabParallelCE.apply(logits_bnv, target_bn, group)
