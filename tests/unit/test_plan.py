"""The layout planner (parallel.plan, python -m train.plan): its parts on one process.

The per-layer activation count is checked against the tensors autograd really keeps (saved-
tensor hooks on a forward of one block) for several patterns of the decoder and the encoder,
and a whole model's forward against the layers plus its embeddings and head; the whole
estimate against the peak memory of real training runs is tests/distributed/test_plan_memory.py.

    python -m pytest -q tests/unit/test_plan.py
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from model.registry import build_model
from model.sparse import SparsityConfig
from model.transformer import ModelArgs, Transformer
from parallel.layout import Layout, check_split
from parallel.plan import (
    TRAFFIC_KINDS,
    Workload,
    candidate_layouts,
    end_activation_bytes,
    estimate_memory,
    layer_activation_bytes,
    plan_layouts,
    rank_memory,
    stage_parameters,
    step_traffic,
)
from train.config import load_config
from train.plan import main

MODEL = ModelArgs(vocab_size=500, d_model=64, n_layers=4, n_heads=4)
CAUSAL = SparsityConfig(
    block_size=32, window_blocks=3, global_blocks=1, random_blocks=2, causal=True
)
ENCODER = ModelArgs(
    arch="encoder", vocab_size=500, d_model=64, n_layers=4, n_heads=4, mlp="gelu",
    max_positions=1026, position_offset=2, type_vocab_size=1, pooler=True,
)  # fmt: skip
BIGBIRD = SparsityConfig(block_size=32, window_blocks=3, global_blocks=2, random_blocks=3)


def _saved_bytes(net: torch.nn.Module, forward) -> int:
    """Bytes of the distinct storages (not parameters) autograd keeps for the backward of
    `forward()`."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def _saved_bytes_of_one_block(model: ModelArgs, attention: SparsityConfig, batch: int, n: int):
    """Bytes of the distinct storages autograd keeps for block 0's backward."""
    net = build_model(model, attention)
    x = torch.randn(batch, n, model.d_model, requires_grad=True)
    positions = torch.arange(n).expand(batch, n)
    return _saved_bytes(net, lambda: net.blocks[0](x, positions, 0, None))


@pytest.mark.parametrize(
    "model, attention",
    [
        (MODEL, CAUSAL),
        (MODEL, SparsityConfig(block_size=32, window_blocks=3, random_blocks=2, causal=True)),
        (MODEL, SparsityConfig(block_size=32, window_blocks=3, global_blocks=2, random_blocks=3)),
        (ModelArgs(vocab_size=500, d_model=64, n_heads=4, mlp="gelu"), CAUSAL),
        (MODEL, SparsityConfig(block_size=32, window_blocks=5, global_blocks=2,
                               global_projections=True)),
        (ENCODER, BIGBIRD),
        (ENCODER, SparsityConfig(block_size=32, window_blocks=3, random_blocks=2)),
        (replace(ENCODER, mlp="gelu_tanh"),
         SparsityConfig(block_size=32, window_tokens=128, global_blocks=1,
                        global_projections=True)),
        (ENCODER, SparsityConfig(block_size=32, window_tokens=128, global_projections=True)),
    ],
    ids=["causal demo pattern", "no global", "bigbird", "gelu", "global projections",
         "encoder bigbird", "encoder no global", "encoder longformer",
         "encoder projections unused"],
)  # fmt: skip
def test_layer_activations_are_what_autograd_keeps(model, attention):
    measured = _saved_bytes_of_one_block(model, attention, batch=2, n=1024)
    estimate = layer_activation_bytes(model, attention, Workload(1024, 2), Layout())
    assert estimate == pytest.approx(measured, rel=0.03), (estimate, measured)


@pytest.mark.parametrize(
    "model, attention", [(MODEL, CAUSAL), (ENCODER, BIGBIRD)], ids=["decoder", "encoder"]
)
def test_a_model_keeps_its_layers_embeddings_and_head(model, attention):
    """The whole single-process forward: every layer, plus what the embeddings (the encoder's
    sum and LayerNorm) and the head (final norm, or the MLM head) keep; the logits are the
    loss's."""
    model = replace(model, n_layers=2)
    net = build_model(model, attention)
    tokens = torch.randint(0, model.vocab_size, (2, 512))
    positions = torch.arange(512).expand(2, 512)
    measured = _saved_bytes(net, lambda: net(tokens, positions))
    work, layout = Workload(512, 2), Layout()
    layers = sum(layer_activation_bytes(model, attention, work, layout, 0, i) for i in range(2))
    estimate = layers + end_activation_bytes(model, work, layout, first=True, last=True)
    assert estimate == pytest.approx(measured, rel=0.03), (estimate, measured)


def test_parameters_per_rank_add_up_to_the_model():
    whole = Transformer(MODEL, CAUSAL).num_params()
    assert stage_parameters(MODEL, CAUSAL, Layout(), 0, padded=False) == whole
    # Megatron's engine pads the vocabulary to 512 rows, and the last stage of a pipeline
    # holds a copy of the tied embedding.
    padding = (512 - MODEL.vocab_size) * MODEL.d_model
    assert stage_parameters(MODEL, CAUSAL, Layout(), 0) == whole + padding
    pp2 = Layout(pp=2)
    embed = MODEL.vocab_size * MODEL.d_model
    stages = [stage_parameters(MODEL, CAUSAL, pp2, s) for s in range(2)]
    assert sum(stages) == whole + embed + 2 * padding
    tp2 = stage_parameters(MODEL, CAUSAL, Layout(tp=2), 0)
    norms = (2 * MODEL.n_layers + 1) * MODEL.d_model  # replicated on every tp rank
    assert tp2 == (whole + padding - norms) // 2 + norms


def test_encoder_parameters_split_as_the_tp_plan_says():
    """The encoder's biases, learned positions, token types, LayerNorms, MLM-head dense and the
    frozen pooler, split per stage and over tp by hand (model/encoder.py, parallel/tp_plan.py)."""
    d, layers, vocab = ENCODER.d_model, ENCODER.n_layers, ENCODER.vocab_size
    whole = build_model(ENCODER, BIGBIRD).num_params()
    pooler = d * d + d
    assert stage_parameters(ENCODER, BIGBIRD, Layout(), 0, padded=False) == whole
    assert stage_parameters(ENCODER, BIGBIRD, Layout(), 0, False, trainable=True) == whole - pooler
    padding = (512 - vocab) * (d + 1)  # the embedding's rows and the LM head's bias
    assert stage_parameters(ENCODER, BIGBIRD, Layout(), 0) == whole + padding
    # Replicated over tp: positions, token type, the embedding LayerNorm; per layer two
    # LayerNorms and the row layers' biases (attention out, MLP down); the MLM head's dense and
    # LayerNorm; the pooler. Everything else (QKV and MLP-in with their biases, the attention
    # out and MLP-down weights, the vocabulary) is halved.
    replicated = (ENCODER.max_positions + 1 + 2) * d + layers * 6 * d + d * d + 3 * d + pooler
    tp2 = stage_parameters(ENCODER, BIGBIRD, Layout(tp=2), 0)
    assert tp2 == (whole + padding - replicated) // 2 + replicated
    # pp2: the embeddings first; the MLM head, the LM head's bias, the pooler and a copy of the
    # tied embedding last.
    pp2 = Layout(pp=2)
    first, last = (stage_parameters(ENCODER, BIGBIRD, pp2, s) for s in range(2))
    assert first + last == whole + padding + 512 * d
    blocks = first - (512 + ENCODER.max_positions + 1 + 2) * d  # two blocks a stage
    assert last == blocks + (d * d + 3 * d) + 512 * (d + 1) + pooler
    # The frozen pooler has neither a gradient nor optimizer state.
    work = Workload(1024, 2, local_engine=False)
    memory = rank_memory(ENCODER, BIGBIRD, work, Layout(), 0)
    params = stage_parameters(ENCODER, BIGBIRD, Layout(), 0)
    assert memory.params == 4 * params and memory.grads == 4 * (params - pooler)
    assert memory.optimizer == 8 * (params - pooler)


def test_memory_scales_as_the_layout_splits_it():
    work = Workload(1024, 2, grad_accum=4, local_engine=False)  # Megatron's engine on 1 rank
    one = estimate_memory(MODEL, CAUSAL, work, Layout())
    dp4 = estimate_memory(MODEL, CAUSAL, work, Layout(dp=4))
    assert dp4.params == one.params and dp4.optimizer == -(-one.optimizer // 4)
    cp4 = estimate_memory(MODEL, CAUSAL, work, Layout(cp=4))
    assert cp4.activations < 0.5 * one.activations  # a quarter of the tokens, plus buffers
    tp2 = estimate_memory(MODEL, CAUSAL, work, Layout(tp=2))
    assert tp2.params < 0.6 * one.params and tp2.activations < one.activations
    # 1F1B: the first stage keeps pp micro-batches in flight, the last one.
    pp4 = Layout(pp=4)
    first, last = (rank_memory(MODEL, CAUSAL, work, pp4, s) for s in (0, 3))
    per_stage = layer_activation_bytes(MODEL, CAUSAL, work, pp4)  # one layer per stage
    assert first.activations > 4 * per_stage > last.activations - per_stage
    recompute = replace(MODEL, recompute=True)
    assert estimate_memory(recompute, CAUSAL, work, Layout()).activations < one.activations
    bf16 = estimate_memory(MODEL, CAUSAL, replace(work, precision="bf16"), Layout())
    assert bf16.params == one.params // 2 and bf16.optimizer == one.optimizer * 3 // 2


def test_traffic_by_kind():
    work = Workload(1024, 2, grad_accum=2)
    assert set(step_traffic(MODEL, CAUSAL, work, Layout())) == set(TRAFFIC_KINDS)
    assert not any(step_traffic(MODEL, CAUSAL, work, Layout()).values())
    tp2 = step_traffic(MODEL, CAUSAL, work, Layout(tp=2))
    # 4 layers x (2 forward + 2 backward) + embedding + LM head all-reduces of T x d fp32
    # (a 2-rank all-reduce sends the buffer once), the loss's 3 of T floats, 2 micro-batches.
    tokens = 2 * 1024
    assert tp2["tp"] == 2 * ((4 * 4 + 2) * tokens * 64 * 4 + 3 * tokens * 4)
    assert set(k for k, v in tp2.items() if v) == {"tp"}
    dp2 = step_traffic(MODEL, CAUSAL, work, Layout(dp=2))
    params = stage_parameters(MODEL, CAUSAL, Layout(dp=2), 0)
    assert dp2["dp"] == params * 4 // 2 * 2  # reduce-scatter grads + all-gather params
    cp2 = step_traffic(MODEL, CAUSAL, work, Layout(cp=2))
    assert cp2["cp_halo"] > 0 and cp2["cp_global"] > 0 and cp2["cp_random"] > 0
    pooled = replace(CAUSAL, random_pool_blocks=4)
    assert step_traffic(MODEL, pooled, work, Layout(cp=2))["cp_random"] < cp2["cp_random"]
    pp4 = step_traffic(MODEL, CAUSAL, work, Layout(pp=4))
    assert pp4["pp"] > 2 * 2 * tokens * 64 * 4  # two sends per micro-batch + the embedding


def test_encoder_tp_traffic_with_sequence_parallelism():
    """Sequence parallelism sends what the plain all-reduces send, except that the encoder's
    embedding all-reduces whole and the split's backward all-gathers (Megatron's rule for
    embeddings summed before the split), and the gradients of the replicated parameters that
    see one shard are summed over tp once per step."""
    work = Workload(1024, 2, grad_accum=2)
    tokens, d = 2 * 1024, ENCODER.d_model
    plain = step_traffic(ENCODER, BIGBIRD, work, Layout(tp=2))["tp"]
    assert plain == 2 * ((4 * 4 + 2) * tokens * d * 4 + 3 * tokens * 4)
    sp = step_traffic(ENCODER, BIGBIRD, replace(work, sequence_parallel=True), Layout(tp=2))
    # LayerNorms (embedding, 2 a layer, head), row biases (2 a layer), the head's dense; not the
    # positions and token type (they see the whole sequence) nor the frozen pooler.
    shard_params = 2 * d + 4 * (4 * d + 2 * d) + d * d + d + 2 * d
    assert sp["tp"] == plain + 2 * tokens * d * 4 // 2 + shard_params * 4
    decoder = step_traffic(MODEL, CAUSAL, replace(work, sequence_parallel=True), Layout(tp=2))
    norms = (2 * 4 + 1) * MODEL.d_model  # the decoder's embedding reduce-scatters
    assert decoder["tp"] == step_traffic(MODEL, CAUSAL, work, Layout(tp=2))["tp"] + norms * 4


def test_candidates_follow_the_split_rules():
    work = Workload(1024, 2)
    layouts, refused = candidate_layouts(MODEL, CAUSAL, work, 8)
    assert layouts and all(lay.world_size == 8 for lay in layouts)
    for lay in layouts:
        check_split(lay.tp, lay.pp, lay.cp, lay.sequence_parallel, MODEL, CAUSAL, 1024)
    assert any("parallel.tp=8 must divide model.n_heads=4" in r for r in refused)
    assert any("parallel.pp=8 must divide model.n_layers=4" in r for r in refused)
    seq_parallel = Workload(1024, 2, sequence_parallel=True)
    for lay in candidate_layouts(MODEL, CAUSAL, seq_parallel, 4)[0]:
        assert lay.sequence_parallel == (lay.tp > 1)


def test_fitting_layouts_come_first_then_by_traffic_or_memory():
    work = Workload(1024, 2, grad_accum=4)
    sizes = sorted(estimate_memory(MODEL, CAUSAL, work, lay).total for lay in
                   candidate_layouts(MODEL, CAUSAL, work, 4)[0])  # fmt: skip
    budget = sizes[len(sizes) // 2]  # about half fit
    plans = plan_layouts(MODEL, CAUSAL, work, 4, budget, headroom=0.0)
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True) and 0 < sum(fits) < len(plans)
    for p in plans:
        assert p.fits == (p.memory.total <= budget)
    by_traffic = [p.traffic_total for p in plans if p.fits]
    assert by_traffic == sorted(by_traffic)
    by_memory = plan_layouts(MODEL, CAUSAL, work, 4, budget, headroom=0.0, sort="memory")
    totals = [p.memory.total for p in by_memory if p.fits]
    assert totals == sorted(totals)
    pp4 = next(p for p in plans if p.layout.pp == 4)
    assert pp4.bubble == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="--sort"):
        plan_layouts(MODEL, CAUSAL, work, 4, budget, sort="speed")


def test_cli_lists_the_demo_layouts(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["--config", "configs/demo.yaml", "--gpus", "4", "--gpu-memory", "0.3"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tp  pp  cp  dp  fits" in text and "layouts fit" in text
    plans = json.loads(out.read_text())
    assert {(p["tp"], p["pp"], p["cp"], p["dp"]) for p in plans} >= {(2, 1, 2, 1), (1, 2, 1, 2)}
    assert all(p["tp"] * p["pp"] * p["cp"] * p["dp"] == 4 for p in plans)
    assert [p["fits"] for p in plans] == sorted((p["fits"] for p in plans), reverse=True)
    assert main([*args, "--top", "2", "train.seq_len=4096"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if "MiB" in ln]) == 2
    assert main(["--config", "configs/demo.yaml", "--gpus", "2", "--gpu-memory", "0"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["--config", "configs/demo.yaml", "--gpus", "2", "--gpu-memory", "8",
                 "model.n_layer=3"]) == 2  # fmt: skip
    assert "unknown config key" in capsys.readouterr().err


def test_layers_with_their_own_patterns_count_their_own_plans():
    """attention.layers: each layer's activations and cp traffic are its own pattern's."""
    work = Workload(1024, 2)
    wide = SparsityConfig(
        block_size=32, window_blocks=3, global_blocks=1, random_blocks=2, causal=True,
        layers=({"layers": "2:", "window_blocks": 9, "random_blocks": 0},),
    )  # fmt: skip
    plain = wide.for_layer(0, MODEL.n_layers)
    other = wide.for_layer(3, MODEL.n_layers)
    assert other.window_blocks == 9 and plain == CAUSAL
    cp2 = Layout(cp=2)
    per_layer = [layer_activation_bytes(MODEL, wide, work, cp2, 1, layer) for layer in range(4)]
    assert per_layer[:2] == [layer_activation_bytes(MODEL, CAUSAL, work, cp2, 1, i) for i in (0, 1)]
    assert per_layer[2] == per_layer[3] != per_layer[0]  # a wider halo, no random buffer
    uniform = step_traffic(MODEL, CAUSAL, work, cp2)
    mixed = step_traffic(MODEL, wide, work, cp2)
    assert mixed["cp_halo"] > uniform["cp_halo"] and mixed["cp_random"] < uniform["cp_random"]
    whole = estimate_memory(MODEL, wide, work, cp2)
    assert whole.activations != estimate_memory(MODEL, CAUSAL, work, cp2).activations


def test_cli_plans_the_encoder(tmp_path, capsys):
    out = tmp_path / "plan.json"
    encoder = ["model.arch=encoder", "model.mlp=gelu", "model.max_positions=2048",
               "model.pooler=true", "attention.causal=false", "data.objective=mlm"]  # fmt: skip
    args = ["--config", "configs/demo.yaml", "--gpus", "4", "--gpu-memory", "1"]
    assert main([*args, "--json", str(out), *encoder]) == 0
    assert "model.arch encoder" in capsys.readouterr().out
    cfg = load_config("configs/demo.yaml", encoder)
    plans = {(p["tp"], p["pp"], p["cp"], p["dp"]): p for p in json.loads(out.read_text())}
    params = stage_parameters(cfg.model, cfg.attention, Layout(dp=4), 0)  # with the pooler
    assert plans[1, 1, 1, 4]["memory_bytes"]["params"] == 4 * params
    assert plans[1, 1, 1, 4]["memory_bytes"]["grads"] < 4 * params
