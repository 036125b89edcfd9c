"""parallel.sequence_parallel: refused without tensor parallelism, and only where the sequence
splits evenly over tp, before any process group exists.

pytest tests/unit/test_sequence_parallel_config.py     (a second; no processes are started)
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from parallel.layout import Layout
from train.config import ParallelArgs, load_config

MODEL = ModelArgs(vocab_size=250, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64)
ATTN = SparsityConfig(block_size=8, window_blocks=3, global_blocks=1, random_blocks=1, causal=True)


def test_sequence_parallel_is_carried_into_the_layout():
    layout = Layout.create(ParallelArgs(tp=2, sequence_parallel=True), 4, MODEL, ATTN, 64)
    assert layout.sequence_parallel and (layout.tp, layout.dp) == (2, 2)
    assert not Layout.create(ParallelArgs(tp=2), 2, MODEL, ATTN, 64).sequence_parallel


def test_sequence_parallel_without_tp_is_refused_naming_the_keys():
    message = r"parallel.sequence_parallel=true .* needs parallel.tp > 1, but parallel.tp=1"
    with pytest.raises(ValueError, match=message):
        ParallelArgs(sequence_parallel=True)
    with pytest.raises(ValueError, match=message):
        Layout(tp=1, dp=2, sequence_parallel=True)
    assert not dist.is_initialized()


def test_sequence_parallel_is_refused_when_the_config_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  sequence_parallel: true\n")
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel=true"):
        load_config(str(path))
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel='yes'"):
        Layout(tp=2, sequence_parallel="yes")  # type: ignore[arg-type]
    cfg = load_config(str(path), ["parallel.tp=2"])
    assert cfg.parallel.sequence_parallel is True


def test_each_cp_rank_tokens_must_split_over_tp():
    # seq_len 48 over cp=2: 24 tokens per cp rank (three blocks of 8), not divisible by tp=16.
    model = ModelArgs(vocab_size=250, d_model=64, n_layers=2, n_heads=16, ffn_hidden=64)
    message = (
        r"train.seq_len / parallel.cp = 24 tokens over parallel.tp=16 ranks, which must divide"
    )
    with pytest.raises(ValueError, match=message):
        Layout.create(ParallelArgs(tp=16, cp=2, sequence_parallel=True), 32, model, ATTN, 48)
    Layout.create(ParallelArgs(tp=16, cp=2), 32, model, ATTN, 48)  # fine without it
    Layout.create(ParallelArgs(tp=8, cp=2, sequence_parallel=True), 16, model, ATTN, 48)
    assert not dist.is_initialized()
