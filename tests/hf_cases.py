"""What the HF conversion tests share (tests/unit/test_hf_encoder.py, test_hf_llama.py): tiny
random HF models saved to disk, `python -m train.hf import` into a run, the run's model read
back, the saved tensors, token batches and the logit comparison.

    from tests.hf_cases import SEQ, RUN, save_random, import_run, run_model, hf_tensors
    hf_dir = save_random(transformers.AutoModelForCausalLM, config, tmp_path / "hf")
    assert import_run(hf_dir, tmp_path / "run", data_dir) == 0
    err = logit_diff(run_model(tmp_path / "run")(ids), hf_model(ids).logits)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

SEQ = 128
"""Tokens per test sequence."""

VOCAB = 512
"""The test corpus tokenizer's vocabulary (tests/conftest.py)."""

RUN = [
    f"train.seq_len={SEQ}", "train.micro_batch_size=2", "train.steps=2", "train.eval_batches=1",
    "logging.wandb_mode=disabled", "logging.progress_bar=false",
]  # fmt: skip
"""Overrides of a short imported run (each test file adds its block size and objective)."""


def save_random(auto: Any, config: Any, out: Path, seed: int = 0) -> Path:
    """The model `auto.from_config(config)` (an HF Auto class) drawn from `seed`, with every
    norm gain and bias randomised too (HF initialises them to 1 and 0, which would hide a
    swapped weight and bias), saved in `out`."""
    torch.manual_seed(seed)
    model = auto.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def hf_load(auto: Any, path: Path):
    """The HF model in `path` with its eager attention (the reference implementation)."""
    return auto.from_pretrained(path, attn_implementation="eager")


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of the HF model directory `hf_dir` as saved."""
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def tokens(batch: int = 2, seq: int = SEQ, low: int = 0) -> torch.Tensor:
    """Fixed random token ids in [low, VOCAB)."""
    return torch.randint(low, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def logit_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Max abs difference of two logit tensors, which must be far from flat (or it proves
    nothing)."""
    assert ours.abs().max() > 1.0
    return float((ours - theirs).abs().max())


def import_run(hf_dir: Path, run_dir: Path, data: Path, *overrides: str) -> int:
    """`python -m train.hf import` of `hf_dir` into `run_dir`; its exit status."""
    from train.hf import main

    args = ["import", "--hf-dir", str(hf_dir), "--out", str(run_dir)]
    return main([*args, *overrides, f"data.path={data}"])


def run_model(run_dir: Path) -> nn.Module:
    """The run's newest checkpoint in its single-process model (train.export), in eval mode."""
    from model.registry import build_model
    from train.config import config_from_dict
    from train.export import consolidated_state_dict

    state_dict, config = consolidated_state_dict(run_dir)
    cfg = config_from_dict(config)
    model = build_model(cfg.model, cfg.attention)
    model.load_state_dict(state_dict)
    return model.eval()
