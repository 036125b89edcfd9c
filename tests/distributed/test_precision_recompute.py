"""bf16 mixed precision and activation recomputation in the engines, on gloo ranks.

pytest tests/distributed/test_precision_recompute.py   (about 50 s on 2 cores, plus about 50 s
                                                      for the 4-rank tp2 x cp2 run that
                                                      -m "not slow" skips)

All the Megatron runs share one spawn of 2 gloo ranks (module fixture `per_rank`).
- Recompute: a tp=2, a cp=2 and a pp=2 (1F1B) MegatronEngine step (the tiny causal model of
  megatron_cases) with `model.recompute` on gives the same losses, gradient norms, gradient
  buffers and updated weights as with it off (bit-identical: the recomputed forward is the same
  computation, the random-block draw depends on (seed, step, layer) only). The same for a
  tp2 x cp2 step on 4 ranks (marked slow).
- bf16: 10 steps of a dp=2 MegatronEngine (DistributedOptimizer) on a fixed batch in fp32 and in
  bf16: the bf16 loss is finite, falls, and stays within 2e-3 (relative) of the fp32 loss; the
  stage's parameters are bf16 and the optimizer's master weights fp32. A tp=2 run with
  Megatron's plain mixed-precision optimizer and recompute resumes exactly from its state_dict
  (the fp32 master weights travel with it).
  cp=2 and pp=2 bf16 steps (fp32 attention around the cp exchange, bf16 pipeline p2p) track
  their fp32 runs too.
- LocalEngine bf16 (autocast) tracks fp32; option validation.
"""

from __future__ import annotations

import math

import pytest
import torch

from model.transformer import Transformer
from tests.distributed import megatron_cases as mc
from tests.distributed.harness import run_ranks
from train.engine import LocalEngine, OptimArgs

BF16_REL_TOL = 2e-3  # measured: under 1e-4 (dp2 10 steps), 1e-5 (cp2, pp2)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


BF16_STEPS = 10
_BF16_TP = dict(
    degrees=dict(tp=2),
    case=mc.Case(recompute=True),
    precision="bf16",
    distributed_optimizer=False,
    steps=3,
    fixed_batch=True,
)
NAMED_RUNS = {
    # recompute off / on, two steps each: tensor-, context- and pipeline-parallel (1F1B)
    **{
        f"{dim}2{'_recompute' * r}": mc.Run({dim: 2}, mc.Case(recompute=r), steps=2)
        for dim in ("tp", "cp", "pp")
        for r in (False, True)
    },
    # bf16 through the cp exchanges and the pipeline's p2p (bf16 activations)
    "cp2_bf16": mc.Run(dict(cp=2), precision="bf16", steps=2),
    "pp2_bf16": mc.Run(dict(pp=2), precision="bf16", steps=2),
    # dp = 2 with the DistributedOptimizer, fp32 and bf16, on a fixed batch
    **{
        f"dp2_{p}": mc.Run(dict(), precision=p, steps=BF16_STEPS, fixed_batch=True)
        for p in ("fp32", "bf16")
    },
    # tp = 2, Megatron's plain mixed-precision optimizer, recompute; straight and resumed
    "tp2_bf16": mc.Run(**_BF16_TP),  # type: ignore[arg-type]
    "tp2_bf16_resumed": mc.Run(**_BF16_TP, resume_after=1),  # type: ignore[arg-type]
}


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict[str, dict]]:
    """Every run of NAMED_RUNS on one spawn of 2 gloo ranks (the start-up dominates); per
    rank, the results by run name."""
    runs = list(NAMED_RUNS.values())
    out = run_ranks(mc.parity_rank, 2, tmp_path_factory.mktemp("ranks"), args=(runs,), timeout=200)
    return [dict(zip(NAMED_RUNS, results, strict=True)) for results in out]


def _close_losses(losses: list[float], ref: list[float]) -> bool:
    return all(
        math.isfinite(lo) and abs(lo - r) <= BF16_REL_TOL * r
        for lo, r in zip(losses, ref, strict=True)
    )


@pytest.mark.timeout(240)
def test_recompute_matches_plain_tp2_cp2_pp2_megatron_steps(per_rank):
    for res in per_rank:
        for dim in ("tp", "cp", "pp"):
            plain, ckpt = res[f"{dim}2"], res[f"{dim}2_recompute"]
            assert ckpt["losses"] == plain["losses"], dim
            assert ckpt["grad_norms"] == plain["grad_norms"], dim
            assert _max_diff(ckpt["main_grads"], plain["main_grads"]) <= 1e-6, dim
            assert _max_diff(ckpt["shards"], plain["shards"]) <= 1e-6, dim


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_recompute_matches_plain_tp2xcp2_megatron_step_on_4_ranks(tmp_path):
    runs = [mc.Run(dict(tp=2, cp=2), mc.Case(recompute=r), steps=1) for r in (False, True)]
    for plain, ckpt in run_ranks(mc.parity_rank, 4, tmp_path, args=(runs,), timeout=200):
        assert ckpt["losses"] == plain["losses"]
        assert ckpt["grad_norms"] == plain["grad_norms"]
        assert _max_diff(ckpt["main_grads"], plain["main_grads"]) <= 1e-6
        assert _max_diff(ckpt["shards"], plain["shards"]) <= 1e-6


@pytest.mark.timeout(240)
def test_bf16_megatron_tracks_fp32_with_fp32_master_weights(per_rank):
    for res in per_rank:
        fp32, bf16 = res["dp2_fp32"], res["dp2_bf16"]
        assert fp32["param_dtypes"] == {torch.float32} and fp32["master_dtypes"] == set()
        for name in ("dp2_bf16", "tp2_bf16", "cp2_bf16", "pp2_bf16"):
            assert res[name]["param_dtypes"] == {torch.bfloat16}, name
            assert res[name]["master_dtypes"] == {torch.float32}, name
        losses = bf16["losses"]
        assert losses[-1] < losses[0] - 0.2, losses
        assert _close_losses(losses, fp32["losses"]), (losses, fp32["losses"])
        for dim in ("cp", "pp"):
            bf16_dim, fp32_dim = res[f"{dim}2_bf16"]["losses"], res[f"{dim}2"]["losses"]
            assert _close_losses(bf16_dim, fp32_dim), (dim, bf16_dim, fp32_dim)


@pytest.mark.timeout(240)
def test_bf16_megatron_resumes_exactly_with_its_master_weights(per_rank):
    for res in per_rank:
        tp, tp_resumed = res["tp2_bf16"], res["tp2_bf16_resumed"]
        assert tp_resumed["losses"] == tp["losses"]
        assert _max_diff(tp_resumed["shards"], tp["shards"]) == 0.0


def _local_losses(precision: str, steps: int = 3) -> list[float]:
    case = mc.Case(n_layers=1)
    model = Transformer(case.model_args(), case.attn_cfg(), seed=mc.SEED)
    optim = OptimArgs(lr=3e-3, weight_decay=0.1, grad_clip=1.0, precision=precision)
    engine = LocalEngine(model, optim, mc.SCHEDULE, total_steps=steps)
    batch = mc.batches(case, 0)[:2]
    losses = [engine.train_step(batch, s).loss for s in range(steps)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return losses


def test_local_engine_bf16_autocast_tracks_fp32():
    fp32, bf16 = _local_losses("fp32"), _local_losses("bf16")
    assert bf16 != fp32  # autocast did run the matmuls in bf16
    for lo, ref in zip(bf16, fp32, strict=True):
        assert math.isfinite(lo) and abs(lo - ref) <= BF16_REL_TOL * ref
    assert bf16[-1] < bf16[0]


def test_precision_must_be_fp32_or_bf16():
    assert OptimArgs(precision="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="optim.precision='fp16'"):
        OptimArgs(precision="fp16")
