"""Activation recomputation (`model.recompute`): same gradients, fewer saved activations.

python -m pytest -q tests/unit/test_recompute.py

The distributed counterpart (a tp2 x cp2 MegatronEngine step with and without recompute) is in
tests/distributed/test_precision_recompute.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.sparse import SparsityConfig
from model.transformer import ModelArgs, Transformer, lm_loss

ARGS = ModelArgs(vocab_size=300, d_model=64, n_layers=4, n_heads=4)
ATTN = SparsityConfig(block_size=32, window_blocks=2, global_blocks=1, random_blocks=1, causal=True)
SEQ = 256


def _batch(batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ARGS.vocab_size, (batch, SEQ), generator=gen)
    labels = torch.randint(0, ARGS.vocab_size, (batch, SEQ), generator=gen)
    return dict(
        tokens=tokens,
        labels=labels,
        loss_mask=torch.ones(batch, SEQ),
        position_ids=torch.arange(SEQ).expand(batch, -1),
    )


def _grads(recompute: bool, step: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    model = Transformer(dataclasses.replace(ARGS, recompute=recompute), ATTN, seed=3)
    batch = _batch()
    logits = model(batch["tokens"], batch["position_ids"], step=step)
    loss_sum, count = lm_loss(logits, batch["labels"], batch["loss_mask"])
    (loss_sum / count).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss_sum / count), grads


def test_recompute_gives_the_same_loss_and_gradients():
    loss_plain, plain = _grads(recompute=False)
    loss_ckpt, ckpt = _grads(recompute=True)
    assert loss_plain == loss_ckpt
    assert set(plain) == set(ckpt)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=0, atol=1e-6, msg=name)


def _saved_bytes(recompute: bool) -> tuple[int, int]:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward, as seen
    outside the checkpoints, and the bytes of the block inputs a checkpoint keeps alive."""
    model = Transformer(dataclasses.replace(ARGS, recompute=recompute), ATTN, seed=3)
    batch = _batch()
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(batch["tokens"], batch["position_ids"], step=0)
    # Parameters are saved by reference, not as activations: leave them out of the count.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for (ptr, _), n in seen.items() if ptr not in params)
    del logits
    block_input = 2 * SEQ * ARGS.d_model * 4  # [b, n, c] fp32, one per checkpointed block
    return activations, (ARGS.n_layers * block_input if recompute else 0)


def test_recompute_keeps_clearly_fewer_activations():
    plain, _ = _saved_bytes(recompute=False)
    ckpt, held_inputs = _saved_bytes(recompute=True)
    # Even counting the block inputs the checkpoints hold, recompute keeps under a third.
    assert ckpt + held_inputs < plain / 3, (plain, ckpt, held_inputs)


def test_recompute_is_skipped_without_gradients():
    model = Transformer(dataclasses.replace(ARGS, recompute=True), ATTN, seed=3).eval()
    plain = Transformer(ARGS, ATTN, seed=3).eval()
    batch = _batch(batch=1)
    with torch.no_grad():
        a = model(batch["tokens"], batch["position_ids"], step=2)
        b = plain(batch["tokens"], batch["position_ids"], step=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recompute_must_be_a_bool():
    with pytest.raises(ValueError, match="model.recompute"):
        ModelArgs(recompute="yes")  # type: ignore[arg-type]
