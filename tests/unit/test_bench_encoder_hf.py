"""The HF-vs-halotron masked-LM benchmark runs end to end (quick mode: a 2-layer model at 1024
tokens) and writes a report with every impl measured, finite figures and the exactness of the
conversion. A benchmark run: `bench` marker (make bench).

    python -m pytest -q -m bench tests/unit/test_bench_encoder_hf.py
"""

from __future__ import annotations

import math

import pytest

from benchmarks.encoder_hf import IMPLS, PAIRS, QUICK_SEQ_LENS
from tests.bench import run_quick

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    return run_quick("encoder_hf", tmp_path_factory.mktemp("bench") / "e.json", timeout=300)


def finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_every_impl_measured_with_finite_figures(report):
    by_key = {(r["impl"], r["n"]): r for r in report["results"]}
    assert set(by_key) == {(impl, n) for impl in IMPLS for n in QUICK_SEQ_LENS}
    for key, r in by_key.items():
        assert r["status"] == "ok", (key, r)
        for field in ("seconds", "seconds_median", "peak_mb", "loss", "other_cpu_share"):
            assert finite(r[field]), (key, field, r[field])
        assert r["seconds"] > 0 and r["peak_mb"] > 0, key
    for n in QUICK_SEQ_LENS:
        for family in PAIRS:
            ratios = report["hf_over_ours"][str(n)][family]
            assert all(finite(v) and v > 0 for v in ratios.values()), (n, family, ratios)
    machine = report["machine"]
    assert finite(machine["matmul_gflops"]) and machine["matmul_gflops"] > 0
    assert machine["torch"] and machine["transformers"]


def test_the_converted_models_give_hf_logits(report):
    exact = report["exactness"]
    assert exact["n"] == min(QUICK_SEQ_LENS)
    lf, bb = exact["longformer"], exact["bigbird"]
    assert lf["max_abs_logit"] > 1.0  # far from flat, or the difference proves nothing
    assert lf["max_abs_logit_diff"] < 1e-4, lf
    # BigBird block_sparse with halotron's random blocks injected into HF (the tests' setting)
    assert bb["max_abs_logit_diff"] < 1e-4, bb
    assert "why" in exact["bigbird_not_comparable"]
