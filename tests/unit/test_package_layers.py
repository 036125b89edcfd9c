"""The packages import in one direction (docs/architecture.md): model/ and data/ import
neither parallel/ nor train/, parallel/ does not import train/. Read from the source (every
import statement, lazy ones inside functions included), so a new import that breaks the order
fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "model": {"parallel", "train", "data", "benchmarks"},
    "data": {"model", "parallel", "train", "benchmarks"},
    "parallel": {"train", "data", "benchmarks"},
}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_no_package_above_it(package):
    files = sorted((ROOT / package).glob("*.py"))
    assert files
    bad = {
        f"{path.relative_to(ROOT)} imports {sorted(_imported_packages(path) & FORBIDDEN[package])}"
        for path in files
        if _imported_packages(path) & FORBIDDEN[package]
    }
    assert not bad, bad
