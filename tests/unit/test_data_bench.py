"""The data benchmark runs end to end (quick mode) and writes a consistent JSON report.
A benchmark run: `bench` marker (make bench).

Run:  pytest -m bench tests/unit/test_data_bench.py -q
"""

from __future__ import annotations

import pytest

from tests.bench import run_quick

pytestmark = pytest.mark.bench


def test_quick_data_benchmark_writes_its_report(tmp_path):
    report = run_quick("data", tmp_path / "data.json", timeout=180)
    prep = report["prepare"]
    assert set(prep) == {"end_to_end", "encode_workers1", "encode_workers2"}
    assert prep["end_to_end"]["docs"] == report["settings"]["max_docs"] == 40
    assert prep["encode_workers1"]["tokens"] == prep["encode_workers2"]["tokens"] > 0
    assert all(p["docs_per_s"] > 0 and p["seconds"] > 0 for p in prep.values())
    loader = report["loader"]
    assert [(r["num_workers"], r["doc_start_at_boundary"], r["objective"]) for r in loader] == [
        (0, False, "clm"),
        (2, False, "clm"),
        (0, True, "clm"),
        (0, False, "mlm"),
    ]
    assert all(r["batches"] > 0 and r["tokens_per_s"] > 0 for r in loader)
    assert report["loader_tokens_per_s_per_process"] == loader[0]["tokens_per_s"]
