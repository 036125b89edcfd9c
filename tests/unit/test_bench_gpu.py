"""The GPU check's smoke mode runs every section on the CPU and writes a complete report.

python -m pytest -q -m bench tests/unit/test_bench_gpu.py      # about 25 s on 2 cores (make bench)

Only the report's structure and exactness are checked (timing targets are not evaluated in
--smoke); the GPU run itself is `python -m benchmarks.gpu` on one H100 / H200.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.gpu import PATHS, PATTERNS, SECTIONS, SMOKE, THROUGHPUT_PATTERNS
from tests.bench import ROOT

FORBIDDEN = ("megatron", "deepspeed", "wandb", "webdataset", "sentencepiece")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)],
        cwd=ROOT,
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stderr  # progress goes to stderr
    return json.loads(out.read_text())


@pytest.mark.bench  # runs the benchmark script (--smoke): make bench
def test_every_section_ran_without_error(report):
    assert report["smoke"] is True and report["device"] == "cpu" and report["wall_seconds"] > 0
    for section in SECTIONS:
        assert "error" not in report[section], report[section].get("traceback")
        assert report[section]["seconds"] > 0


@pytest.mark.bench  # runs the benchmark script (--smoke): make bench
def test_exactness_covers_every_path_pattern_and_dtype_and_passes(report):
    results = report["exactness"]["results"]
    keys = {(r["path"], r["pattern"], r["dtype"]) for r in results}
    assert keys == {(p, n, d) for p in PATHS for n in PATTERNS for d in ("float32", "bfloat16")}
    for r in results:
        assert r["passed"] is True, r
        assert r["backward"].startswith("skipped")  # CPU FlexAttention: forward only
        assert r["errors"]["out"]["rel_err"] <= r["tolerance"]
    assert report["exactness"]["all_pass"] is True
    assert report["targets"]["exactness_all_pass"]["met"] is True


@pytest.mark.bench  # runs the benchmark script (--smoke): make bench
def test_throughput_and_training_report_rates(report):
    rows = {(r["impl"], r["n"]): r for r in report["throughput"]["results"]}
    impls = ("dense_flash", *THROUGHPUT_PATTERNS)
    assert set(rows) == {(i, n) for i in impls for n in SMOKE.throughput_ns}
    assert all(r["useful_tflops"] > 0 for r in rows.values())
    for pattern in THROUGHPUT_PATTERNS:
        assert all(v > 0 for v in report["throughput"]["ratios"][pattern].values())
    train = report["training"]
    assert train["tokens_per_s"] > 0 and train["mfu_measured"] > 0
    assert len(train["loss"]) == SMOKE.warmup_steps + SMOKE.timed_steps
    targets = report["targets"]
    assert targets["timing_evaluated"] is False
    assert targets["mfu"]["met"] is None and targets["sparse_vs_flash_useful_rate"]["met"] is None


def test_imports_none_of_the_cluster_packages():
    code = (
        "import sys, benchmarks.gpu; "
        f"print([m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
