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

from model.registry import build_model
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
        assert cfg.model.arch == ("encoder" if name.endswith("_mlm") else "transformer"), name
    causal = load_config(CONFIGS / "causal_1b_128k.yaml")
    with torch.device("meta"):
        params = build_model(causal.model, causal.attention).num_params()
    assert params >= 1e9 and causal.train.seq_len == 131072
    assert causal.parallel.tp * causal.parallel.cp * (causal.parallel.dp or 1) == 32


@pytest.mark.parametrize(
    "name,model_type", [("bigbird_base_mlm", "big_bird"), ("longformer_base_mlm", "longformer")]
)
def test_mlm_recipes_are_the_hf_architecture_and_export_as_it(name, model_type):
    """The MLM recipes are HF's BigBird / Longformer (model.arch=encoder): the HF model export
    writes for the recipe, built from its config, has the same parameters, one for one; and
    export keeps the recipe's pattern (block_sparse with its random blocks; the 512 window in
    every layer)."""
    transformers = pytest.importorskip("transformers")
    from train.hf import CONVERTERS

    cfg = load_config(CONFIGS / f"{name}.yaml")
    converter = CONVERTERS[model_type]
    assert converter.accepts(cfg) and converter.exports_pattern(cfg)
    converter.check_run(cfg)
    hf_config = converter.hf_config(cfg)
    with torch.device("meta"):
        ours = build_model(cfg.model, cfg.attention).num_params()
        hf_model = transformers.AutoModelForMaskedLM.from_config(hf_config)
    theirs = sum(p.numel() for p in hf_model.parameters())
    assert ours == theirs, (ours, theirs)
    if model_type == "big_bird":
        assert hf_config.attention_type == "block_sparse" and hf_config.num_random_blocks == 3
    else:
        assert hf_config.attention_window == [512] * cfg.model.n_layers


def test_the_longformer_recipe_starts_from_roberta_as_the_paper(tiny_mlm_data, tmp_path):
    """`python -m train.hf import --config configs/longformer_base_mlm.yaml` of a RoBERTa whose
    positions are fewer than the recipe's sequence: the positions are copied out, the window is
    the checkpoint's length (roberta-base's 512: the recipe's), the global projections come
    from the local ones, the recipe's data keys stay, and the run trains and exports as a
    Longformer."""
    pytest.importorskip("transformers")
    from tests.hf_cases import import_run
    from tests.unit.test_hf_encoder import make_hf

    hf_dir = make_hf("roberta", tmp_path / "hf", max_position_embeddings=130)
    toy = [o for o in TOY if not o.startswith("model.")]
    overrides = ["--config", str(CONFIGS / "longformer_base_mlm.yaml"), *toy]
    overrides += ["attention.block_size=16", "train.steps=2"]
    run = tmp_path / "run"
    assert import_run(hf_dir, run, tiny_mlm_data, *overrides) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg.model.arch == "encoder" and cfg.model.max_positions == 258
    assert cfg.attention.window_tokens == 128 and cfg.attention.global_projections
    assert cfg.data.global_doc_starts and cfg.data.objective == "mlm"
    result = train(load_config(run / "config.yaml", [f"train.run_dir={run}"]), resume="yes")
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    from train.hf import main

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 0
    exported = (tmp_path / "out" / "config.json").read_text()
    assert '"model_type": "longformer"' in exported
