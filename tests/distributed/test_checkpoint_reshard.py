"""Sharded checkpoints of the real training loop: exact resume, resharding and export.

One spawn of 4 gloo ranks runs `train.loop.train` several times (the loop's own checkpoint
manager, data stream and Megatron engine):
- TP2xCP2 trains 4 steps uninterrupted, checkpointing step 2 and 4 (the reference);
- its step-2 checkpoint is resumed (a copy, in a fresh run directory) under TP2xCP2 again
  (exact: same losses, bit-identical final parameters and AdamW state), TP1xCP4, TP4 and
  PP2xTP2 (same losses within 1e-5);
- PP2xDP2 trains 4 steps, and resumes from its step 2 exactly;
- first (in the pytest process) the one-process LocalEngine trains 4 steps; its step-2
  checkpoint is resumed by the four ranks as TP2xCP2 (same losses within 1e-5);
- then rank 0 alone resumes the TP2xCP2 checkpoint in one process (the LocalEngine reads the
  Megatron engine's model-space state) and checks the LocalEngine's own exact resume.
The pytest process exports the reference's final checkpoint (train.export) and evaluates it in
a single-process Transformer: the same validation loss as the sharded run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_ranks
from tests.model_space import model_space
from tests.unit.test_train import TINY

STEPS, SAVED = 4, 2
# vocab 520 pads to 640 / 768 / 1024 rows for tp 1 / 2 / 4: resharding crosses paddings.
COMMON = [
    *TINY, "model.vocab_size=520", "train.eval_every=0", "logging.wandb_mode=disabled",
    f"train.steps={STEPS}", f"checkpoint.every={SAVED}", "checkpoint.keep_last=0",
]  # fmt: skip
RESHARD = {
    "tp1cp4": ["parallel.tp=1", "parallel.cp=4"],
    "tp4": ["parallel.tp=4"],
    "pp2tp2": ["parallel.pp=2", "parallel.tp=2"],
}


def _train(data: str, run_dir: Path, layout: list[str], resume: str = "no"):
    from train.config import load_config
    from train.loop import train

    cfg = load_config(None, [*COMMON, f"data.path={data}", f"train.run_dir={run_dir}", *layout])
    return train(cfg, resume=resume)


def _copy_step(src: Path, dst: Path, step: int) -> None:
    """A fresh run directory holding only checkpoint `step` of `src` (rank 0 copies)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        name = f"step_{step:06d}"
        shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
        (dst / "checkpoints" / "latest").write_text(name + "\n")
    if dist.is_initialized():
        dist.barrier()


def reshard_rank(rank: int, world: int, data: str, root: str) -> dict:
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1"
    )
    root_dir = Path(root)
    out: dict = {}
    # The one-process run the pytest process trained (`runs`), resumed as TP2xCP2.
    _copy_step(root_dir / "local", root_dir / "from_local", SAVED)
    tp2cp2 = ["parallel.tp=2", "parallel.cp=2"]
    from_local = _train(data, root_dir / "from_local", tp2cp2, resume="yes")
    out["from_local"] = (from_local.start_step, from_local.losses)
    ref = _train(data, root_dir / "ref", tp2cp2)
    out["ref"] = ref.losses
    out["ref_val"] = ref.val_loss
    for name, layout in {"tp2cp2": ["parallel.tp=2", "parallel.cp=2"], **RESHARD}.items():
        _copy_step(root_dir / "ref", root_dir / name, SAVED)
        result = _train(data, root_dir / name, layout, resume="yes")
        out[name] = (result.start_step, result.losses)
    pp = ["parallel.pp=2", "parallel.dp=2"]
    out["pp2dp2"] = _train(data, root_dir / "pp2dp2", pp).losses
    _copy_step(root_dir / "pp2dp2", root_dir / "pp2dp2_resumed", SAVED)
    out["pp2dp2_resumed"] = _train(data, root_dir / "pp2dp2_resumed", pp, resume="yes").losses
    if rank != 0:
        return out
    # One process: the loop makes its own process group.
    dist.destroy_process_group()
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    _copy_step(root_dir / "ref", root_dir / "one", SAVED)
    one = _train(data, root_dir / "one", [], resume="yes")
    out["one"] = (one.start_step, one.losses)
    _copy_step(root_dir / "local", root_dir / "local_resumed", SAVED)
    out["local_resumed"] = _train(data, root_dir / "local_resumed", [], resume="yes").losses
    return out


def _model_space(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor (parameters and AdamW moments) of a checkpoint, consolidated."""
    return model_space(run_dir / "checkpoints" / f"step_{step:06d}")


@pytest.fixture(scope="module")
def runs(tiny_prepared_data, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("reshard")
    local = _train(str(tiny_prepared_data), root / "local", []).losses  # one process, here
    results = run_ranks(
        reshard_rank, world=4, args=(str(tiny_prepared_data), str(root)), timeout=900
    )
    return {**results[0], "local": local}, root


@pytest.mark.timeout(1000)
def test_tp2cp2_resumes_exactly_and_reshards_to_other_layouts(runs):
    got, root = runs
    ref = got["ref"]
    assert len(ref) == STEPS and ref[-1] < ref[0]
    start, losses = got["tp2cp2"]
    assert start == SAVED and losses == ref  # exact: same floats
    want, same = _model_space(root / "ref", STEPS), _model_space(root / "tp2cp2", STEPS)
    assert want.keys() == same.keys() and any(k.startswith("optim.exp_avg.") for k in want)
    for key, tensor in want.items():
        assert torch.equal(tensor, same[key]), key
    for name in [*RESHARD, "one"]:
        start, losses = got[name]
        assert start == SAVED and losses[:SAVED] == ref[:SAVED]
        err = max(abs(a - b) for a, b in zip(losses[SAVED:], ref[SAVED:], strict=True))
        assert err < 1e-5, (name, losses, ref)
    assert (root / "one" / "checkpoints" / "step_000004" / "engine.tensors").is_dir()


def test_a_one_process_checkpoint_resumes_under_tp2cp2(runs):
    got, _ = runs
    local = got["local"]
    assert len(local) == STEPS and local[-1] < local[0]
    start, losses = got["from_local"]
    assert start == SAVED and losses[:SAVED] == local[:SAVED]
    err = max(abs(a - b) for a, b in zip(losses[SAVED:], local[SAVED:], strict=True))
    assert err < 1e-5, (losses, local)


def test_pp2dp2_and_one_process_resume_exactly(runs):
    got, root = runs
    assert got["pp2dp2_resumed"] == got["pp2dp2"]
    want, same = _model_space(root / "pp2dp2", STEPS), _model_space(root / "pp2dp2_resumed", STEPS)
    for key, tensor in want.items():
        assert torch.equal(tensor, same[key]), key
    assert got["local_resumed"] == got["local"]
    local, resumed = (
        _model_space(root / "local", STEPS),
        _model_space(root / "local_resumed", STEPS),
    )
    for key, tensor in local.items():
        assert torch.equal(tensor, resumed[key]), key


def test_export_gives_the_sharded_runs_eval_loss(runs, tiny_prepared_data, tmp_path, capsys):
    from data.loader import build_val_batches
    from model.sparse import sparse_attention
    from model.transformer import Transformer
    from train.config import load_config
    from train.engine import LocalEngine
    from train.evaluate import evaluate
    from train.export import main

    got, root = runs
    out = tmp_path / "model.pt"
    assert main(["--checkpoint", str(root / "ref"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = load_config(None, [*COMMON, f"data.path={tiny_prepared_data}"])
    model = Transformer(cfg.model, cfg.attention, attention_fn=sparse_attention)
    model.load_state_dict(torch.load(out, weights_only=True))
    engine = LocalEngine(model, cfg.optim, cfg.schedule, cfg.train.steps)
    t = cfg.train
    val = evaluate(
        engine, build_val_batches(cfg.data, t.seq_len, t.micro_batch_size, t.eval_batches)
    )
    assert abs(val - got["ref_val"]) < 1e-5, (val, got["ref_val"])


def test_export_refuses_missing_or_incomplete_checkpoints(runs, tmp_path, capsys):
    from train.export import main

    _, root = runs
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    broken = tmp_path / "broken" / "checkpoints" / "step_000002"
    shutil.copytree(root / "ref" / "checkpoints" / "step_000002", broken)
    (broken / "engine.tensors" / ".metadata").unlink()
    assert main(["--checkpoint", str(broken), "--out", str(tmp_path / "m.pt")]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_other_world_sizes_are_refused_without_model_space_tensors(tmp_path, caplog):
    from train.checkpoint import CheckpointArgs, CheckpointManager

    args = CheckpointArgs(async_save=True)
    two = CheckpointManager(args, tmp_path, rank=0, world=2)
    with caplog.at_level("INFO", logger="train.checkpoint"):
        two.save(1, {"w": torch.ones(2)}, {"model": {}}, meta={"engine": "deepspeed"})
        assert two.complete_steps() == [1]  # no sharded tensors: saved synchronously
        two.save(2, {"w": torch.ones(2)}, {"model": {}}, meta={"engine": "deepspeed"})
    note = (
        "checkpoint.async_save=true: the deepspeed engine's checkpoints have no sharded tensors "
        "(only train.engine=megatron's do); saving synchronously"
    )
    assert caplog.messages.count(note) == 1
    assert two.complete_steps() == [1, 2] and two.saved_engine() == "deepspeed"
    with pytest.raises(ValueError, match="by the deepspeed engine by 2 processes; this run has 1"):
        CheckpointManager(CheckpointArgs(), tmp_path).load_latest()
