"""`python -m parallel.verify` end to end: spawns cp ranks, prints PASS, exits 0.

pytest tests/distributed/test_verify_cli.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest

YAML = """\
attention:
  block_size: 16
  window_blocks: 7
  global_blocks: 1
  random_blocks: 2
  random_pool_blocks: {pool}
  causal: {causal}
train:
  seq_len: 256
"""


def _verify(tmp_path, *extra, causal="false", pool=0):
    config = tmp_path / "cfg.yaml"
    config.write_text(YAML.format(causal=causal, pool=pool))
    return subprocess.run(
        [sys.executable, "-m", "parallel.verify", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("pool", [0, 4])
def test_verify_passes_with_padding_and_global_mask(tmp_path, pool):
    run = _verify(tmp_path, "--cp", "4", "--padding", "--global-mask", causal="true", pool=pool)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("PASS cp=4 seq_len=256"), run.stdout


@pytest.mark.timeout(60)
def test_verify_refuses_impossible_split(tmp_path):
    run = _verify(tmp_path, "--cp", "3")
    assert run.returncode != 0
    assert "multiple of cp x attention.block_size" in run.stderr


@pytest.mark.timeout(60)
def test_verify_names_unknown_attention_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("attention:\n  window_blok: 3\ntrain:\n  seq_len: 256\n")
    run = subprocess.run(
        [sys.executable, "-m", "parallel.verify", "--config", str(config), "--cp", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "window_blok" in run.stderr
