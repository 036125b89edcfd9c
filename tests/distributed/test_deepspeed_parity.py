"""DeepSpeed ZeRO 1 / 2 / 3 with context and tensor parallelism vs the single-process model.

pytest tests/distributed/test_deepspeed_parity.py          (about two minutes on 2 cores)

The tiny model of megatron_cases trains 3 AdamW steps (clipping active, the micro-batches of
each data-parallel rank accumulated by DeepSpeed) with train.deepspeed_engine.DeepSpeedEngine,
one spawn of gloo ranks per world size running several layouts in turn: DP2 (2 ranks) with
ZeRO 1, 2, 3; and on 4 ranks CP2 x DP2 (cp_sparse_attention over the cp group) and TP2 x DP2
(Megatron's tensor-parallel layers, vocab-parallel loss, DeepSpeed given our groups as its
mpu) with ZeRO 1, 2, 3, TP2 x CP2 (dp = 1) with ZeRO-2, and Megatron's sequence parallelism
on TP2 x DP2 (ZeRO-3) and TP2 x CP2 (ZeRO-1). The loss, gradient norm and token
count of every step, the validation loss and every final parameter (ZeRO-3 gathers the
partitions, tp the shards) must match LocalEngine on the same global batch within 1e-5 (fp32).
bf16 runs (DP2 ZeRO-2, TP2 x DP2 ZeRO-1) check the switch (bf16 parameters, fp32 master
weights, loss close). The refusals (pp, keys the trainer owns) need no processes.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tests.distributed import megatron_cases as mc
from tests.distributed.harness import run_ranks

TOL = 1e-5
CASE = mc.Case()
STAGES = (1, 2, 3)


def ds_rank(rank: int, world: int, runs: list[tuple]) -> list[dict]:
    """Each (parallel degrees, zero_stage, precision[, case]) in turn: 3 steps and one
    evaluation on these ranks (dp derived from the world size); the case is CASE unless given."""
    from parallel.layout import Layout
    from train.config import ParallelArgs
    from train.deepspeed_config import DeepSpeedArgs
    from train.deepspeed_engine import DeepSpeedEngine

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed asserts a launcher set it

    out = []
    for degrees, stage, precision, *given in runs:
        case = given[0] if given else CASE
        layout = Layout.create(
            ParallelArgs(**degrees), world, case.model_args(), case.attn_cfg(), case.seq_len
        )
        groups = layout.initialize()
        try:
            per_dp = case.micro_batches // layout.dp
            engine = DeepSpeedEngine(
                case.model_args(),
                case.attn_cfg(),
                layout,
                groups,
                dataclasses.replace(mc.OPTIM, precision=precision),
                mc.SCHEDULE,
                DeepSpeedArgs(zero_stage=stage),
                micro_batches=per_dp,
                micro_batch_size=case.micro_batch_size,
                total_steps=mc.STEPS,
                seed=mc.SEED,
            )
            lo = groups.dp_rank * per_dp
            stats = [
                engine.train_step(mc.batches(case, s)[lo : lo + per_dp], s) for s in range(mc.STEPS)
            ]
            val = engine.eval_step(mc.batches(case, mc.STEPS)[groups.dp_rank])
            dtypes = {p.dtype for p in engine.model.parameters()}
            out.append(
                {
                    "losses": [s.loss for s in stats],
                    "grad_norms": [s.grad_norm for s in stats],
                    "n_tokens": [s.n_tokens for s in stats],
                    "val": val,
                    "params": engine.full_parameters(),
                    "dtypes": dtypes,
                }
            )
            engine.ds.destroy()
        finally:
            Layout.destroy()
    return out


def _mismatches(results: list[dict], ref: dict, dp: int, where: str, tol: float) -> list[str]:
    bad = []
    for rank, res in enumerate(results):
        for key in ("losses", "grad_norms"):
            err = max(abs(a - b) for a, b in zip(res[key], ref[key], strict=True))
            if not err <= tol:
                bad.append(f"{where} rank {rank} {key}: error {err:.2e}")
        if res["n_tokens"] != ref["n_tokens"]:
            bad.append(f"{where} n_tokens {res['n_tokens']} != {ref['n_tokens']}")
        val_sum = sum(v[0] for v in ref["val"][:dp])
        val_tokens = sum(v[1] for v in ref["val"][:dp])
        if res["val"][1] != val_tokens or not abs(res["val"][0] - val_sum) <= tol * val_sum:
            bad.append(f"{where} eval {res['val']} != {(val_sum, val_tokens)}")
        for name, value in ref["params"].items():
            err = (res["params"][name] - value).abs().max().item()
            if not err <= tol:
                bad.append(f"{where} rank {rank} parameter {name}: error {err:.2e}")
    return bad


DP2 = [({}, stage, "fp32") for stage in STAGES] + [({}, 2, "bf16")]
FOUR_RANKS = (
    [({"cp": 2}, stage, "fp32") for stage in STAGES]
    + [({"tp": 2}, stage, "fp32") for stage in STAGES]
    + [({"tp": 2, "cp": 2}, 2, "fp32"), ({"tp": 2}, 1, "bf16")]
    + [({"tp": 2, "sequence_parallel": True}, 3, "fp32")]
    + [({"tp": 2, "cp": 2, "sequence_parallel": True}, 1, "fp32")]
)
ENCODER = [
    ({}, 3, "fp32", mc.ENCODER),  # ZeRO-3 partitions the biases, LayerNorms, frozen pooler
    ({"cp": 2}, 2, "fp32", mc.ENCODER),
    ({"tp": 2, "sequence_parallel": True}, 1, "fp32", mc.ENCODER),
]
"""The HF-shaped encoder (megatron_cases.ENCODER) on 2 ranks."""


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "world,runs", [(2, DP2), (4, FOUR_RANKS), (2, ENCODER)], ids=["dp2", "4ranks", "encoder"]
)
def test_zero_stages_match_single_process(world, runs, tmp_path):
    per_rank = run_ranks(ds_rank, world, tmp_path, args=(runs,), timeout=380)
    bad = []
    refs: dict[str, dict] = {}
    for i, (degrees, stage, precision, *given) in enumerate(runs):
        case = given[0] if given else CASE
        if repr(case) not in refs:
            refs[repr(case)] = mc.reference(case)
        ref = refs[repr(case)]
        results = [r[i] for r in per_rank]
        tp, cp = degrees.get("tp", 1), degrees.get("cp", 1)
        where = f"zero{stage} {precision} tp{tp} cp{cp} dp{world // (tp * cp)}"
        if precision == "fp32":
            bad += _mismatches(results, ref, world // (tp * cp), where, TOL)
        else:
            assert results[0]["dtypes"] == {torch.bfloat16}, where
            err = max(abs(a - b) for a, b in zip(results[0]["losses"], ref["losses"], strict=True))
            assert err < 0.05, (where, results[0]["losses"], ref["losses"])
    assert not bad, "\n".join(bad)


def test_deepspeed_refuses_pp_and_owned_keys():
    from train.deepspeed_config import DeepSpeedArgs, deepspeed_refusal

    assert "parallel.pp=2" in (deepspeed_refusal(2) or "")
    assert deepspeed_refusal(1) is None
    with pytest.raises(ValueError, match="deepspeed.config.gradient_clipping.*optim.grad_clip"):
        DeepSpeedArgs(config={"gradient_clipping": 1.0})
    with pytest.raises(ValueError, match="deepspeed.zero_stage=4"):
        DeepSpeedArgs(zero_stage=4)
    with pytest.raises(ValueError, match="contradicts"):
        DeepSpeedArgs(zero_stage=1, config={"zero_optimization": {"stage": 3}})
