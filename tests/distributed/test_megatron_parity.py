"""Megatron-core tp / pp / cp / dp training vs the single-process model, on gloo ranks.

pytest tests/distributed/test_megatron_parity.py    (about 70 s on 2 cores, plus about 2 minutes
                                                     for the 8-rank runs -m "not slow" skips)

Every layout trains the same tiny causal BigBird-style model (2 layers, d=32, 4 heads, seq 256,
block 16, vocab 250 padded to the tp multiple; in their own runs, a bidirectional BigBird encoder
on masked-LM batches with per-sample global marks, `mc.MLM`, and the HF-shaped encoder of
model.arch=encoder, `mc.ENCODER`) with MegatronEngine (Megatron DDP and
its DistributedOptimizer, or its plain optimizer) for 3 AdamW steps on the same global batch as
`LocalEngine` in this process, with gradient clipping active; some runs save the engine state mid-
way and continue in a new engine. Compared: the loss, the gradient norm and the token count of
every step, the validation loss after training and every final parameter (gathered from the tp / pp
shards; dp / cp replicas, the tied embedding's two pipeline copies and the tp ranks' copies of
every replicated parameter must agree exactly), within 1e-5 in fp32. Megatron's sequence parallelism
(`parallel.sequence_parallel`) runs with tp=2, tp2 x cp2, tp2 x pp2 and (slow, 8 ranks) tp2 x pp2 x
cp2; the tp2 and tp2 x pp2 runs use micro-batches of 2 sequences (the [b, n] <-> [n, b] transposes
around Megatron's layers) and recompute. Several layouts share one spawn of ranks (the groups are
rebuilt between them) to keep the process start-up cost low.

The unit checks at the end (weight slicing, CPU shims) need no processes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.transformer import Transformer
from parallel.megatron_shims import (
    SHIMMED_MODULES,
    CudaTypedParameter,
    apply_cpu_shims,
    cuda_typed_parameters,
)
from parallel.tensor_parallel import shard_param, unshard_param
from tests.distributed import megatron_cases as mc
from tests.distributed.harness import run_ranks

TOL = 1e-5
UNTIED = mc.Case(tie_embeddings=False)
SP_CASE = mc.Case(micro_batches=2, micro_batch_size=2, recompute=True)
"""Sequence parallelism on batches of two sequences, each block an activation checkpoint."""
SP = dict(sequence_parallel=True)


_REFERENCES: dict[str, dict] = {}


def _reference(case: mc.Case) -> dict:
    """The single-process run of `case`, computed once per session."""
    key = repr(case)
    if key not in _REFERENCES:
        _REFERENCES[key] = mc.reference(case)
    return _REFERENCES[key]


def _check(per_rank: list[list[dict]], runs: list[mc.Run]) -> list[str]:
    """Every mismatch (beyond TOL) of every run, as readable lines."""
    bad = []
    for i, run in enumerate(runs):
        ref = _reference(run.case)
        results = [r[i] for r in per_rank]
        where = f"{run.degrees} tied={run.case.tie_embeddings}"
        for res in results:
            for key in ("losses", "grad_norms"):
                err = max(abs(a - b) for a, b in zip(res[key], ref[key], strict=True))
                if not err <= TOL:
                    bad.append(f"{where} rank {res['coords']} {key}: error {err:.2e}")
            if res["n_tokens"] != ref["n_tokens"]:
                bad.append(f"{where} n_tokens {res['n_tokens']} != {ref['n_tokens']}")
            dp = 1 + max(r["coords"][3] for r in results)
            val_sum = sum(v[0] for v in ref["val"][:dp])
            val_tokens = sum(v[1] for v in ref["val"][:dp])
            if res["val"][1] != val_tokens or not abs(res["val"][0] - val_sum) <= TOL * val_sum:
                bad.append(f"{where} eval {res['val']} != {(val_sum, val_tokens)}")
        params = mc.assemble(results, run.case)
        if set(params) != set(ref["params"]):
            bad.append(f"{where} parameters {sorted(set(params) ^ set(ref['params']))} differ")
        for name, value in params.items():
            err = (value - ref["params"][name]).abs().max().item()
            if not err <= TOL:
                bad.append(f"{where} parameter {name}: error {err:.2e}")
    return bad


@pytest.mark.timeout(240)
def test_tp2_cp2_dp2_pp2_and_tp2_sequence_parallel_each_match_single_process(tmp_path):
    runs = [
        mc.Run(dict(tp=2)),
        mc.Run(dict(cp=2)),
        # dp = 2: the DistributedOptimizer shards AdamW over the two ranks; megatron-core gets
        # every group from the engine, none from its parallel_state globals.
        mc.Run(dict(), without_megatron_globals=True),
        mc.Run(dict(), distributed_optimizer=False, resume_after=1),
        # Megatron's 1F1B schedule; tied embedding on both stages; no globals.
        mc.Run(dict(pp=2), without_megatron_globals=True),
        mc.Run(dict(pp=2), UNTIED),
        mc.Run(dict(tp=2, **SP), SP_CASE),
    ]
    per_rank = run_ranks(mc.parity_rank, 2, tmp_path, args=(runs,), timeout=200)
    assert _check(per_rank, runs) == []


@pytest.mark.timeout(240)
def test_bidirectional_mlm_with_global_marks_matches_single_process(tmp_path):
    runs = [
        mc.Run(dict(tp=2), mc.MLM),
        mc.Run(dict(cp=2), mc.MLM),
        mc.Run(dict(), mc.MLM, resume_after=1),  # dp = 2, resumed mid-way
        mc.Run(dict(pp=2), mc.MLM),
        mc.Run(dict(tp=2), mc.MLM_GLOBAL_PROJECTIONS),  # qkv_global split like qkv
        mc.Run(dict(tp=2), mc.MLM_ETC),  # the ETC vectors replicated over tp
        mc.Run(dict(cp=2), mc.MLM_ETC),  # held by cp rank 0 only
        mc.Run(dict(pp=2), mc.MLM_ETC),  # on the first stage only
    ]
    per_rank = run_ranks(mc.parity_rank, 2, tmp_path, args=(runs,), timeout=200)
    assert _check(per_rank, runs) == []


@pytest.mark.timeout(300)
def test_hf_shaped_encoder_under_tp_cp_pp_dp_and_sequence_parallel_matches_single_process(
    tmp_path,
):
    """The encoder (model.arch=encoder) under every layout: biases split with their projection
    or whole after a row layer's reduction, the learned positions added before sequence
    parallelism splits the sum, the MLM head's dense and LayerNorms replicated, a frozen
    pooler."""
    enc_sp = dataclasses.replace(mc.ENCODER, micro_batches=2, micro_batch_size=2, recompute=True)
    runs = [
        mc.Run(dict(tp=2), mc.ENCODER),
        mc.Run(dict(cp=2), mc.ENCODER),
        mc.Run(dict(), mc.ENCODER, resume_after=1),  # dp = 2, resumed mid-way
        mc.Run(dict(pp=2), mc.ENCODER),
        mc.Run(dict(tp=2, **SP), enc_sp),
        mc.Run(dict(cp=2), mc.ENCODER_ETC),
    ]
    per_rank = run_ranks(mc.parity_rank, 2, tmp_path, args=(runs,), timeout=280)
    bad = _check(per_rank, runs)
    assert not bad, "\n".join(bad)


@pytest.mark.timeout(240)
def test_tp2xcp2_pp2xdp2_and_sequence_parallel_match_single_process(tmp_path):
    runs = [
        mc.Run(dict(tp=2, cp=2), without_megatron_globals=True),
        mc.Run(dict(pp=2)),  # dp = 2: the tied embedding's two copies, sharded alike
        mc.Run(dict(pp=2), UNTIED, resume_after=2),
        mc.Run(dict(tp=2, cp=2, **SP)),
        mc.Run(dict(tp=2, pp=2, **SP), SP_CASE),  # the pipeline sends [n/tp, b, c]
        # bidirectional, the global marks across cp ranks, Longformer's global projections
        mc.Run(dict(tp=2, cp=2), mc.MLM_GLOBAL_PROJECTIONS),
        mc.Run(dict(tp=2, cp=2, **SP), mc.ENCODER),  # positions added before the split
    ]
    per_rank = run_ranks(mc.parity_rank, 4, tmp_path, args=(runs,), timeout=200)
    assert _check(per_rank, runs) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2xpp2xcp2_on_8_ranks_matches_single_process(tmp_path):
    runs = [mc.Run(dict(tp=2, pp=2, cp=2)), mc.Run(dict(tp=2, pp=2, cp=2, **SP))]
    per_rank = run_ranks(mc.parity_rank, 8, tmp_path, args=(runs,), timeout=260)
    assert _check(per_rank, runs) == []


# ---- single-process checks -------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_shards_reassemble_to_the_single_process_weights(tp, mlp):
    case = mc.Case(n_layers=1)
    args = case.model_args()
    args.mlp = mlp
    model = Transformer(args, case.attn_cfg(), seed=1)
    for name, full in model.named_parameters(remove_duplicate=False):
        shards = [shard_param(name, full, r, tp, args) for r in range(tp)]
        torch.testing.assert_close(unshard_param(name, shards, args), full, rtol=0, atol=0)


def test_qkv_shard_holds_q_k_v_of_its_own_heads():
    case = mc.Case(n_layers=1)
    args = case.model_args()
    qkv = Transformer(args, case.attn_cfg(), seed=1).blocks[0].attn.qkv.weight.detach()
    full = qkv.view(3, args.n_heads, args.head_dim, args.d_model)
    shard = shard_param("blocks.0.attn.qkv.weight", qkv, 1, 2, args)
    local = shard.view(3, args.n_heads // 2, args.head_dim, args.d_model)
    torch.testing.assert_close(local, full[:, 2:], rtol=0, atol=0)


def test_vocab_rows_are_padded_with_zeros_to_the_tp_multiple():
    case = mc.Case(n_layers=1)
    args = case.model_args()
    embed = Transformer(args, case.attn_cfg(), seed=1).embed.weight
    shards = [shard_param("embed.weight", embed, r, 2, args) for r in range(2)]
    assert [s.shape[0] for s in shards] == [128, 128]
    assert torch.equal(shards[1][args.vocab_size - 128 :], torch.zeros(6, args.d_model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")
def test_cpu_shims_map_cuda_factories_and_queries_to_the_cpu():
    import importlib

    assert apply_cpu_shims() is True
    assert apply_cpu_shims() is True  # idempotent
    for name in SHIMMED_MODULES:
        shim = importlib.import_module(name).torch
        assert shim.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        assert shim.empty(3, device=shim.cuda.current_device()).device.type == "cpu"
        assert shim.cuda.synchronize() is None
        assert shim.Tensor is torch.Tensor  # everything else is the real torch
    assert torch.zeros(1).device.type == "cpu" and torch.zeros is not shim.zeros


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")
def test_cuda_typed_parameters_keep_data_attributes_and_sharing():
    lin = torch.nn.Linear(3, 2, bias=False)
    lin.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
    holder = torch.nn.Module()
    holder.a, holder.b = lin, torch.nn.Linear(3, 2, bias=False)
    holder.b.weight = lin.weight  # shared
    before = lin.weight.detach().clone()
    cuda_typed_parameters(holder)
    weight = holder.a.weight
    assert isinstance(weight, CudaTypedParameter) and holder.b.weight is weight
    assert weight.type() == "torch.cuda.FloatTensor" and weight.device.type == "cpu"
    assert weight.tensor_model_parallel and torch.equal(weight.detach(), before)
    assert weight.type(torch.float64).dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")
@pytest.mark.parametrize(("norm", "coeff"), [(2.0, 1.0 / (2.0 + 1e-6)), (0.5, 1.0)])
def test_cpu_gradient_clipping_follows_the_megatron_rule(norm, coeff):
    import megatron.core.optimizer.optimizer as megatron_optimizer

    apply_cpu_shims()
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    megatron_optimizer.clip_grad_by_total_norm_fp32([param], 1.0, norm)
    torch.testing.assert_close(param.grad, torch.full((3,), coeff), rtol=0, atol=1e-7)
