"""The passkey-paths benchmark: its helpers (verdict, standard errors, the patterns) here; its
quick run end to end under the `bench` marker (make bench).

python -m pytest -q tests/unit/test_bench_passkey_paths.py [-m bench]
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import passkey_paths
from benchmarks.passkey_paths import (
    BUCKETS,
    PasskeyTask,
    patterns,
    pool_vs_whole,
    summarize_bucket,
    verdict,
)
from tests.bench import run_quick
from train.config import load_config

PATTERNS = {"window", "bigbird", "bigbird_pool"}


def _causal_window_pairs(seq_len: int, block: int, window_blocks: int) -> int:
    """Attended pairs of a causal block window, counted key by key (independent of the code)."""
    return sum(
        1 for i in range(seq_len) for j in range(i + 1) if i // block - j // block < window_blocks
    )


@pytest.mark.bench
def test_quick_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "passkey_paths.json"
    report = run_quick("passkey_paths", out, 180, "--pool-blocks", "3")
    assert report["settings"]["quick"] is True
    assert report["settings"]["pool_blocks"] == 3
    runs = report["patterns"]
    pairs = report["budget"]["attention_pairs"]
    assert set(pairs) == set(runs) == PATTERNS
    assert runs["bigbird"]["pattern"]["random_pool_blocks"] == 0
    assert runs["bigbird_pool"]["pattern"]["random_pool_blocks"] == 3
    # the pool changes only the candidates of the random draw
    without_pool = {**runs["bigbird_pool"]["pattern"], "random_pool_blocks": 0}
    assert without_pool == runs["bigbird"]["pattern"]
    settings, model = report["settings"], report["settings"]["model"]
    per_head = _causal_window_pairs(
        settings["task"]["seq_len"],
        settings["block_size"],
        runs["window"]["pattern"]["window_blocks"],
    )
    assert pairs["window"] == per_head * model["n_layers"] * model["n_heads"]
    assert pairs["bigbird"] == pairs["window"]  # the same budget, to the pair
    assert 0.8 * pairs["bigbird"] < pairs["bigbird_pool"] <= pairs["bigbird"]
    key_len = report["settings"]["task"]["key_len"]
    for name, run in runs.items():
        assert run["attention_pairs"] == pairs[name]
        assert set(run["accuracy"]) == set(BUCKETS)
        samples = {bucket: acc["samples"] for bucket, acc in run["accuracy"].items()}
        assert (
            samples["within_reach"] + samples["beyond_reach"] == report["settings"]["eval_samples"]
        )
        beyond = samples["beyond_with_path"] + samples["beyond_without_path"]
        assert beyond == samples["beyond_reach"]
        for acc in run["accuracy"].values():
            if acc["samples"]:
                p, n = acc["token_accuracy"], acc["samples"] * key_len
                # p is rounded to 4 decimals in the report, the stderr is computed before
                assert abs(acc["stderr"] - math.sqrt(p * (1 - p) / n)) < 2e-4
            else:
                assert acc["token_accuracy"] is None and acc["stderr"] is None
        assert run["loss_curve"][-1]["step"] == report["settings"]["steps"]
    # the three models are evaluated on the same sequences: the same buckets
    reach_samples = {name: run["accuracy"]["beyond_reach"]["samples"] for name, run in runs.items()}
    assert len(set(reach_samples.values())) == 1
    # a window-only model has no path beyond its reach
    assert runs["window"]["accuracy"]["beyond_with_path"]["samples"] == 0


def test_bigbird_draws_from_the_whole_sequence_whatever_the_demo_config_says(tmp_path, monkeypatch):
    demo = passkey_paths.DEMO_CONFIG.read_text()
    pooled = tmp_path / "demo.yaml"
    assert "  random_pool_blocks: 0\n" in demo  # the recipe states BigBird's whole-sequence draw
    pooled.write_text(demo.replace("  random_pool_blocks: 0\n", "  random_pool_blocks: 8\n", 1))
    assert load_config(pooled).attention.random_pool_blocks == 8  # the file does ask for a pool
    monkeypatch.setattr(passkey_paths, "DEMO_CONFIG", pooled)
    cfgs = patterns(16, pool_blocks=5)
    assert set(cfgs) == PATTERNS
    assert cfgs["bigbird"].random_pool_blocks == 0
    assert cfgs["window"].random_pool_blocks == 0 and cfgs["window"].random_blocks == 0
    assert cfgs["bigbird_pool"].random_pool_blocks == 5
    assert cfgs["bigbird_pool"].random_blocks == cfgs["bigbird"].random_blocks > 0
    with pytest.raises(ValueError, match="pool_blocks"):
        patterns(16, pool_blocks=0)


def test_bucket_stderr_counts_key_tokens_as_trials():
    # 200 samples of 2 key tokens, 120 token hits: p = 0.3 over 400 trials
    bucket = summarize_bucket(200, 60.0, 20.0, key_len=2)
    assert bucket == {
        "samples": 200,
        "token_accuracy": 0.3,
        "stderr": round(math.sqrt(0.3 * 0.7 / 400), 4),
        "key_accuracy": 0.1,
    }
    assert bucket["stderr"] == 0.0229
    empty = summarize_bucket(0, 0.0, 0.0, key_len=2)
    assert empty["samples"] == 0 and empty["token_accuracy"] is None and empty["stderr"] is None


def _bucket(acc: float | None, samples: int = 200, key_len: int = 2) -> dict:
    if acc is None:
        return {"samples": 0, "token_accuracy": None, "stderr": None}
    stderr = round(math.sqrt(acc * (1 - acc) / (samples * key_len)), 4)
    return {"samples": samples, "token_accuracy": acc, "stderr": stderr}


def _report(
    window_beyond: float,
    with_path: float,
    without_path: float | None,
    pool_with_path: float | None = 0.5,
    whole_beyond: float = 0.3,
    pool_beyond: float = 0.3,
) -> dict:
    return {
        "chance": {"token_accuracy": 1 / 16},
        "settings": {"task": {"key_len": 2}},
        "patterns": {
            "window": {"accuracy": {"beyond_reach": _bucket(window_beyond)}},
            "bigbird": {
                "accuracy": {
                    "beyond_reach": _bucket(whole_beyond),
                    "beyond_with_path": _bucket(with_path),
                    "beyond_without_path": _bucket(without_path),
                }
            },
            "bigbird_pool": {
                "accuracy": {
                    "beyond_reach": _bucket(pool_beyond),
                    "beyond_with_path": _bucket(pool_with_path),
                }
            },
        },
    }


def test_verdict_needs_every_claim():
    # sigma of a 1/16 chance over 400 key tokens is 0.0121: 3 sigma above chance is 0.099.
    assert verdict(_report(0.07, 0.5, 0.06))["demonstrated"] is True
    assert verdict(_report(0.07, 0.5, None))["demonstrated"] is True
    shown = verdict(_report(0.07, 0.5, None))
    assert shown["bigbird_beyond_without_path_at_chance"] is None
    sigma = math.sqrt(1 / 16 * 15 / 16 / 400)
    assert shown["z_above_chance"]["window_beyond_reach"] == round((0.07 - 1 / 16) / sigma, 2)
    for window, with_path, without_path in [(0.2, 0.5, 0.06), (0.07, 0.09, 0.06), (0.07, 0.5, 0.3)]:
        assert verdict(_report(window, with_path, without_path))["demonstrated"] is False


def test_verdict_states_the_pool_claim_apart():
    above = verdict(_report(0.07, 0.5, 0.06, pool_with_path=0.5))
    assert above["bigbird_pool_beyond_with_path_above_chance"] is True
    sigma = math.sqrt(1 / 16 * 15 / 16 / 400)
    z = above["z_above_chance"]["bigbird_pool_beyond_with_path"]
    assert z == round((0.5 - 1 / 16) / sigma, 2)
    # 0.09 is 2.3 sigma above chance: not shown; the window/BigBird demonstration stands
    at_chance = verdict(_report(0.07, 0.5, 0.06, pool_with_path=0.09))
    assert at_chance["bigbird_pool_beyond_with_path_above_chance"] is False
    assert at_chance["demonstrated"] is True
    no_path = verdict(_report(0.07, 0.5, 0.06, pool_with_path=None))
    assert no_path["bigbird_pool_beyond_with_path_above_chance"] is None
    assert no_path["z_above_chance"]["bigbird_pool_beyond_with_path"] is None


def test_pool_vs_whole_difference_stderr_and_z():
    # 400 key tokens each: stderr sqrt(0.3*0.7/400 + 0.4*0.6/400) = 0.0335, z = -0.1/0.0335
    far = pool_vs_whole(_report(0.07, 0.5, 0.06, pool_beyond=0.3, whole_beyond=0.4))
    assert far["difference"] == -0.1
    assert far["stderr"] == 0.0335
    assert far["z"] == -2.98 and far["pool_matches_whole"] is False
    # 0.03 apart: z = 0.03 / sqrt(0.33*0.67/400 + 0.30*0.70/400) = 0.91
    near = pool_vs_whole(_report(0.07, 0.5, 0.06, pool_beyond=0.33, whole_beyond=0.3))
    assert near["z"] == 0.91 and near["pool_matches_whole"] is True
    assert near["pool_token_accuracy"] == 0.33 and near["whole_token_accuracy"] == 0.3
    report = _report(0.07, 0.5, 0.06)
    report["patterns"]["bigbird_pool"]["accuracy"]["beyond_reach"] = _bucket(None)
    empty = pool_vs_whole(report)
    assert empty["difference"] is None and empty["pool_matches_whole"] is None


def test_near_fraction_plants_keys_close_to_the_query():
    task = PasskeyTask(seq_len=256)
    q, k = task.answer_start, task.key_len
    near = task.batch(torch.Generator().manual_seed(0), 256, near_fraction=1.0, near_tokens=32)
    assert bool((near["key_start"] - 1 >= q - k - 32).all())
    uniform = task.batch(torch.Generator().manual_seed(0), 256)
    assert int((uniform["key_start"] - 1 < q - k - 32).sum()) > 150
    for data in (near, uniform):
        rows = torch.arange(256)
        assert bool((data["tokens"][rows, data["key_start"] - 1] == task.marker).all())
        for i in range(k):
            key_tokens = data["tokens"][rows, data["key_start"] + i]
            assert torch.equal(key_tokens, data["keys"][:, i])
        assert bool((data["tokens"][:, q] == task.query).all())
