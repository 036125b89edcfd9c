"""The layout planner's memory model (parallel.plan): bytes of one rank, by what holds them.

    from parallel.plan_memory import Workload, estimate_memory, rank_memory
    mem = estimate_memory(cfg.model, cfg.attention, Workload(2048, 4), Layout(tp=2, cp=2))

Memory (bytes of one rank; P its parameters, T = micro_batch_size x seq_len / cp its tokens
per micro-batch, d, h, H, D width, MLP width, heads, head dim, V the padded vocabulary). Both
architectures are modelled, the decoder (model.arch=transformer, model/transformer.py) and the
HF-shaped encoder (model.arch=encoder, model/encoder.py); any other is refused:
- parameters: P x 4 (fp32) or 2 (bf16). P is counted from the model.registry model built on
  the meta device: this stage's blocks, the model's `first_stage` modules (embeddings) on the
  first stage, its `last_stage` ones (final norm or MLM head, LM head, pooler) on the last (a
  tied head is a second copy when pp > 1), split over tp as parallel.tp_plan splits them: the
  projections and their column layers' biases and the vocabulary rows (embedding, LM head and
  its bias) / tp; row layers' biases, norms, learned positions, the MLM head's dense whole.
- gradients: P x 4 of the parameters that train (not the encoder's frozen pooler): Megatron's
  DDP accumulates and reduces them in an fp32 buffer (grad_reduce_in_fp32), present
  throughout; the local engine's param.grad (fp32) are set to None after each step and
  allocated in the backward as the activations are freed, so its peak holds the larger of
  gradients and activations.
- optimizer: the two Adam moments in fp32 (8 bytes), with bf16 also the fp32 master weights
  (4 bytes), per parameter that trains, sharded over the dp x cp ranks by the distributed
  optimizer (the ranks that hold the same parameters); the local engine keeps them whole.
- activations: what autograd keeps for the backward, counted tensor by tensor for each model
  (checked with saved-tensor hooks on CPU, tests/unit/test_plan.py). Per layer and token, in
  elements, the decoder: the two RMSNorms keep their input, normalised and scaled tensors
  (6 d; / tp with sequence parallelism) and a row statistic each (2), RoPE its cos / sin
  (2 D, fp32); the encoder (post-LN): the block's input, each LayerNorm's input and the first
  one's output (4 d; / tp with sequence parallelism), each LayerNorm's mean and rstd (4). The
  tensor-parallel part, / tp, the same for both: q, k, v (the kernel's contiguous copies of
  the projection's views; the decoder's q and k are RoPE's outputs), the kernel's output and
  log-sum-exp (H), the output projection's input, and the tensors the global rows are
  gathered from (on one device the projection's output [q | k | v], kept even without global
  tokens since a gather saves its input; under cp a stack of q, k, v, only with global
  tokens): 8 d, or 5 d under cp without global tokens; SwiGLU's up projection, its silu and
  product (4 h; GELU 2 h); Longformer's global projections another 5 d in the decoder (its
  [q | k | v] and rotated q, k), in the encoder 3 d on one device with global tokens and
  none otherwise (the rows are gathered from its [q | k | v] only there). The biases keep
  nothing. Sparse attention keeps nothing of size N^2: the blocked kernel saves q, k, v, the
  output and the log-sum-exp and recomputes the scores in backward (O(N)). Per layer
  besides: one device keeps the global queries' mask (G x N, fp32) and rows; under cp a rank
  keeps its key/value buffers, read from its plan (parallel.cp_plan.rank_plan): the
  interior's random buffer [received | local drawn blocks] and the boundary buffer [halo |
  edge | halo | random] (each as k and v), plus the global rows and their output (4 G), the
  global queries' partial softmax over its keys (G x T per head) and the copies its matmuls
  make of k and v where they are views of the projection's output (the encoder's k and v,
  the decoder's v; T each), or that output itself (3 T) where batch and heads merge into one
  view. With attention.layers each layer counts with its own pattern (a distinct pattern's
  plan once, with the random draw of its first layer). With `model.recompute` a layer keeps
  only its input (d per token) and one layer at a time is recomputed in full. Outside the
  layers: the decoder's final RMSNorm (3 d / tp with sequence parallelism) on the last stage;
  the encoder's embedding LayerNorm input (the embeddings' sum, d, whole under sequence
  parallelism: the split is a view of it), its statistics and the position rows (int64) on
  the first stage, its MLM head on the last (the dense's input and output, the GELU's
  output, the LayerNorm's output, 4 d / tp with sequence parallelism).
  Pipeline (1F1B): stage s holds min(pp - s, grad_accum) micro-batches in flight, and the
  stage outputs it has sent (d per token each). The peak adds, on the last stage, the logits:
  Megatron's vocab-parallel cross entropy keeps the fp32 logits and their softmax (2 x V / tp
  per token, 8 bytes; bf16 10: the bf16 logits, their fp32 copy, the softmax; with sequence
  parallelism and micro-batches of more than one sequence 4 more: the LM head's [n, b, V]
  output is copied into a contiguous one), the local engine's log-softmax, its gradient and
  the input gradient (3 x V); elsewhere one layer's backward workspace (the SwiGLU gradients
  2 h / tp plus d per token, the kernel's chunk of scores, 8 MiB) and on the first stage the
  embeddings' dense weight gradients ((V / tp + the encoder's position and token-type rows)
  x d).
- bf16 (assumed, not measured here: the checks run on CPU in fp32): 2-byte activations
  throughout (the fused GPU kernel takes bf16 q, k, v), fp32 RoPE tables and statistics.
  Not modelled: the CUDA context, NCCL buffers, the caching allocator's fragmentation and
  the kernels' own workspaces beyond the blocked kernel's chunk; the samples' own global
  tokens (data.global_doc_starts: G is the pattern's); `plan_layouts` keeps `headroom` of
  each GPU free for them.
Measured on CPU (fp32, glibc's mmap threshold fixed so that the peak resident set is the peak
of live tensors; tests/distributed/test_plan_memory.py): the estimate is within 15% of the
peak RSS growth of short training runs of the demo model at 1 rank, tp2, tp2 with sequence
parallelism, pp2, cp2 and dp2, and of the demo's sizes as the encoder at 1 rank, tp2, tp2
with sequence parallelism, pp2 and cp2 (estimate / peak: decoder 0.92-1.02, encoder
0.89-1.04; the lowest, 0.92 and 0.89, are one process with recomputation).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from functools import lru_cache

import torch

from model.registry import build_model
from model.sparse import SparsityConfig
from model.transformer import ModelArgs, ModelBase
from parallel.cp_plan import rank_plan
from parallel.layout import Layout
from parallel.tp_plan import is_vocab, split_view

__all__ = [
    "KERNEL_CHUNK_BYTES", "Workload", "MemoryEstimate", "MODELLED", "check_modelled",
    "built_model", "stage_parameters", "sequence_parallel_params", "layer_groups",
    "global_count", "sequence_shards", "layer_activation_bytes", "end_activation_bytes",
    "rank_memory", "estimate_memory",
]  # fmt: skip

KERNEL_CHUNK_BYTES = 2 * (1 << 20) * 4
"""The blocked kernel's scratch in backward: a chunk's scores and probabilities (2^20 fp32
values each, model.sparse_kernel._CHUNK_SCORES)."""


@dataclass(frozen=True)
class Workload:
    """What one optimizer step asks of a rank: the train section's sizes and the precision."""

    seq_len: int
    """Tokens per sequence (train.seq_len)."""
    micro_batch_size: int
    """Sequences per micro-batch of one data-parallel rank (train.micro_batch_size)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (train.grad_accum; the pipeline's micro-batches)."""
    precision: str = "fp32"
    """"fp32" or "bf16" (optim.precision)."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism where tp > 1 (parallel.sequence_parallel)."""
    local_engine: bool = True
    """One rank runs the local engine (train.engine auto or local); False: Megatron's."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"optim.precision={self.precision!r} must be fp32 or bf16")
        for name in ("seq_len", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)!r} must be positive")

    @property
    def value_bytes(self) -> int:
        """Bytes of one parameter or activation value."""
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one rank, by what holds them."""

    params: int
    grads: int
    optimizer: int
    activations: int
    """The activations' share of the peak: kept tensors of the micro-batches in flight plus
    the largest transient (logits and their softmax, or a layer's backward)."""
    where: str = ""
    """Which rank this is (the most loaded one of the layout)."""
    grads_at_peak: bool = True
    """The gradients exist while the activations peak (Megatron's DDP keeps a gradient
    buffer). False for the local engine, which sets them to None after each step: they are
    allocated in the backward as the activations are freed, so the peak holds the larger of
    the two."""

    @property
    def total(self) -> int:
        if self.grads_at_peak:
            return self.params + self.grads + self.optimizer + self.activations
        return self.params + self.optimizer + max(self.grads, self.activations)


# ---- parameters ------------------------------------------------------------------------------


MODELLED = ("transformer", "encoder")
"""The architectures (model.arch) whose activations the estimates count tensor by tensor."""


def check_modelled(model: ModelArgs) -> None:
    """Raise ValueError when the estimates do not model `model.arch` (they count the tensors
    of the decoder, model/transformer.py, and of the encoder, model/encoder.py)."""
    if model.arch not in MODELLED:
        raise ValueError(
            f"model.arch={model.arch!r}: the planner models {' and '.join(MODELLED)}; its "
            "activation count is each model's own, tensor by tensor"
        )


@dataclass(frozen=True)
class _Param:
    """A parameter of the single-process model: its name and full shape."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    """requires_grad: a frozen parameter (the encoder's pooler) has no gradient and no
    optimizer state."""


@dataclass(frozen=True)
class _Built:
    """What the planner reads of the single-process model (model.transformer.ModelBase)."""

    params: tuple[_Param, ...]
    first_stage: tuple[str, ...]
    last_stage: tuple[str, ...]
    whole_sequence: tuple[str, ...]
    sums_embeddings: bool


def built_model(model: ModelArgs, attention: SparsityConfig) -> _Built:
    """The model.registry model of `model`, built on the meta device (once per shape)."""
    check_modelled(model)
    return _build(astuple(model), attention)


@lru_cache(maxsize=32)
def _build(fields: tuple, attention: SparsityConfig) -> _Built:
    """built_model's work, keyed by the ModelArgs fields (ModelArgs itself is not hashable)."""
    with torch.device("meta"):
        net = build_model(ModelArgs(*fields), attention)
    assert isinstance(net, ModelBase)
    params = tuple(
        _Param(name, tuple(p.shape), p.requires_grad) for name, p in net.named_parameters()
    )
    return _Built(params, net.first_stage, net.last_stage, net.whole_sequence, net.sums_embeddings)


def _on_stage(name: str, built: _Built, layers: set[int], first: bool, last: bool) -> bool:
    """Whether parameter `name` is on a stage (parallel.parallelize): its blocks, the model's
    first_stage modules on the first, its last_stage ones on the last, the rest everywhere."""
    top = name.split(".")[0]
    if top == "blocks":
        return int(name.split(".")[1]) in layers
    if top in built.first_stage:
        return first
    if top in built.last_stage:
        return last
    return True


def _split_over_tp(param: _Param, model: ModelArgs) -> bool:
    """Whether tensor parallelism splits `param` (parallel.tp_plan): the vocabulary's rows, the
    projections' weights, the column layers' biases; not a row layer's bias, norms, positions,
    the MLM head's dense."""
    return is_vocab(param.name) or split_view(param.name, torch.Size(param.shape), model)[1] >= 0


def _rank_numel(param: _Param, model: ModelArgs, vocab: int, tp: int) -> int:
    """Elements of `param` on one tp rank: vocabulary rows `vocab` / tp, a split tensor / tp,
    a replicated one whole."""
    if is_vocab(param.name):
        return vocab // tp * math.prod(param.shape[1:])
    return math.prod(param.shape) // (tp if _split_over_tp(param, model) else 1)


def _stage_params(
    model: ModelArgs, attention: SparsityConfig, layout: Layout, stage: int
) -> list[_Param]:
    """The parameters of pipeline stage `stage` (full shapes), the last stage's copy of a tied
    embedding included."""
    built = built_model(model, attention)
    first, last = stage == 0, stage == layout.pp - 1
    layers = set(layout.layers_of_stage(model.n_layers, stage))
    params = [p for p in built.params if _on_stage(p.name, built, layers, first, last)]
    if model.tie_embeddings and last and not first:
        params.append(_Param("lm_head.weight", (model.vocab_size, model.d_model), True))
    return params


def stage_parameters(
    model: ModelArgs,
    attention: SparsityConfig,
    layout: Layout,
    stage: int,
    padded: bool = True,
    trainable: bool = False,
) -> int:
    """Parameters one tensor-parallel rank of pipeline stage `stage` holds (parallel.parallelize:
    its blocks, the model's first-stage modules (embeddings) first, its last-stage ones (final
    norm or MLM head, LM head) last; split over tp as parallel.tp_plan splits them). `padded`:
    the vocabulary padded as Megatron's engine pads it (Layout.padded_vocab); the local engine
    does not. `trainable`: only those that train (requires_grad; not the encoder's pooler)."""
    vocab = layout.padded_vocab(model.vocab_size) if padded else model.vocab_size
    return sum(
        _rank_numel(param, model, vocab, layout.tp)
        for param in _stage_params(model, attention, layout, stage)
        if param.trainable or not trainable
    )


def sequence_parallel_params(
    model: ModelArgs, attention: SparsityConfig, layout: Layout, stage: int
) -> int:
    """Elements of the stage's replicated trainable parameters that see one sequence shard under
    sequence parallelism (norms, row layers' biases, the MLM head's dense): their gradients are
    all-reduced over tp once per step (parallel.parallelize.ParallelStage)."""
    built = built_model(model, attention)
    return sum(
        math.prod(param.shape)
        for param in _stage_params(model, attention, layout, stage)
        if param.trainable
        and not _split_over_tp(param, model)
        and param.name.split(".")[0] not in built.whole_sequence
    )


# ---- activations -----------------------------------------------------------------------------


def layer_groups(
    attention: SparsityConfig, n_layers: int, layers: range
) -> list[tuple[SparsityConfig, int, int]]:
    """The distinct plain patterns of `layers` (attention.layers may vary them): (pattern,
    the first layer that has it, how many layers have it). A pattern's plans are computed
    once, with the random draw of that first layer."""
    groups: dict[SparsityConfig, list[int]] = {}
    for layer in layers:
        groups.setdefault(attention.for_layer(layer, n_layers), []).append(layer)
    return [(pattern, found[0], len(found)) for pattern, found in groups.items()]


@lru_cache(maxsize=256)
def _cp_kv_rows(
    pattern: SparsityConfig, seq_len: int, cp: int, rank: int, heads: int, layer: int
) -> int:
    """Key/value rows (tokens of one sequence) cp rank `rank` keeps for one layer as k and
    as v beyond its own: the interior's random buffer [received | local drawn blocks] and the
    boundary buffer [halo | edge | halo | random] (parallel.context_parallel)."""
    plan = rank_plan(pattern, seq_len, cp, rank, heads, layer, 0)
    interior_random = max(0, plan.kpos_interior.numel() - seq_len // cp)
    boundary = plan.kpos_boundary.numel() if plan.boundary.numel() else 0
    return interior_random + boundary


def global_count(attention: SparsityConfig, seq_len: int) -> int:
    return int(attention.global_positions(seq_len).numel())


def sequence_shards(work: Workload, layout: Layout) -> int:
    """The sequence-parallel split of the tensors outside the tp regions (1 without)."""
    return layout.tp if work.sequence_parallel and layout.tp > 1 else 1


def layer_activation_bytes(
    model: ModelArgs,
    attention: SparsityConfig,
    work: Workload,
    layout: Layout,
    cp_rank: int = 0,
    layer: int = 0,
) -> int:
    """Bytes transformer layer `layer` keeps for its backward over one micro-batch on one
    rank (module docstring), without recomputation; its own pattern with attention.layers."""
    attention = attention.for_layer(layer, model.n_layers)
    d, h, hd = model.d_model, model.hidden, model.head_dim
    tp, cp, p = layout.tp, layout.cp, work.value_bytes
    heads = model.n_heads // tp
    n_local = work.seq_len // cp
    tokens = work.micro_batch_size * n_local
    encoder = model.arch == "encoder"
    n_glob = global_count(attention, work.seq_len)
    # q, k, v (the kernel's contiguous copies of the projection's views: the encoder's three,
    # the decoder's v; its q and k are RoPE's outputs), the output, the output projection's
    # input; and the tensors the global rows are gathered from: on one device the projection's
    # output [q | k | v] (kept even without global tokens: a gather saves its input), under
    # cp a stack of q, k, v.
    attn = (8 if cp == 1 or n_glob else 5) * d
    if attention.global_projections and not encoder:  # [q | k | v], rotated q and k
        attn += 5 * d
    elif attention.global_projections and cp == 1 and n_glob:  # [q | k | v] the rows come from
        attn += 3 * d
    mlp = 4 * h if model.mlp == "swiglu" else 2 * h
    if encoder:  # post-LN: the block's input, each LayerNorm's input, the first one's output
        norms, fp32_per_token = 4 * d, 4 + heads  # the norms' mean and rstd, log-sum-exp
    else:  # pre-norm RMSNorm: input, normalised and scaled; RoPE's cos and sin
        norms, fp32_per_token = 6 * d, 2 + heads + 2 * hd
    per_token = (
        p * (norms // sequence_shards(work, layout) + (attn + mlp) // tp) + 4 * fp32_per_token
    )
    total = tokens * per_token
    row = work.micro_batch_size * heads * hd * p  # one token of k (or v) on this rank
    if cp == 1:
        total += 4 * n_glob * work.seq_len  # the global queries' mask, one per batch
        total += 3 * n_glob * row
    else:
        total += 2 * _cp_kv_rows(attention, work.seq_len, cp, cp_rank, heads, layer) * row
        if n_glob:
            # The global queries' partial softmax multiplies by k and v: a copy of each that
            # is a view of the projection's output (the encoder's k and v, the decoder's v),
            # or, where batch and heads merge into one view, that output [q | k | v] itself.
            views = 2 if encoder else 1
            copies = views if work.micro_batch_size > 1 and heads > 1 else 3
            total += 4 * n_glob * row + copies * n_local * row  # global rows and output
            total += work.micro_batch_size * heads * n_glob * n_local * p  # partial softmax
    return total


def end_activation_bytes(
    model: ModelArgs, work: Workload, layout: Layout, first: bool, last: bool
) -> int:
    """Bytes the first stage's embeddings and the last stage's head keep for the backward over
    one micro-batch on one rank, the logits aside (module docstring)."""
    d, p, sp = model.d_model, work.value_bytes, sequence_shards(work, layout)
    tokens = work.micro_batch_size * work.seq_len // layout.cp
    total = 0
    if model.arch == "encoder":
        if first:  # the LayerNorm's input (the embeddings' sum: under sequence parallelism
            # a view of the whole one) and its mean and rstd; the position embedding's rows
            total += tokens * d * p + tokens * 2 * 4 // sp + tokens * 8
        if last:  # the MLM head: the dense's input and output, the GELU's output, the
            # LayerNorm's output (the LM head's input), its mean and rstd
            total += tokens * (4 * d * p + 2 * 4) // sp
    elif last:  # the final RMSNorm's input, normalised and scaled tensors
        total += tokens * 3 * d * p // sp
    return total


def _stage_activation_bytes(
    model: ModelArgs,
    attention: SparsityConfig,
    work: Workload,
    layout: Layout,
    stage: int,
    cp_rank: int,
) -> int:
    """The activations' share of the peak on (stage, cp_rank): what the micro-batches in
    flight keep, plus the larger of the head's transient (last stage: the logits) and the
    backward's (a layer's workspace, and under recompute the layer recomputed)."""
    d, p, tp = model.d_model, work.value_bytes, layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    layers = layout.layers_of_stage(model.n_layers, stage)
    tokens = work.micro_batch_size * work.seq_len // layout.cp
    sp = sequence_shards(work, layout)
    per_layer = [
        (count, layer_activation_bytes(model, attention, work, layout, cp_rank, layer))
        for _, layer, count in layer_groups(attention, model.n_layers, layers)
    ]
    if model.recompute:  # each layer keeps its input
        kept_layers = len(layers) * tokens * d * p // sp
    else:
        kept_layers = sum(count * n for count, n in per_layer)
    kept_layers += end_activation_bytes(model, work, layout, first, last)
    in_flight = min(layout.pp - stage, work.grad_accum) if layout.pp > 1 else 1
    kept = in_flight * kept_layers
    if not last:
        kept += in_flight * tokens * d * p // sp  # stage outputs kept until their backward
    backward = tokens * (2 * model.hidden // tp + d) * p + KERNEL_CHUNK_BYTES
    if model.recompute:  # the layer being recomputed
        backward += max(n for _, n in per_layer)
    local = _local(work, layout)
    vocab_rows = (model.vocab_size if local else layout.padded_vocab(model.vocab_size)) // tp
    if first:  # the embeddings' dense weight gradients
        positions = model.max_positions + model.type_vocab_size
        backward += (vocab_rows + positions) * d * 4
    if not last:
        return kept + backward
    if local:
        per_logit = 3 * 4  # log-softmax, its gradient, the input gradient
    else:
        per_logit = 8 if work.precision == "fp32" else 10
        if sp > 1 and work.micro_batch_size > 1:
            # The LM head's output is [n, b, V / tp] seen as [b, n, V / tp]: the loss copies
            # it into a contiguous one as well.
            per_logit += 4
    return kept + max(tokens * vocab_rows * per_logit, backward)


def _local(work: Workload, layout: Layout) -> bool:
    """Whether the layout runs the local engine (one rank, the trainer's choice)."""
    return layout.world_size == 1 and work.local_engine


def rank_memory(
    model: ModelArgs,
    attention: SparsityConfig,
    work: Workload,
    layout: Layout,
    stage: int = 0,
    cp_rank: int = 0,
) -> MemoryEstimate:
    """The bytes of the ranks of pipeline stage `stage` and context rank `cp_rank` in a
    training step under `layout` (module docstring)."""
    local = _local(work, layout)
    params = stage_parameters(model, attention, layout, stage, padded=not local)
    trained = stage_parameters(model, attention, layout, stage, not local, trainable=True)
    optim_bytes = 8 + (4 if work.precision == "bf16" else 0)
    return MemoryEstimate(
        params=params * work.value_bytes,
        grads=trained * 4,
        optimizer=-(-trained * optim_bytes // (layout.dp * layout.cp)),
        activations=_stage_activation_bytes(model, attention, work, layout, stage, cp_rank),
        where=f"pp stage {stage}, cp rank {cp_rank}",
        grads_at_peak=not local,
    )


def estimate_memory(
    model: ModelArgs, attention: SparsityConfig, work: Workload, layout: Layout
) -> MemoryEstimate:
    """The most loaded rank's `rank_memory` (over pipeline stages and cp ranks)."""
    ranks = (
        rank_memory(model, attention, work, layout, stage, cp_rank)
        for stage in range(layout.pp)
        for cp_rank in range(layout.cp)
    )
    return max(ranks, key=lambda m: m.total)
