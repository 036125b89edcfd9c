"""Argument checks of cp_sparse_attention that must fail on every rank instead of hanging.

Local checks (shapes, divisibility) run on each rank; their verdicts and a description of the
call (config, sequence length, shapes, dtype, which masks are given) are then all-gathered once
per (group, description), so a rank with a bad argument or a different config makes *every*
rank raise the same ValueError before any exchange that could deadlock.

Limitation: after a description passed the check once, later calls with it skip the gather;
a rank that then changes config alone is not caught (it would gather while the others don't).

Used by parallel/context_parallel.py; not a user entry point.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from model.sparse import SparsityConfig
from parallel.cp_comm import CPComm

_checked: set[tuple[int, str]] = set()


def local_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: SparsityConfig,
    world: int,
    padding_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    pattern_len: int | None = None,
) -> str | None:
    """The first thing wrong with this rank's arguments, as a sentence, or None."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return (
            "q, k and v must have the same shape [batch, heads, seq/P, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads, n_local, _ = q.shape
    b = cfg.block_size
    seq_len = n_local * world
    if n_local < b:
        return (
            f"cp={world} ranks exceed the blocks of the sequence: each rank holds {n_local} "
            f"tokens, less than one attention.block_size={b} block; use cp <= seq/{b}"
        )
    if n_local % b:
        return (
            f"sequence length {seq_len} (local {n_local} x cp {world}) must be a multiple of "
            f"cp x attention.block_size = {world} x {b} = {world * b} (pad it with "
            "parallel.context_parallel.pad_for_cp and pass the true length as seq_len)"
        )
    if pattern_len is not None and not seq_len - world * b < pattern_len <= seq_len:
        return (
            f"seq_len={pattern_len} does not fit the {seq_len} tokens of the cp ranks: pad a "
            f"sequence only to the next multiple of cp x attention.block_size = {world * b}"
        )
    try:
        cfg.validate_seq_len(seq_len)
        cfg.head_dilations(heads)
    except ValueError as err:
        return str(err)
    for name, m in (("padding_mask", padding_mask), ("global_mask", global_mask)):
        if m is not None and tuple(m.shape) != (batch, seq_len):
            return (
                f"{name} must be the FULL-sequence [batch, seq] = {(batch, seq_len)} on every "
                f"cp rank; got {tuple(m.shape)}"
            )
    return None


def describe(
    q: torch.Tensor, cfg: SparsityConfig, world: int, padding_mask, global_mask, pattern_len=None
) -> str:
    return (
        f"{cfg!r} local_shape={tuple(q.shape)} seq_len={q.shape[2] * world} "
        f"pattern_len={pattern_len} dtype={q.dtype} "
        f"padding_mask={padding_mask is not None} global_mask={global_mask is not None}"
    )


def check_call(comm: CPComm, problem: str | None, description: str) -> None:
    """Raise the same ValueError on every rank when any rank has a problem or the ranks'
    descriptions differ."""
    if comm.world == 1:
        if problem:
            raise ValueError(f"cp_sparse_attention: {problem}")
        return
    key = (id(comm.group) if comm.group is not None else 0, description)
    if problem is None and key in _checked:
        return
    digest = hashlib.blake2b(description.encode(), digest_size=8).hexdigest()
    gathered: list = [None] * comm.world
    dist.all_gather_object(gathered, (problem, digest, description), group=comm.group)
    bad = [(r, p) for r, (p, _, _) in enumerate(gathered) if p]
    if bad:
        lines = "; ".join(f"rank {r}: {p}" for r, p in bad)
        raise ValueError(f"cp_sparse_attention refused the call on every cp rank: {lines}")
    if len({d for _, d, _ in gathered}) > 1:
        lines = "\n".join(f"  rank {r}: {desc}" for r, (_, _, desc) in enumerate(gathered))
        raise ValueError(
            "cp_sparse_attention: the cp ranks disagree on the attention config, sequence "
            f"length, shapes or masks (each rank must pass the same ones):\n{lines}"
        )
    _checked.add(key)
