"""The passkey-paths benchmark runs end to end (quick mode) and writes a consistent JSON report.

python -m pytest -q tests/unit/test_bench_passkey_paths.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.passkey_paths import BUCKETS

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "passkey_paths.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.passkey_paths", "--quick", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=120,
        capture_output=True,
    )
    report = json.loads(out.read_text())
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
