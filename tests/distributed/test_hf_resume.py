"""An imported HF run (python -m train.hf import: one process, step 0) resumes under a
parallel layout on the Megatron engine with the one-process resume's losses: a Llama under
tp=2 (slow), a Longformer (the encoder, with its window, global tokens and global
projections) under tp=2 with sequence parallelism and under cp=2 (slow too).

Two spawned gloo ranks run `train.loop.train` with the layout on a copy of the imported run
directory; the pytest process resumes another copy in one process (the reference).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.distributed.harness import run_ranks  # noqa: E402
from tests.hf_cases import import_run  # noqa: E402
from tests.unit.test_hf_llama import import_llama, make_llama  # noqa: E402

STEPS = 2


def _resume(run_dir: Path, layout: list[str]):
    from train.config import load_config
    from train.loop import train

    overrides = [f"train.run_dir={run_dir}", f"train.steps={STEPS}", *layout]
    return train(load_config(run_dir / "config.yaml", overrides), resume="yes")


def layout_rank(rank: int, world: int, imported: str, root: str, layout: list[str]) -> list[float]:
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1"
    )
    run_dir = Path(root) / "_".join(layout)
    if rank == 0:
        shutil.copytree(imported, run_dir)
    import torch.distributed as dist

    dist.barrier()
    result = _resume(run_dir, layout)
    assert result.start_step == 0
    return result.losses


@pytest.mark.slow  # one-process resume of an import + resharding a one-process checkpoint
@pytest.mark.timeout(300)  # under tp2 x cp2 (test_checkpoint_reshard) are in make test
def test_an_imported_run_resumes_under_tp2_with_the_one_process_loss(tiny_prepared_data, tmp_path):
    hf_dir = make_llama(tmp_path / "hf")
    imported = tmp_path / "imported"
    assert import_llama(hf_dir, imported, tiny_prepared_data) == 0
    one_dir = tmp_path / "one"
    shutil.copytree(imported, one_dir)
    one = _resume(one_dir, []).losses
    args = (str(imported), str(tmp_path), ["parallel.tp=2"])
    (tp2, _) = run_ranks(layout_rank, world=2, args=args, timeout=240)
    assert len(one) == len(tp2) == STEPS and all(math.isfinite(x) for x in one + tp2)
    print(f"resumed losses: one process {one}, tp=2 {tp2}")
    assert abs(tp2[0] - one[0]) < 1e-5, (tp2, one)


@pytest.mark.timeout(300)
@pytest.mark.slow  # make bench: the encoder's parity runs (tp2 + SP, cp2, a dp2 resume through
@pytest.mark.parametrize(  # a model-space checkpoint) and the Longformer's resume are in make test
    "layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.cp=2"]]
)
def test_an_imported_longformer_resumes_under_a_layout_with_the_one_process_losses(
    layout, tiny_mlm_data, tmp_path
):
    from tests.unit.test_hf_encoder import ENCODER_RUN, make_hf

    hf_dir = make_hf("longformer", tmp_path / "hf")
    imported = tmp_path / "imported"
    assert import_run(hf_dir, imported, tiny_mlm_data, *ENCODER_RUN) == 0
    one_dir = tmp_path / "one"
    shutil.copytree(imported, one_dir)
    one = _resume(one_dir, []).losses
    args = (str(imported), str(tmp_path), layout)
    (split, _) = run_ranks(layout_rank, world=2, args=args, timeout=240)
    assert len(one) == len(split) == STEPS and all(math.isfinite(x) for x in one + split)
    print(f"resumed MLM losses: one process {one}, {layout} {split}")
    for a, b in zip(split, one, strict=True):
        assert abs(a - b) < 1e-5, (split, one)
