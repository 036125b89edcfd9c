"""The trainer end to end on a tiny real corpus: loss falls, wandb offline run, exact resume,
crash-safe checkpoints, refusals with clear messages.

    python -m pytest -q tests/unit/test_train.py
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.model_space import model_space
from train.__main__ import main
from train.checkpoint import CheckpointArgs, CheckpointManager
from train.config import config_to_dict, load_config
from train.loop import train

TINY = [
    "model.vocab_size=512",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "attention.block_size=32",
    "attention.window_blocks=3",
    "attention.global_blocks=1",
    "attention.random_blocks=2",
    "train.seq_len=256",
    "train.micro_batch_size=4",
    "train.eval_batches=2",
    "optim.lr=5e-3",
    "schedule.warmup_steps=3",
    "schedule.min_lr=1e-3",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="session")
def data_dir(request, tmp_path_factory) -> Path:
    """The data helper's session corpus when conftest provides it, else a tiny one of ours."""
    try:
        prepared = request.getfixturevalue("tiny_prepared_data")
        return Path(getattr(prepared, "path", prepared))
    except pytest.FixtureLookupError:
        pass
    from data.prepare import PrepareArgs, prepare

    out = tmp_path_factory.mktemp("train_data")
    prepare(
        PrepareArgs(out=str(out), vocab_size=512, max_docs=60, val_per_mille=100, progress=False)
    )
    return out


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = tmp_path / var.lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))


def _cfg(data_dir: Path, run_dir: Path, *overrides: str):
    return load_config(
        None, [*TINY, f"data.path={data_dir}", f"train.run_dir={run_dir}", *overrides]
    )


def _json_or_none(text: bytes):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _wandb_file(run_dir: Path) -> Path:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return path


def test_training_run_learns_and_records_everything(data_dir, tmp_path, wandb_env, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.path={data_dir}", f"train.run_dir={run_dir}", "train.steps=30"]
    args += ["train.eval_every=15", "checkpoint.every=10", "logging.log_every=5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "steps 30" in out and "val loss" in out

    state = CheckpointManager(CheckpointArgs(), run_dir).load_latest()["progress"]
    losses = state["losses"]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    val = dict(state["val_history"])
    assert set(val) == {15, 30} and all(math.isfinite(v) for v in val.values())
    # Held-out code generalises less than the 60 training documents, but clearly above chance.
    assert val[30] < losses[0] - 0.5, (val, losses[0])
    assert f"val loss {val[30]:.4f}" in out

    # The resolved config is written and reloads to the same config.
    cfg = load_config(run_dir / "config.yaml")
    assert cfg == load_config(None, args)
    # The wandb offline run holds the config (JSON per section) and the metrics.
    raw = _wandb_file(run_dir).read_bytes()
    logged = [_json_or_none(m) for m in re.findall(rb"\{[^{}]*\}", raw)]
    for section, values in config_to_dict(cfg).items():
        assert values in logged, section
    assert b"train/loss" in raw and b"val/loss" in raw and b"train/tokens_per_s" in raw
    assert b"data/skipped_samples" in raw and b"data/skipped_shards" in raw
    assert state["wandb_run_id"] in _wandb_file(run_dir).name
    # keep_last=2 of the checkpoints at 10, 20 and the final 30.
    assert CheckpointManager(CheckpointArgs(), run_dir).complete_steps() == [20, 30]


def test_a_checkpoint_of_the_earlier_format_is_refused_with_a_sentence(data_dir, tmp_path):
    """Before the run state was Stateful objects, losses and the like sat at the top level."""
    cfg = _cfg(data_dir, tmp_path / "run", "logging.wandb_mode=disabled")
    old = {"engine": {"model": {}}, "data": {}, "rng": {}, "losses": [1.0], "tokens": 5}
    CheckpointManager(cfg.checkpoint, cfg.train.run_dir).save(1, old, config_to_dict(cfg))
    with pytest.raises(ValueError, match="no progress state: it was written by an earlier"):
        train(cfg, resume=True)


def test_resume_continues_exactly(data_dir, tmp_path, wandb_env):
    common = ["checkpoint.every=2", "schedule.decay_steps=6", "train.eval_batches=1"]
    whole = train(_cfg(data_dir, tmp_path / "whole", *common, "train.steps=6"))

    run_dir = tmp_path / "split"
    first = train(_cfg(data_dir, run_dir, *common, "train.steps=4"))
    assert first.steps == 4
    resumed = train(_cfg(data_dir, run_dir, *common, "train.steps=6"), resume=True)
    assert resumed.start_step == 4 and resumed.steps == 6
    # Single process, fp32: the continued run is bit-identical to the uninterrupted one.
    assert resumed.losses == whole.losses
    manager = CheckpointManager(CheckpointArgs(), run_dir)
    # Parameters and AdamW moments too.
    final = model_space(manager.path_of(6))
    reference = model_space(CheckpointManager(CheckpointArgs(), tmp_path / "whole").path_of(6))
    assert final.keys() == reference.keys() and any(k.startswith("optim.exp_avg.") for k in final)
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name
    assert resumed.tokens == whole.tokens
    # wandb continues the same run id (offline, wandb writes it into a second directory).
    run_id = manager.load_latest()["progress"]["wandb_run_id"]
    assert first.wandb_dir and resumed.wandb_dir and first.wandb_dir != resumed.wandb_dir
    for wandb_dir in (first.wandb_dir, resumed.wandb_dir):
        assert (Path(wandb_dir).parent / f"run-{run_id}.wandb").is_file()


def test_bidirectional_mlm_encoder_trains_and_resumes_exactly(tiny_mlm_data, tmp_path, wandb_env):
    """attention.causal=false with data.objective=mlm, ITC global blocks, an explicit global
    position, per-sample global marks (every packed document's first token) and two learned
    ETC tokens in the leading slots."""
    common = [
        "attention.causal=false",
        "data.objective=mlm",
        "attention.global_tokens=[100]",
        "attention.etc_tokens=2",
        "data.global_doc_starts=true",
        "checkpoint.every=3",
        "schedule.decay_steps=8",
        "train.eval_batches=1",
        "optim.lr=1e-2",
    ]
    whole = train(_cfg(tiny_mlm_data, tmp_path / "whole", *common, "train.steps=8"))
    assert all(math.isfinite(loss) for loss in whole.losses)
    assert sum(whole.losses[-3:]) / 3 < whole.losses[0] - 0.5, whole.losses
    run_dir = tmp_path / "split"
    train(_cfg(tiny_mlm_data, run_dir, *common, "train.steps=6"))
    resumed = train(_cfg(tiny_mlm_data, run_dir, *common, "train.steps=8"), resume=True)
    assert resumed.start_step == 6 and resumed.losses == whole.losses


def test_bare_resume_before_overrides(data_dir, tmp_path, wandb_env, capsys):
    """`--resume train.steps=N` (as the README writes it) is a bare --resume plus an override."""
    args = [*TINY, f"data.path={data_dir}", f"train.run_dir={tmp_path / 'run'}"]
    assert main([*args, "train.steps=2"]) == 0
    assert main(["--resume", "train.steps=3", *args]) == 0
    assert "steps 3 (this run 1)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--resume", "sometimes", *args])


def test_overrides_before_and_after_resume(data_dir, tmp_path, wandb_env, capsys):
    """Overrides go anywhere on the command line, in order: the later value of a key wins."""
    args = [*TINY, f"data.path={data_dir}", f"train.run_dir={tmp_path / 'run'}"]
    assert main([*args, "train.steps=2"]) == 0
    assert main([*args, "train.steps=9", "--resume", "yes", "train.steps=3"]) == 0
    assert "steps 3 (this run 1)" in capsys.readouterr().out
    assert main([*args[:3], "--resume", "train.steps=4", *args[3:]]) == 0
    assert "steps 4 (this run 1)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA")
def test_cuda_device_without_cuda_is_one_sentence(tmp_path, capsys):
    """Refused before the data, the model or any process group: data.path does not exist."""
    code = main([f"data.path={tmp_path / 'nowhere'}", "train.device=cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: train.device=cuda but this torch") and "device=cpu" in err


def test_fresh_start_refuses_existing_checkpoints(data_dir, tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    manager = CheckpointManager(CheckpointArgs(), run_dir)
    manager.save(3, {"x": 1}, {})
    with pytest.raises(ValueError, match="--resume"):
        train(_cfg(data_dir, run_dir, "train.steps=5"))


def test_resume_refuses_a_different_model(data_dir, tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    saved = config_to_dict(_cfg(data_dir, run_dir, "model.d_model=32", "model.n_heads=2"))
    CheckpointManager(CheckpointArgs(), run_dir).save(2, {"x": 1}, saved)
    with pytest.raises(ValueError, match=r"model\.d_model=32"):
        train(_cfg(data_dir, run_dir, "train.steps=5"), resume=True)


def test_missing_data_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m data\.prepare --out .*nowhere"):
        train(_cfg(tmp_path / "nowhere", tmp_path / "run"))


def test_missing_shard_directory_is_one_sentence_before_the_run(data_dir, tmp_path, capsys):
    gone = tmp_path / "gone"
    code = main(
        [*TINY, f"data.path={data_dir}", f"data.train_shards={gone}/train-{{000000..000009}}.tar",
         f"train.run_dir={tmp_path / 'run'}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: data.train_shards=") and f"{gone}, which does not" in err, err
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything


def test_vocab_smaller_than_tokenizer_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model\.vocab_size=256 .*512"):
        train(_cfg(data_dir, tmp_path / "run", "model.vocab_size=256"))


@pytest.mark.parametrize("key", ["tp", "pp", "cp", "dp"])
def test_layout_larger_than_the_world_is_refused_before_anything(tmp_path, key):
    """One process cannot hold a layout of 2: refused before data, groups or files."""
    with pytest.raises(ValueError, match=rf"parallel\.{key}=2.*world size 1"):
        train(_cfg(tmp_path, tmp_path / "run", f"parallel.{key}=2"))


# ---- the checkpoint manager alone -----------------------------------------------------------


def test_checkpoint_commit_retention_and_leftover_tmp(tmp_path):
    manager = CheckpointManager(CheckpointArgs(every=2, keep_last=2), tmp_path)
    assert manager.load_latest() is None
    for step in (2, 4, 6):
        manager.save(step, {"w": torch.full((3,), float(step))}, {"model": {"d": 1}})
    assert manager.complete_steps() == [4, 6]
    assert (manager.dir / "latest").read_text().strip() == "step_000006"
    # A save killed before its rename leaves a .tmp directory: it is never loaded.
    partial = manager.dir / "step_000008.tmp"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half a checkpoint")
    state = manager.load_latest({"model": {"d": 1}})
    assert state["step"] == 6 and state["version"] == 1
    assert torch.equal(state["w"], torch.full((3,), 6.0))
    assert state["config"] == {"model": {"d": 1}}
    # A killed rename-to-latest: the step directory is complete and is found without `latest`.
    (manager.dir / "latest").unlink()
    assert manager.load_latest()["step"] == 6
    # The next save clears the leftover.
    manager.save(8, {"w": torch.zeros(1)}, {"model": {"d": 1}})
    assert not partial.exists() and manager.complete_steps() == [6, 8]


def test_checkpoint_only_tmp_means_nothing_to_resume(tmp_path):
    manager = CheckpointManager(CheckpointArgs(), tmp_path)
    (manager.dir / "step_000002.tmp").mkdir(parents=True)
    assert manager.load_latest() is None


def test_checkpoint_refuses_other_model_and_version(tmp_path):
    manager = CheckpointManager(CheckpointArgs(), tmp_path)
    manager.save(1, {}, {"model": {"d_model": 64, "n_layers": 2}})
    with pytest.raises(ValueError, match=r"model\.d_model=64 \(config: 128\)"):
        manager.load_latest({"model": {"d_model": 128, "n_layers": 2}})
    state = torch.load(manager.path_of(1) / "state.pt", weights_only=False)
    state["version"] = 99
    torch.save(state, manager.path_of(1) / "state.pt")
    with pytest.raises(ValueError, match="version 99"):
        manager.load_latest()


_SLOW_SAVER = """
import sys, torch
from train.checkpoint import CheckpointArgs, CheckpointManager
manager = CheckpointManager(CheckpointArgs(keep_last=0), sys.argv[1])
manager.save(2, {"w": torch.ones(4)}, {"model": {}})
print("saved 2", flush=True)
# ~400 MB: the write takes long enough to be killed half way
manager.save(4, {"w": [torch.ones(10_000_000) for _ in range(10)]}, {"model": {}})
print("saved 4", flush=True)
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saved 2"
        partial = tmp_path / "checkpoints" / "step_000004.tmp" / "state.pt"
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert time.monotonic() < deadline and proc.poll() is None, "save never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    manager = CheckpointManager(CheckpointArgs(), tmp_path)
    assert manager.complete_steps() == [2]
    state = manager.load_latest()
    assert state["step"] == 2 and torch.equal(state["w"], torch.ones(4))


def test_disk_full_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    manager = CheckpointManager(CheckpointArgs(), tmp_path)
    manager.save(1, {"w": torch.ones(1)}, {"model": {}})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"step_000002\.tmp/state\.pt: the disk is full") as info:
        manager.save(2, {"w": torch.ones(1)}, {"model": {}})
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()  # the partial is removed
    monkeypatch.undo()
    assert manager.complete_steps() == [1] and manager.load_latest()["step"] == 1


@pytest.fixture
def megatron_tracker():
    """megatron-core's model-parallel RNG tracker holding generator states (CPU generator
    states: on CPU nothing seeds it; the Megatron engine does on CUDA), reset afterwards."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.set_states(
        {name: torch.Generator().manual_seed(seed).get_state() for name, seed in
         (("model-parallel-rng", 2718), ("data-parallel-rng", 0))}
    )  # fmt: skip
    yield tracker
    tracker.reset()


def test_checkpoints_carry_megatrons_model_parallel_rng_tracker(
    data_dir, tmp_path, wandb_env, megatron_tracker
):
    saved = {k: v.clone() for k, v in megatron_tracker.get_states().items()}
    run_dir = tmp_path / "run"
    train(_cfg(data_dir, run_dir, "checkpoint.every=2", "train.steps=2"))
    state = CheckpointManager(CheckpointArgs(), run_dir).load_latest()
    assert set(state["rng"]["megatron_tracker"]) == set(saved)
    for name, value in saved.items():
        assert torch.equal(state["rng"]["megatron_tracker"][name], value), name

    # Another process's tracker (other states) resumes to the saved ones.
    megatron_tracker.reset()
    megatron_tracker.set_states({"model-parallel-rng": torch.Generator().get_state()})
    train(_cfg(data_dir, run_dir, "checkpoint.every=2", "train.steps=3"), resume=True)
    restored = megatron_tracker.get_states()
    assert set(restored) == set(saved)
    for name, value in saved.items():
        assert torch.equal(restored[name], value), name

    # Saved by another rank or layout (per tp rank): the run keeps its own tracker seeding.
    manager = CheckpointManager(CheckpointArgs(), run_dir)
    state_file = manager.path_of(3) / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["rng"]["place"] == "rank 0 of 1, None"
    state["rng"]["place"] = "rank 1 of 4, Layout(tp=2, pp=1, cp=1, dp=2, sequence_parallel=False)"
    torch.save(state, state_file)
    own = {"model-parallel-rng": torch.Generator().manual_seed(1).get_state()}
    megatron_tracker.set_states(dict(own))
    train(_cfg(data_dir, run_dir, "checkpoint.every=2", "train.steps=4"), resume=True)
    assert torch.equal(
        megatron_tracker.get_states()["model-parallel-rng"], own["model-parallel-rng"]
    )
