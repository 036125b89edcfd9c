"""train.flops: attention FLOPs count exactly the allowed pairs, matmul FLOPs the model's linear
weights, and the peak / MFU helpers.

    python -m pytest -q tests/unit/test_flops.py
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from model.sparse import SparsityConfig
from model.transformer import ModelArgs, Transformer
from tests.unit import test_train
from tests.unit.test_train import _cfg, _wandb_file
from tests.unit.wandb_history import wandb_history
from train import flops
from train.flops import (
    PEAK_FLOPS,
    MFUMeter,
    flops_per_token,
    linear_params,
    measure_matmul_flops,
    mfu,
    peak_flops,
    step_flops,
    working_matmuls,
)
from train.loop import train

ARGS = ModelArgs(vocab_size=100, d_model=32, n_layers=3, n_heads=4)
data_dir = test_train.data_dir  # the trainer tests' fixtures
wandb_env = test_train.wandb_env


def _brute_pairs(cfg: SparsityConfig, seq_len: int, n_heads: int, n_layers: int) -> int:
    total = 0
    for layer in range(n_layers):
        mask = cfg.dense_mask(seq_len, layer=layer, n_heads=n_heads)
        total += int(mask.sum()) * (n_heads // mask.shape[0])  # a shared mask serves every head
    return total


@pytest.mark.parametrize(
    "cfg",
    [
        SparsityConfig(8, 3, 1, 2, causal=True),
        SparsityConfig(8, 5, 2, 2, random_per_head=True),
        SparsityConfig(4, 3, 0, 1, dilation=(1, 2, 1, 3)),
    ],
)
def test_attention_flops_count_the_allowed_pairs(cfg):
    seq_len, head_dim = 128, ARGS.head_dim
    pairs = _brute_pairs(cfg, seq_len, ARGS.n_heads, ARGS.n_layers)
    per = flops_per_token(ARGS, cfg, seq_len)
    assert per.attention * seq_len == pytest.approx(4 * head_dim * pairs * 3, rel=1e-12)
    forward = flops_per_token(ARGS, cfg, seq_len, training=False)
    assert forward.attention * 3 == pytest.approx(per.attention)
    assert pairs < ARGS.n_layers * ARGS.n_heads * seq_len**2  # fewer than dense


def test_a_window_over_everything_counts_dense_attention():
    seq_len, nb = 128, 16
    causal = SparsityConfig(8, nb, 0, 0, causal=True)  # the window reaches the first block
    dense_causal = ARGS.n_layers * ARGS.n_heads * seq_len * (seq_len + 1) // 2
    got = flops_per_token(ARGS, causal, seq_len).attention * seq_len
    assert got == pytest.approx(12 * ARGS.head_dim * dense_causal)
    everything = SparsityConfig(8, 1, nb, 0)  # every block global: full bidirectional
    dense = ARGS.n_layers * ARGS.n_heads * seq_len**2
    got = flops_per_token(ARGS, everything, seq_len).attention * seq_len
    assert got == pytest.approx(12 * ARGS.head_dim * dense)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_matmul_flops_count_the_linear_weights(mlp):
    args = ModelArgs(vocab_size=100, d_model=32, n_layers=3, n_heads=4, mlp=mlp)
    model = Transformer(args, SparsityConfig(8, 3, 1, 0, causal=True))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert linear_params(args) == linear  # the tied LM head is still a matmul
    per = flops_per_token(args, SparsityConfig(8, 3, 1, 0, causal=True), 64)
    assert per.matmul == 6 * linear


def test_step_flops_and_mfu():
    cfg = SparsityConfig(8, 3, 1, 2, causal=True)
    per = flops_per_token(ARGS, cfg, 128)
    assert step_flops(ARGS, cfg, 128, batch_tokens=4 * 128) == pytest.approx(512 * per.total)
    assert mfu(0.5e12, 1e12) == 0.5
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)


def test_peak_flops(monkeypatch):
    assert peak_flops(configured=1.5e12) == 1.5e12
    with pytest.raises(ValueError, match="positive"):
        peak_flops(configured=-1.0)
    assert dict(PEAK_FLOPS)["H100"] == 989e12 and dict(PEAK_FLOPS)["A100"] == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H200")
    assert peak_flops(device="cuda") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H100 PCIe")
    assert peak_flops(device="cuda") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA A100-SXM4-80GB")
    assert peak_flops(device="cuda") == 312e12
    measured = measure_matmul_flops("cpu", (128, 64, 32), repeats=2)
    assert 1e6 < measured < 1e14
    assert peak_flops(device="cpu") > 1e6


def test_mfu_meter_metrics():
    cfg = SparsityConfig(8, 3, 1, 2, causal=True)
    meter = MFUMeter.create(ARGS, cfg, 128, configured_peak=1e9)
    assert meter.flops_per_token == flops_per_token(ARGS, cfg, 128).total
    got = meter.metrics(tokens=1000, seconds=2.0, n_devices=4)
    flops_per_s = meter.flops_per_token * 1000 / 2.0
    assert got["perf/tflops_per_s"] == pytest.approx(flops_per_s / 1e12)
    assert got["perf/mfu"] == pytest.approx(flops_per_s / 4 / 1e9)


def test_measured_peak_times_the_models_matmuls_and_a_square_one(monkeypatch):
    """Without a configured or known peak: the best of the model's working-size matmuls (the
    MLP's and the LM head's over a micro-batch) and a large square one."""
    timed = []

    def fake(device, shape, *args):
        timed.append(shape)
        return {(512, 32, 100): 3e9, (1024, 1024, 1024): 2e9}.get(shape, 1e9)

    monkeypatch.setattr(flops, "measure_matmul_flops", fake)
    meter = MFUMeter.create(ARGS, SparsityConfig(8, 3, 1, 2), 128, device="cpu", tokens=4 * 128)
    assert timed == [(512, 32, ARGS.hidden), (512, 32, 100), (1024, 1024, 1024)]
    assert meter.peak == 3e9
    big = ModelArgs(vocab_size=50_000, d_model=4096, n_layers=1, n_heads=32)
    assert working_matmuls(big, 65_536) == ((2048, 2048, 2048),)  # capped: no faster, longer


@pytest.mark.bench  # a timing assertion: make bench, on a quiet machine, not make test
@pytest.mark.skipif(
    os.getloadavg()[0] > (os.cpu_count() or 1),
    reason="the machine is oversubscribed: OpenMP threads wait for a core, timings say nothing",
)
def test_measured_peak_is_stable():
    """Best of timed runs after a warmup: three fresh measurements agree; each is a real rate."""
    shape = working_matmuls(ARGS, 512)[-1]
    peaks = []
    for _ in range(3):
        flops.measure_matmul_flops.cache_clear()
        peaks.append(measure_matmul_flops("cpu", shape))
    assert 1e8 < min(peaks) and max(peaks) < 2 * min(peaks), peaks


def test_mfu_of_a_tiny_run_without_a_peak_is_at_most_one(data_dir, tmp_path, wandb_env):
    flops.measure_matmul_flops.cache_clear()  # measured in this run
    run_dir = tmp_path / "run"
    train(_cfg(data_dir, run_dir, "train.steps=3", "logging.log_every=1"))
    rows = [r for r in wandb_history(_wandb_file(run_dir), last_step=3) if "perf/mfu" in r]
    assert len(rows) == 3
    for row in rows:
        assert 0 < row["perf/mfu"] <= 1, row
