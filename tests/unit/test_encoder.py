"""The encoder (model/encoder.py) alone: its sparse attention equals the dense oracle inside the
model, its initialisation is a pure function of (seed, parameter name), it refuses what it
cannot be, and the config refuses parallel layouts for it. HF parity: test_hf_encoder.py.

    python -m pytest -q tests/unit/test_encoder.py
"""

from __future__ import annotations

import pytest
import torch

from model.encoder import Encoder
from model.registry import build_model
from model.sparse import SparsityConfig, reference_attention
from model.transformer import ModelArgs
from train.config import load_config

ARGS = ModelArgs(
    arch="encoder", vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp="gelu",
    max_positions=66, position_offset=2, type_vocab_size=1, init_std=0.1,
)  # fmt: skip
PATTERN = SparsityConfig(
    block_size=8, window_tokens=8, global_blocks=0, random_blocks=0, global_projections=True
)


def test_sparse_attention_in_the_encoder_equals_the_dense_oracle():
    sparse = build_model(ARGS, PATTERN, seed=1)
    dense = Encoder(ARGS, PATTERN, attention_fn=reference_attention, seed=1)
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    glob = torch.zeros(2, 64, dtype=torch.bool)
    glob[0, [0, 33]] = True
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[1, 60:] = True
    got = sparse(tokens, None, 0, pad, glob)
    want = dense(tokens, None, 0, pad, glob)
    assert got.dtype == torch.float32 and got.shape == (2, 64, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for n, p in sparse.named_parameters() if "pooler" not in n)


def test_initialisation_is_a_function_of_seed_and_name():
    a, b = Encoder(ARGS, PATTERN, seed=3), Encoder(ARGS, PATTERN, seed=3)
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    # Another parameter set (no global projections, a pooler) leaves the shared ones unchanged.
    other = Encoder(ModelArgs(**{**vars(ARGS), "pooler": True}), SparsityConfig(), seed=3)
    shared = set(a.state_dict()) & set(other.state_dict())
    assert "blocks.1.mlp.up.weight" in shared and "pooler.weight" in other.state_dict()
    assert all(torch.equal(a.state_dict()[k], other.state_dict()[k]) for k in shared)
    assert not torch.equal(a.embed.weight, Encoder(ARGS, PATTERN, seed=4).embed.weight)
    assert a.lm_head.weight is a.embed.weight  # tied MLM decoder


def test_the_encoder_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="'gelu' or 'gelu_tanh'"):
        Encoder(ModelArgs(**{**vars(ARGS), "mlp": "swiglu"}), PATTERN)
    with pytest.raises(ValueError, match="attention.causal=false"):
        Encoder(ARGS, SparsityConfig(causal=True))
    with pytest.raises(ValueError, match="model.max_positions must be positive"):
        Encoder(ModelArgs(**{**vars(ARGS), "max_positions": 0}), PATTERN)


def test_the_config_takes_every_layout_and_refuses_too_few_positions():
    base = [
        "model.arch=encoder", "model.mlp=gelu", "model.max_positions=130",
        "model.position_offset=2", "train.seq_len=128", "attention.causal=false",
        "data.objective=mlm",
    ]  # fmt: skip
    assert load_config(None, base).model.arch == "encoder"
    layout = ["parallel.tp=2", "parallel.pp=2", "parallel.cp=2", "parallel.sequence_parallel=true"]
    assert load_config(None, [*base, *layout]).parallel.cp == 2
    with pytest.raises(ValueError, match="model.max_positions=130 is too few"):
        load_config(None, [*base, "train.seq_len=256"])
    from train.engine_choice import engine_kind

    assert engine_kind(load_config(None, base), world=1) == "local"
    assert engine_kind(load_config(None, base), world=2) == "megatron"  # data parallel
    assert engine_kind(load_config(None, [*base, "train.engine=deepspeed"]), world=2) == "deepspeed"


def test_recompute_gives_the_same_gradients_and_bf16_autocast_runs():
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    glob = torch.zeros(2, 64, dtype=torch.bool)
    glob[:, 0] = True
    plain = Encoder(ARGS, PATTERN, seed=1)
    recomputed = Encoder(ModelArgs(**{**vars(ARGS), "recompute": True}), PATTERN, seed=1)
    for model in (plain, recomputed):
        model(tokens, None, 0, None, glob).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = plain(tokens, None, 0, None, glob)
    assert low.dtype == torch.float32  # logits in fp32; the attention itself ran in fp32
    assert float((low - plain(tokens, None, 0, None, glob).detach()).abs().max()) < 0.1
