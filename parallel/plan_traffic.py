"""The layout planner's traffic model (parallel.plan): bytes one rank sends per optimizer step.

    from parallel.plan_traffic import step_traffic
    traffic = step_traffic(cfg.model, cfg.attention, work, Layout(tp=2, cp=2))  # bytes by kind

Traffic (bytes one rank sends per optimizer step, the most loaded rank of each kind; ring
collectives: an all-reduce of S bytes sends 2 (n-1)/n S per rank, reduce-scatter and
all-gather (n-1)/n S; activations of 4 or 2 bytes):
- tp: per layer and micro-batch two all-reduces of T x d forward (attention and MLP outputs)
  and two backward (the inputs' gradients of the qkv and up projections; a third with global
  projections), again forward under recompute; the embedding's output forward (first stage)
  and the LM head input's gradient backward and the vocab-parallel cross entropy's three of
  T floats (last stage); the busier stage. Sequence parallelism replaces each all-reduce by
  an all-gather and a reduce-scatter: the same bytes, except the encoder's embedding
  (ModelBase.sums_embeddings: Megatron's rule for embeddings summed before the split), which
  all-reduces whole forward and whose split all-gathers the gradient backward (1.5 times an
  all-reduce); and once per step the fp32 gradients of the replicated parameters that see a
  sequence shard (norms, row layers' biases, the MLM head's dense) are all-reduced.
- pp: each micro-batch's stage output forward and its gradient backward (T x d; / tp with
  sequence parallelism): a middle stage sends both, the first and last one each; the tied
  embedding's gradient all-reduce between the first and last stage once per step (fp32).
- cp: per layer and micro-batch parallel.show.forward_bytes forward (halo, global rows and
  merge, random or pool) and, backward, the gradients of what the rank received (the
  reverse exchange), forward again under recompute.
- dp: the distributed optimizer's reduce-scatter of the fp32 gradients and all-gather of the
  parameters that train over the dp x cp ranks, once per step (zero with one such rank).
"""

from __future__ import annotations

from functools import lru_cache

from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from parallel.cp_plan import rank_plan
from parallel.layout import Layout
from parallel.plan_memory import (
    Workload,
    built_model,
    global_count,
    layer_groups,
    sequence_parallel_params,
    sequence_shards,
    stage_parameters,
)
from parallel.show import forward_bytes
from parallel.traffic import all_gather_bytes, all_reduce_bytes

__all__ = ["TRAFFIC_KINDS", "cp_traffic_by_rank", "step_traffic"]

TRAFFIC_KINDS = ("tp", "pp", "cp_halo", "cp_global", "cp_random", "dp")
"""The kinds of `step_traffic`: cp_random is the random blocks' all-to-all (or the pool's)."""


# ---- traffic ---------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _cp_layer_bytes(
    pattern: SparsityConfig,
    seq_len: int,
    cp: int,
    heads: int,
    head_dim: int,
    p: int,
    batch: int,
    layer: int,
) -> list[dict[str, int]]:
    """Per cp rank: bytes sent in one layer's forward and backward, by kind (cp_halo,
    cp_global, cp_random)."""
    b = pattern.block_size
    row = batch * heads * head_dim * p
    n_glob = global_count(pattern, seq_len)
    out = []
    for rank in range(cp):
        fwd = forward_bytes(pattern, seq_len, cp, rank, heads, head_dim, layer, 0, p, batch)
        plan = rank_plan(pattern, seq_len, cp, rank, heads, layer, 0)
        # Backward sends back the gradients of what this rank received in the forward.
        halo_back = sum(2 * (piece.hi - piece.lo) * b * row for piece in plan.halo_recv)
        received = sum(n for src, n in enumerate(plan.random_sources) if src != rank)
        random_back = 2 * received * b * row if plan.random_in_group else 0
        # The global rows' all-reduce and the merge's packed all-reduce run again backward
        # (the merge's row-max all-reduce does not).
        merge_back = all_reduce_bytes(n_glob * (row + batch * heads * p), cp) if n_glob else 0
        out.append(
            {
                "cp_halo": fwd["halo"] + halo_back,
                "cp_global": 2 * fwd["global"] + fwd["global_merge"] + merge_back,
                "cp_random": fwd["random"] + fwd["pool"] + random_back,
            }
        )
    return out


def cp_traffic_by_rank(
    model: ModelArgs, attention: SparsityConfig, work: Workload, layout: Layout, stage: int = 0
) -> list[dict[str, int]]:
    """Per cp rank of pipeline stage `stage`: bytes its attention exchanges send per optimizer
    step (the stage's layers, every micro-batch, forward and backward), by kind: cp_halo,
    cp_global (the global rows and the merge of the global queries' partials) and cp_random
    (random or pool)."""
    kinds = ("cp_halo", "cp_global", "cp_random")
    if layout.cp == 1:
        return [dict.fromkeys(kinds, 0)]
    heads = model.n_heads // layout.tp
    layers = layout.layers_of_stage(model.n_layers, stage)
    out = [dict.fromkeys(kinds, 0) for _ in range(layout.cp)]
    times = work.grad_accum * (2 if model.recompute else 1)
    for pattern, layer, count in layer_groups(attention, model.n_layers, layers):
        per_rank = _cp_layer_bytes(
            pattern, work.seq_len, layout.cp, heads, model.head_dim, work.value_bytes,
            work.micro_batch_size, layer,
        )  # fmt: skip
        for total, sent in zip(out, per_rank, strict=True):
            for kind in kinds:
                total[kind] += times * count * sent[kind]
    return out


def _tp_stage_bytes(
    model: ModelArgs, attention: SparsityConfig, work: Workload, layout: Layout, stage: int
) -> int:
    """Bytes a tp rank of pipeline stage `stage` sends over its tp group per optimizer step."""
    d, p, tp = model.d_model, work.value_bytes, layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    tokens = work.micro_batch_size * work.seq_len // layout.cp
    act = all_reduce_bytes(tokens * d * p, tp)  # T x d (or an all-gather + reduce-scatter)
    forwards = 2 if model.recompute else 1
    backward_reductions = 3 if attention.global_projections else 2
    layers = len(layout.layers_of_stage(model.n_layers, stage))
    micro_batch = layers * (2 * forwards + backward_reductions) * act
    if first:  # the embedding's output forward (sequence parallelism: reduced and scattered)
        micro_batch += act
        if work.sequence_parallel and built_model(model, attention).sums_embeddings:
            # Megatron's rule for embeddings summed before the split: the word embedding
            # all-reduces whole, the split's backward all-gathers the gradient.
            micro_batch += all_gather_bytes(tokens * d * p, tp)
    if last:  # the LM head input's gradient, the vocab-parallel cross entropy's reductions
        micro_batch += act + 3 * all_reduce_bytes(tokens * 4, tp)
    per_step = 0
    if work.sequence_parallel:  # the gradients of the replicated parameters of one shard
        per_step = all_reduce_bytes(
            4 * sequence_parallel_params(model, attention, layout, stage), tp
        )
    return work.grad_accum * micro_batch + per_step


def step_traffic(
    model: ModelArgs, attention: SparsityConfig, work: Workload, layout: Layout
) -> dict[str, int]:
    """Bytes the most loaded rank of each kind sends per optimizer step (module docstring)."""
    d, p, tp, pp, cp = model.d_model, work.value_bytes, layout.tp, layout.pp, layout.cp
    tokens = work.micro_batch_size * work.seq_len // cp
    out = dict.fromkeys(TRAFFIC_KINDS, 0)
    if tp > 1:
        out["tp"] = max(_tp_stage_bytes(model, attention, work, layout, s) for s in range(pp))
    if pp > 1:
        send = tokens * d * p // sequence_shards(work, layout)
        out["pp"] = work.grad_accum * send * (2 if pp > 2 else 1)
        if model.tie_embeddings:
            vocab_rows = layout.padded_vocab(model.vocab_size) // tp
            out["pp"] += all_reduce_bytes(vocab_rows * d * 4, 2)
    cp_ranks = [r for s in range(pp) for r in cp_traffic_by_rank(model, attention, work, layout, s)]
    for kind in ("cp_halo", "cp_global", "cp_random"):
        out[kind] = max(r[kind] for r in cp_ranks)
    shard = layout.dp * cp
    if shard > 1:  # the parameters that train (the distributed optimizer's buffers)
        params = max(
            stage_parameters(model, attention, layout, s, trainable=True) for s in range(pp)
        )
        out["dp"] = all_gather_bytes(params * 4, shard) + all_gather_bytes(params * p, shard)
    return out
