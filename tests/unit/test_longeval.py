"""Long-context evaluation: the passkey prompt builder, position buckets, and
`python -m train.evaluate` and `python -m train.plots` on a tiny trained run.

    python -m pytest -q tests/unit/test_longeval.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.sparse import SparsityConfig
from model.transformer import ModelArgs, Transformer
from tests.unit.test_train import TINY  # the trainer tests' tiny model
from train.longeval import (
    FILLER,
    NEEDLE,
    QUESTION,
    build_passkey_prompt,
    loss_by_position,
    passkey_accuracy,
    position_edges,
)


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def _text(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_places_the_key_and_ends_with_the_question(depth):
    n = 1000
    prompt = build_passkey_prompt(_chars, n, depth, "40917")
    text = _text(prompt.tokens)
    assert len(prompt.tokens) == n
    assert text.endswith(QUESTION)
    assert text[prompt.key_start : prompt.key_start + 5] == "40917"
    assert prompt.key_ids == _chars("40917")
    needle = NEEDLE[0] + "40917" + NEEDLE[1]
    assert text.count(needle) == 1 and text.count("40917") == 1
    at = text.index(needle)
    assert at == prompt.key_start - len(NEEDLE[0])
    assert at % len(FILLER) == 0  # the needle starts a filler line
    n_filler = n - len(needle) - len(QUESTION)
    assert prompt.depth == at / n_filler
    assert abs(prompt.depth - depth) <= len(FILLER) / n_filler  # the nearest line boundary
    assert prompt.distance == n - prompt.key_start
    # Everything else is filler, cut off only before the question.
    rest = text[:at] + text[at + len(needle) : -len(QUESTION)]
    assert rest == (FILLER * 20)[: len(rest)]


def test_passkey_prompt_depth_extremes_and_errors():
    first = build_passkey_prompt(_chars, 600, 0.0, "11111")
    assert first.key_start == len(NEEDLE[0])
    last = build_passkey_prompt(_chars, 600, 1.0, "11111")
    before_question = len(last.tokens) - len(QUESTION) - len(NEEDLE[1]) - 5
    assert last.key_start > first.key_start and before_question - last.key_start < len(FILLER)
    with pytest.raises(ValueError, match="cannot hold"):
        build_passkey_prompt(_chars, 30, 0.5, "11111")
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(_chars, 600, 1.5, "11111")


def test_position_buckets_group_by_document_position():
    assert position_edges(256, 32) == [0, 32, 64, 128, 256]
    torch.manual_seed(0)
    cfg = SparsityConfig(8, 3, 1, 1, causal=True)
    model = Transformer(ModelArgs(vocab_size=50, d_model=16, n_layers=1, n_heads=2), cfg).eval()
    tokens = torch.randint(0, 50, (2, 64))
    # The second sample holds two documents: positions restart at 40.
    positions = torch.stack([torch.arange(64), torch.cat([torch.arange(40), torch.arange(24)])])
    mask = torch.ones(2, 64)
    mask[1, -4:] = 0  # padding carries no loss
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "position_ids": positions}
    buckets = loss_by_position(model, [batch | {"loss_mask": mask}], [0, 16, 32, 64])
    assert [b["tokens"] for b in buckets] == [16 + 16 + 16, 16 + 16 + 8 - 4, 32 + 8]
    with torch.no_grad():
        logits = model(tokens, positions)
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    )
    in_first = (positions.flatten() < 16) & (mask.flatten() > 0)
    assert buckets[0]["loss"] == pytest.approx(float(losses[in_first].mean()), rel=1e-5)
    assert buckets[0]["ppl"] == pytest.approx(math.exp(buckets[0]["loss"]))


def test_passkey_accuracy_rows_are_fractions():
    cfg = SparsityConfig(16, 3, 1, 1, causal=True)
    model = Transformer(ModelArgs(vocab_size=128, d_model=16, n_layers=1, n_heads=2), cfg).eval()
    rows = passkey_accuracy(
        model, _chars, 0, contexts=[256], depths=[0.2, 0.8], trials=3, candidates=3
    )
    assert [(r["context"], r["depth"]) for r in rows] == [(256, 0.2), (256, 0.8)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["trials"] == 3 for r in rows)
    assert rows[0]["distance"] > rows[1]["distance"]


# ---- the commands on a tiny trained run -------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_prepared_data, tmp_path_factory) -> Path:
    """A 2-layer model trained for 10 steps (wandb offline, inside the test's tmp dir)."""
    from train.__main__ import main

    run_dir = tmp_path_factory.mktemp("longeval") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(run_dir.parent / var.lower()))
    args = [*TINY, f"data.path={tiny_prepared_data}", f"train.run_dir={run_dir}"]
    try:
        assert main([*args, "train.steps=10", "train.eval_every=5", "train.eval_batches=1"]) == 0
        yield run_dir
    finally:
        mp.undo()


def test_evaluate_command_writes_buckets_and_passkey_table(trained_run, tmp_path, capsys):
    from train.evaluate import main

    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(trained_run), "--out", str(out), "--val-batches", "2"]
    args += ["--trials", "2", "--candidates", "4", "--depths", "0.1,0.9"]
    assert main(args) == 0
    assert "passkey accuracy" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["step"] == 10 and result["seq_len"] == 256
    buckets = result["position_buckets"]
    assert [(b["lo"], b["hi"]) for b in buckets] == [(0, 32), (32, 64), (64, 128), (128, 256)]
    assert sum(b["tokens"] for b in buckets) > 0
    assert all(b["loss"] is None or 0 < b["loss"] < 10 for b in buckets)
    table = result["passkey"]["table"]
    # Default contexts seq_len/4, /2, /1: 64 tokens are 2 blocks, narrower than the 3-block
    # window, and evaluated all the same (any length works).
    assert {r["context"] for r in table} == {64, 128, 256}
    assert {r["depth"] for r in table} == {0.1, 0.9}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in table)
    assert result["passkey"]["chance"] == 0.25
    assert main(["--checkpoint", str(tmp_path / "nowhere")]) == 2


def test_plots_command_writes_the_loss_curve(trained_run, tmp_path):
    from train.plots import main

    out = tmp_path / "loss.png"
    assert main([str(trained_run), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_evaluate_logs_into_the_runs_wandb_run(trained_run, tmp_path):
    from train.checkpoint import CheckpointArgs, CheckpointManager
    from train.evaluate import main

    run_id = CheckpointManager(CheckpointArgs(), trained_run).load_latest()["progress"][
        "wandb_run_id"
    ]
    args = ["--checkpoint", str(trained_run), "--out", str(tmp_path / "e.json"), "--wandb"]
    args += ["--val-batches", "1", "--trials", "1", "--candidates", "2", "--depths", "0.5"]
    args += ["--contexts", "256"]
    assert main(args) == 0
    files = sorted(trained_run.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    # the training run's, then the evaluation's (same id, resumed); on failure, say what is there
    listing = sorted(str(p.relative_to(trained_run)) for p in trained_run.glob("wandb/**/*"))
    assert len(files) == 2, listing
    assert any(b"eval/passkey_accuracy" in f.read_bytes() for f in files)


def test_loss_curve_mean_skips_the_nan_of_a_skipped_step():
    from train.plots import _moving_average

    smooth = _moving_average([4.0, math.nan, 2.0, 6.0, 1.0], width=2)
    assert smooth[:2] == [4.0, 4.0] and smooth[2:] == [2.0, 4.0, 3.5]
    assert math.isnan(_moving_average([math.nan], width=3)[0])
