"""Every GPU recipe in configs/ trains on CPU at toy size: a few steps, finite loss that falls.

    pytest tests/unit/test_recipes.py

The recipe's own pattern keys (causal or not, window, global and random blocks, the pool,
global projections, the objective and the global marks) are kept; the sizes, the layout (one
process), the precision and the device are overridden to fit this machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.transformer import Transformer
from train.config import load_config
from train.loop import train

CONFIGS = Path(__file__).parents[2] / "configs"
TOY = [
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.ffn_hidden=128",
    "model.recompute=false",
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.cp=1",
    "parallel.dp=1",
    "optim.precision=fp32",
    "optim.lr=1e-2",
    "schedule.warmup_steps=2",
    "schedule.min_lr=1e-3",
    "train.steps=8",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.seq_len=256",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.device=cpu",
    "checkpoint.every=100",
    "checkpoint.async_save=false",
    "logging.progress_bar=false",
    "logging.wandb_mode=disabled",
]
RECIPES = {
    "bigbird_base_mlm": ["attention.block_size=16"],
    "longformer_base_mlm": ["attention.block_size=16", "attention.window_tokens=48"],
    "causal_1b_128k": ["attention.block_size=16", "attention.window_tokens=64"],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_at_toy_size(name, tiny_mlm_data, tmp_path):
    overrides = [*TOY, *RECIPES[name], f"data.path={tiny_mlm_data}", f"train.run_dir={tmp_path}"]
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
    result = train(cfg)
    assert result.steps == 8 and all(math.isfinite(x) for x in result.losses), result.losses
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.3, result.losses


def test_every_recipe_is_tested_and_loads_as_written():
    assert {p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("demo")} == set(RECIPES)
    for name in RECIPES:  # the real sizes and layout pass the load-time checks
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.train.device == "cuda" and cfg.optim.precision == "bf16"
    causal = load_config(CONFIGS / "causal_1b_128k.yaml")
    with torch.device("meta"):
        params = Transformer(causal.model, causal.attention).num_params()
    assert params >= 1e9 and causal.train.seq_len == 131072
    assert causal.parallel.tp * causal.parallel.cp * (causal.parallel.dp or 1) == 32
