"""Run a benchmark's quick mode as a user would and read the JSON report it writes.

from tests.bench import run_quick
report = run_quick("passkey_paths", tmp_path / "report.json", timeout=120)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_quick(module: str, out: Path, timeout: float, *args: str) -> dict[str, Any]:
    """`python -m benchmarks.<module> --quick --out <out> [args]` from the repository root;
    its report, or AssertionError with the end of its stderr when it exits non-zero."""
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out), *args],
        cwd=ROOT,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    tail = done.stderr[-3000:]
    assert done.returncode == 0, f"benchmarks.{module} exited {done.returncode}:\n{tail}"
    return json.loads(out.read_text())
