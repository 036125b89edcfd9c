"""The transformer LM: shapes, causality, deterministic init, the attention seam, the loss.

python -m pytest -q tests/unit/test_model.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.rope import apply_rope
from model.sparse import SparsityConfig, reference_attention, sparse_attention
from model.transformer import ModelArgs, Transformer, lm_loss

ARGS = ModelArgs(vocab_size=300, d_model=64, n_layers=2, n_heads=4)
ATTN = SparsityConfig(block_size=32, window_blocks=2, global_blocks=1, random_blocks=1, causal=True)
SEQ = 256


def _tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, ARGS.vocab_size, (batch, SEQ), generator=torch.Generator().manual_seed(seed)
    )


def test_output_shape_and_dtype():
    model = Transformer(ARGS, ATTN, seed=0)
    logits = model(_tokens(), torch.arange(SEQ).expand(2, -1))
    assert logits.shape == (2, SEQ, ARGS.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("position", [5, 100, 200])
def test_causal_future_token_does_not_change_earlier_logits(position):
    model = Transformer(ARGS, ATTN, seed=0).eval()
    tokens = _tokens(batch=1)
    changed = tokens.clone()
    changed[0, position] = (tokens[0, position] + 1) % ARGS.vocab_size
    with torch.no_grad():
        a, b = model(tokens, step=3), model(changed, step=3)
    torch.testing.assert_close(a[:, :position], b[:, :position], rtol=0, atol=0)
    assert not torch.allclose(a[:, position:], b[:, position:])


def test_init_is_a_function_of_the_seed_only():
    torch.manual_seed(123)
    first = Transformer(ARGS, ATTN, seed=7).state_dict()
    torch.manual_seed(456)
    torch.randn(1000)  # disturb the global RNG: init must not depend on it
    second = Transformer(ARGS, ATTN, seed=7).state_dict()
    other = Transformer(ARGS, ATTN, seed=8).state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


def test_init_scales_and_tying():
    model = Transformer(ARGS, ATTN, seed=0)
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(ARGS.d_model))
    std_in = model.blocks[0].attn.qkv.weight.std().item()
    std_out = model.blocks[0].attn.out.weight.std().item()
    assert std_in == pytest.approx(0.02, rel=0.05)
    assert std_out == pytest.approx(0.02 / (2 * ARGS.n_layers) ** 0.5, rel=0.1)
    untied = Transformer(ModelArgs(**{**vars(ARGS), "tie_embeddings": False}), ATTN, seed=0)
    assert untied.lm_head.weight is not untied.embed.weight


def test_attention_fn_is_injected_with_layer_step_and_masks():
    calls = []

    def recording(q, k, v, cfg, layer, step, padding_mask=None, global_mask=None):
        calls.append((tuple(q.shape), cfg, layer, step, padding_mask, global_mask))
        return sparse_attention(q, k, v, cfg, layer, step, padding_mask, global_mask)

    model = Transformer(ARGS, ATTN, attention_fn=recording, seed=0)
    pad = torch.zeros(2, SEQ, dtype=torch.bool)
    marks = torch.zeros(2, SEQ, dtype=torch.bool)
    model(_tokens(), step=5, padding_mask_bn=pad, global_mask_bn=marks)
    assert [c[2] for c in calls] == [0, 1]
    assert all(c[0] == (2, 4, SEQ, 16) and c[1] is ATTN and c[3] == 5 for c in calls)
    assert all(c[4] is pad and c[5] is marks for c in calls)


def test_sparse_model_matches_dense_oracle_model():
    sparse = Transformer(ARGS, ATTN, attention_fn=sparse_attention, seed=0)
    dense = Transformer(ARGS, ATTN, attention_fn=reference_attention, seed=0)
    tokens = _tokens()
    torch.testing.assert_close(sparse(tokens, step=2), dense(tokens, step=2), rtol=1e-4, atol=1e-4)


def test_rope_uses_given_positions():
    # A shift of every position leaves q.k unchanged (relative encoding) but changes q itself.
    q, k = torch.randn(2, 1, 2, 3, 16).unbind(0)
    pos = torch.arange(3).expand(1, -1)
    dots = (apply_rope(q, pos, 1e4) * apply_rope(k, pos, 1e4)).sum(-1)
    shifted = (apply_rope(q, pos + 1000, 1e4) * apply_rope(k, pos + 1000, 1e4)).sum(-1)
    torch.testing.assert_close(dots, shifted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(apply_rope(q, pos, 1e4), apply_rope(q, pos + 1000, 1e4))
    model = Transformer(ARGS, ATTN, seed=0)
    tokens = _tokens(batch=1)
    base = model(tokens, torch.arange(SEQ)[None])
    assert not torch.allclose(base, model(tokens, torch.arange(SEQ)[None] * 2))


def test_lm_loss_is_token_weighted_sum():
    logits = torch.randn(2, 8, 11)
    labels = torch.randint(0, 11, (2, 8))
    mask = torch.ones(2, 8)
    total, n = lm_loss(logits, labels, mask)
    assert n.item() == 16
    torch.testing.assert_close(total / n, F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    mask[1, 4:] = 0
    labels[1, 4:] = -1  # masked labels may be invalid ids
    total, n = lm_loss(logits, labels, mask)
    keep = mask.flatten().bool()
    expected = F.cross_entropy(logits.flatten(0, 1)[keep], labels.flatten()[keep], reduction="sum")
    assert n.item() == 12
    torch.testing.assert_close(total, expected)


def test_loss_backward_reaches_every_parameter():
    model = Transformer(ARGS, ATTN, seed=0)
    tokens = _tokens()
    total, n = lm_loss(model(tokens), tokens.roll(-1, 1), torch.ones(2, SEQ))
    (total / n).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "override, key",
    [
        ({"n_heads": 3}, "model.n_heads"),
        ({"d_model": 36, "n_heads": 12}, "model.d_model"),
        ({"mlp": "relu"}, "model.mlp"),
        ({"vocab_size": 0}, "model.vocab_size"),
        ({"init_std": 0.0}, "model.init_std"),
    ],
)
def test_model_args_errors_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelArgs(**override)
