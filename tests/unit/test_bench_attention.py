"""The attention benchmark runs end to end (quick mode) and writes a consistent JSON report.
A benchmark run: `bench` marker (make bench).

pytest -m bench tests/unit/test_bench_attention.py
"""

from __future__ import annotations

import pytest

from benchmarks.attention import IMPLS, QUICK_SEQ_LENS, SPEEDUPS, TARGETS
from tests.bench import run_quick

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    return run_quick("attention", tmp_path_factory.mktemp("bench") / "a.json", timeout=240)


def test_every_impl_measured_at_every_n(report):
    by_key = {(r["impl"], r["n"]): r for r in report["results"]}
    assert set(by_key) == {(impl, n) for impl in IMPLS for n in QUICK_SEQ_LENS}
    for key, r in by_key.items():
        assert r["status"] == "ok", (key, r)
        assert r["seconds"] > 0 and all(t > 0 for t in r["seconds_all"]), key
        assert r["peak_mb"] > 0, key
    assert report["machine"]["matmul_gflops"] > 0
    for impl in ("ours_bigbird", "ours_longformer", "dense_sdpa"):
        assert by_key[(impl, QUICK_SEQ_LENS[0])]["useful_gflops"] > 0


def test_speedups_cover_every_pair_at_every_n(report):
    for n in QUICK_SEQ_LENS:
        row = report["speedups"][str(n)]
        assert set(row) == set(SPEEDUPS) and all(v > 0 for v in row.values())
    assert set(report["targets"]) >= {"n", *TARGETS}


def test_ours_matches_dense_oracle(report):
    exact = report["exactness"]
    assert exact["n"] == min(QUICK_SEQ_LENS)
    for name in ("ours_bigbird", "ours_longformer"):
        assert exact[name]["max_abs_err_out"] < 1e-4
        assert exact[name]["max_abs_err_grad"] < 1e-4
    assert "longformer" in report["equivalence"]
