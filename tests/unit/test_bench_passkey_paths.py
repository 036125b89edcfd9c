"""The passkey-paths benchmark runs end to end (quick mode) and writes a consistent JSON report.

python -m pytest -q tests/unit/test_bench_passkey_paths.py
"""

from __future__ import annotations

import math

import torch

from benchmarks.passkey_paths import BUCKETS, PasskeyTask, verdict
from tests.bench import run_quick


def test_quick_benchmark_writes_its_report(tmp_path):
    report = run_quick("passkey_paths", tmp_path / "passkey_paths.json", timeout=120)
    assert report["settings"]["quick"] is True
    pairs = report["budget"]["attention_pairs"]
    assert set(pairs) == set(report["patterns"]) == {"window", "bigbird"}
    assert report["budget"]["ratio_bigbird_to_window"] == round(
        pairs["bigbird"] / pairs["window"], 4
    )
    for run in report["patterns"].values():
        assert set(run["accuracy"]) == set(BUCKETS)
        samples = {name: bucket["samples"] for name, bucket in run["accuracy"].items()}
        assert (
            samples["within_reach"] + samples["beyond_reach"]
            == (report["settings"]["eval_samples"])
        )
        beyond = samples["beyond_with_path"] + samples["beyond_without_path"]
        assert beyond == samples["beyond_reach"]
        assert run["loss_curve"][-1]["step"] == report["settings"]["steps"]
    # a window-only model has no path beyond its reach
    assert report["patterns"]["window"]["accuracy"]["beyond_with_path"]["samples"] == 0
    assert report["verdict"] == verdict(report)


def _report(window_beyond: float, with_path: float, without_path: float | None) -> dict:
    def bucket(acc: float | None, samples: int = 200) -> dict:
        return {"samples": 0 if acc is None else samples, "token_accuracy": acc}

    return {
        "chance": {"token_accuracy": 1 / 16},
        "settings": {"task": {"key_len": 2}},
        "patterns": {
            "window": {"accuracy": {"beyond_reach": bucket(window_beyond)}},
            "bigbird": {
                "accuracy": {
                    "beyond_with_path": bucket(with_path),
                    "beyond_without_path": bucket(without_path),
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
