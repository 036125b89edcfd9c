"""The parallel layout: validation before any process group, vocab padding, sequence sharding.

pytest tests/distributed/test_layout.py        (a second; no processes are started)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from parallel.layout import Layout, shard_sequence
from train.config import ParallelArgs, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL = ModelArgs(vocab_size=250, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64)
ATTN = SparsityConfig(block_size=16, window_blocks=3, global_blocks=1, random_blocks=1, causal=True)


def _create(world: int, seq_len: int = 256, model: ModelArgs = MODEL, **degrees) -> Layout:
    return Layout.create(ParallelArgs(**degrees), world, model, ATTN, seq_len)


def test_dp_is_derived_from_the_world_size():
    layout = _create(16, tp=2, pp=2, cp=2)
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.world_size) == (2, 2, 2, 2, 16)


@pytest.mark.parametrize(
    ("world", "degrees", "message"),
    [
        (4, dict(tp=2, dp=1), "= 2 must equal the world size 4"),
        (6, dict(tp=4), "parallel.tp=4 * parallel.pp=1 * parallel.cp=1 = 4 must divide the world"),
        (3, dict(tp=3), "parallel.tp=3 must divide model.n_heads=4"),
        (3, dict(pp=3), "parallel.pp=3 must divide model.n_layers=4"),
        (3, dict(cp=3), "parallel.cp=3 * attention.block_size=16 = 48 must divide train.seq_len"),
    ],
)
def test_impossible_layouts_fail_naming_the_key(world, degrees, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        _create(world, **degrees)
    assert not dist.is_initialized()  # refused before any process group exists


def test_the_mlp_width_must_split_over_tp():
    model = ModelArgs(vocab_size=250, d_model=32, n_layers=4, n_heads=4, ffn_hidden=66)
    with pytest.raises(ValueError, match=r"parallel.tp=4 must divide the MLP width 66"):
        _create(4, model=model, tp=4)


def test_the_sequence_must_split_into_whole_blocks_per_cp_rank():
    with pytest.raises(ValueError, match="parallel.cp=2"):
        _create(2, seq_len=272, cp=2)  # 17 blocks
    assert _create(2, seq_len=288, cp=2).cp == 2  # 18 blocks, 9 per rank


@pytest.mark.parametrize("name", ["tp", "pp", "cp", "dp"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_degrees_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=f"parallel.{name}="):
        Layout(**{name: value})


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"), [(250, 1, 256), (250, 2, 256), (4096, 2, 4096), (4097, 2, 4352)]
)
def test_vocab_is_padded_to_a_multiple_of_tp_times_128(vocab, tp, padded):
    assert Layout(tp=tp).padded_vocab(vocab) == padded
    assert Layout(tp=4).padded_vocab(vocab) % 512 == 0


def test_layers_of_each_stage_are_contiguous():
    layout = Layout(pp=2)
    assert [list(layout.layers_of_stage(4, r)) for r in range(2)] == [[0, 1], [2, 3]]


def test_initialize_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        Layout().initialize()


def test_each_cp_rank_keeps_its_contiguous_slice_of_the_sequence_keys():
    n = 64
    batch = {
        "tokens": torch.arange(2 * n).view(2, n),
        "labels": torch.arange(2 * n).view(2, n) + 1,
        "loss_mask": torch.ones(2, n),
        "position_ids": torch.arange(n).expand(2, n),
        "padding_mask": torch.zeros(2, n, dtype=torch.bool),
    }
    slices = [shard_sequence(batch, r, 4) for r in range(4)]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(torch.cat([s[key] for s in slices], dim=1), batch[key])
    assert torch.equal(slices[2]["position_ids"][0], torch.arange(32, 48))
    assert all(s["padding_mask"] is batch["padding_mask"] for s in slices)  # kept whole


@pytest.mark.parametrize(("name", "world"), [("demo_tp2_cp2.yaml", 4), ("demo_pp2.yaml", 2)])
def test_parallel_demo_configs_load_and_fit_their_layout(name, world):
    cfg = load_config(CONFIGS / name)
    layout = Layout.create(cfg.parallel, world, cfg.model, cfg.attention, cfg.train.seq_len)
    assert layout.world_size == world
