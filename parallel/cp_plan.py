"""Who holds which key blocks under context parallelism, computed alike on every rank.

Rank r of P holds blocks [r*nl, (r+1)*nl) of the sequence (nl = N / (P * block)). Its key
buffer is [halo-left | local | halo-right | random]: the window reach on each side (clipped at
the sequence ends, possibly spanning several ranks) and the random key blocks its queries draw
outside that range, deduplicated. Everything here is a pure function of (config, sequence
length, P, heads, layer, step), so every rank knows what every other rank sends and receives
without asking; that is what keeps the exchanges free of size handshakes.

Used by parallel/context_parallel.py; not a user entry point.
Legend: nb = blocks in the sequence, nl = blocks per rank, all block ids are global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from model.sparse import SparsityConfig
from model.sparse_plan import BlockTable, build_block_table


@dataclass(frozen=True)
class HaloPiece:
    """Blocks [lo, hi) that rank `dst` receives from their owner `src` for its window halo."""

    src: int
    dst: int
    lo: int
    hi: int


@dataclass
class RankPlan:
    """The static part of one rank's work: buffers, tables and exchange lists."""

    rank: int
    halo_left: tuple[int, int]
    """Global blocks [lo, hi) of the left halo (empty when lo == hi)."""
    halo_right: tuple[int, int]
    random_blocks: torch.Tensor
    """long [m]: sorted global ids of the remote random key blocks this rank receives."""
    random_sources: list[int]
    """Blocks received from each rank (all-to-all output split sizes)."""
    random_sends: list[torch.Tensor]
    """For each rank: long local block ids (sorted) this rank sends it."""
    random_kind: str
    """Traffic kind of the random all-to-all: "pool" with random_pool_blocks, else "random"."""
    random_in_group: bool
    """Some rank of the group reads a remote random block (the same on every rank: decides
    whether the all-to-all runs at all)."""
    halo_recv: list[HaloPiece]
    halo_send: list[HaloPiece]
    halo_in_group: bool
    """Some rank of the group receives a halo (the same on every rank)."""
    interior: torch.Tensor
    """long: global ids of the local query blocks computable without the halo."""
    boundary: torch.Tensor
    """long: the other local query blocks."""
    table_interior: BlockTable | None
    """Table over the buffer [local | random] for the interior blocks."""
    table_boundary: BlockTable | None
    """Table over the boundary buffer (below) for the boundary blocks."""
    kpos_interior: torch.Tensor
    """long: global token positions of the interior's virtual buffer [local | random], the
    random part being [received random blocks | `random_local`]."""
    random_local: torch.Tensor
    """long: local token indices of the local blocks the interior's random entries draw
    (copied into the interior's small random buffer after the received ones)."""
    kpos_boundary: torch.Tensor
    """long: global token positions of the boundary buffer [halo-left | the local blocks the
    boundary blocks read | halo-right | random]."""
    edge_local: torch.Tensor
    """long: local token indices of the *edge* (sorted): the local blocks the boundary blocks
    read plus those sent as halo. Only these are gathered (once) for the halo and boundary
    paths, so their gradients meet in one buffer of the edge's size, which does not grow
    with n, before a single scatter into k / v."""
    boundary_in_edge: torch.Tensor
    """long: token indices into the edge of the local part of the boundary buffer."""
    halo_send_in_edge: list[int]
    """Token offset into the edge of each piece of `halo_send` (each piece is contiguous
    there, as it is locally)."""
    runs: list[tuple[int, bool]]
    """The local tokens as maximal runs of interior or boundary blocks, in sequence order:
    (tokens, is interior). Queries are split and outputs joined along them (views and one
    concatenation, not index gathers, whose backward would zero-fill a full-size buffer per
    use)."""


def _blocks_to_tokens(blocks: torch.Tensor, block: int) -> torch.Tensor:
    return (blocks.view(-1, 1) * block + torch.arange(block).view(1, -1)).flatten()


def halo_range(cfg: SparsityConfig, n_blocks: int, world: int, rank: int):
    """((left_lo, left_hi), (right_lo, right_hi)) global blocks of `rank`'s halo."""
    nl = n_blocks // world
    reach_left, reach_right = cfg.reach_blocks
    lo, hi = rank * nl, (rank + 1) * nl
    left = (max(0, lo - reach_left), lo)
    right = (hi, min(n_blocks, hi + reach_right))
    return left, right


def halo_pieces(cfg: SparsityConfig, n_blocks: int, world: int) -> list[HaloPiece]:
    """Every (owner -> receiver) halo message of the group, multi-hop ones included."""
    nl = n_blocks // world
    pieces = []
    for dst in range(world):
        for lo, hi in halo_range(cfg, n_blocks, world, dst):
            for src in range(world):
                a, b = max(lo, src * nl), min(hi, (src + 1) * nl)
                if a < b:
                    pieces.append(HaloPiece(src, dst, a, b))
    return pieces


def _random_needs(cfg, n_blocks, world, rank, n_heads, layer, step, npat) -> torch.Tensor:
    """Sorted unique remote random blocks `rank` receives.

    With a pool: every pool block outside the rank's reach (what its queries can draw), known
    from the pool alone, O(pool). Without: the blocks its query rows actually drew, O(local
    rows x r)."""
    nl = n_blocks // world
    (left_lo, _), (_, right_hi) = halo_range(cfg, n_blocks, world, rank)
    if cfg.random_blocks == 0:
        return torch.empty(0, dtype=torch.long)
    if cfg.random_pool_blocks:
        heads = cfg.draw_heads(n_heads)
        rows = torch.cat([cfg.random_pool(npat, layer, step, h) for h, _ in heads])
    else:
        local = torch.arange(rank * nl, (rank + 1) * nl)
        rows = cfg.random_rows(local, npat, n_heads, layer, step).flatten()
        rows = rows[rows >= 0]
    outside = (rows < left_lo) | (rows >= right_hi)
    return torch.unique(rows[outside])


def _slots(n_blocks: int, buffer_blocks: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """long [n_blocks]: offset + the place of each block in `buffer_blocks`, -1 if absent."""
    slot = torch.full((n_blocks,), -1, dtype=torch.long)
    slot[buffer_blocks] = torch.arange(buffer_blocks.numel()) + offset
    return slot


@lru_cache(maxsize=64)
def rank_plan(
    cfg: SparsityConfig,
    seq_len: int,
    world: int,
    rank: int,
    n_heads: int,
    layer: int,
    step: int,
    pattern_len: int | None = None,
) -> RankPlan:
    """The plan of `rank`, built once per (step, layer) and cached: every micro-batch and the
    backward of that layer reuse it. `pattern_len`: the true sequence length when `seq_len`
    (a multiple of world x block) ends in padding; the pattern is that of the true length."""
    b = cfg.block_size
    n_blocks = seq_len // b
    npat = cfg.n_blocks(pattern_len or seq_len)
    nl = n_blocks // world
    needs = [
        _random_needs(cfg, n_blocks, world, r, n_heads, layer, step, npat) for r in range(world)
    ]
    mine = needs[rank]
    sources = [int(((mine >= s * nl) & (mine < (s + 1) * nl)).sum()) for s in range(world)]
    sends = []
    for dst in range(world):
        theirs = needs[dst]
        owned = theirs[(theirs >= rank * nl) & (theirs < (rank + 1) * nl)]
        sends.append(owned - rank * nl)
    pieces = halo_pieces(cfg, n_blocks, world) if world > 1 else []
    (l_lo, l_hi), (r_lo, r_hi) = halo_range(cfg, n_blocks, world, rank)
    local = torch.arange(rank * nl, (rank + 1) * nl)

    # A query block is interior when its window (widest head) and its random blocks avoid the
    # halo: it can run while the halo is still in flight.
    reach_left, reach_right = cfg.reach_blocks
    win_lo = (local - reach_left).clamp(min=0)
    win_hi = (local + reach_right).clamp(max=n_blocks - 1)
    ok = (win_lo >= rank * nl) & (win_hi < (rank + 1) * nl)
    rand = cfg.random_rows(local, npat, n_heads, layer, step)  # [Hx, nl, r]
    in_halo = ((rand >= l_lo) & (rand < l_hi)) | ((rand >= r_lo) & (rand < r_hi))
    ok &= ~in_halo.any(dim=2).any(dim=0)
    interior, boundary = local[ok], local[~ok]

    left, right = torch.arange(l_lo, l_hi), torch.arange(r_lo, r_hi)
    # The interior reads the local blocks through its window and, through its random entries,
    # a small second buffer [remote random blocks | the local blocks they draw], so the kernel
    # never concatenates (copies) the whole local k / v with the random blocks.
    drawn = rand[:, ok].flatten()
    random_local = torch.unique(drawn[(drawn >= rank * nl) & (drawn < (rank + 1) * nl)])
    buf_random = torch.cat([mine, random_local])
    buf_interior = torch.cat([local, buf_random])
    reads = build_block_table(cfg, seq_len, n_heads, layer, step, boundary, None, npat)
    read = reads.index[reads.valid]
    read_local = torch.unique(read[(read >= rank * nl) & (read < (rank + 1) * nl)])
    buf_boundary = torch.cat([left, read_local, right, mine])
    t_int = t_bnd = None
    if interior.numel():
        t_int = build_block_table(
            cfg, seq_len, n_heads, layer, step, interior, _slots(n_blocks, local), npat,
            _slots(n_blocks, buf_random, offset=nl),
        )  # fmt: skip
    if boundary.numel():
        t_bnd = build_block_table(
            cfg, seq_len, n_heads, layer, step, boundary, _slots(n_blocks, buf_boundary), npat
        )
    halo_send = [p for p in pieces if p.src == rank]
    near = read_local - rank * nl
    edge = torch.unique(
        torch.cat([near, *(torch.arange(p.lo, p.hi) - rank * nl for p in halo_send)])
    )
    return RankPlan(
        rank=rank,
        halo_left=(l_lo, l_hi),
        halo_right=(r_lo, r_hi),
        random_blocks=mine,
        random_sources=sources,
        random_sends=sends,
        random_kind="pool" if cfg.random_pool_blocks else "random",
        random_in_group=any(n.numel() > 0 for n in needs),
        halo_recv=[p for p in pieces if p.dst == rank],
        halo_send=halo_send,
        halo_in_group=bool(pieces),
        interior=interior,
        boundary=boundary,
        table_interior=t_int,
        table_boundary=t_bnd,
        kpos_interior=_blocks_to_tokens(buf_interior, b),
        random_local=_blocks_to_tokens(random_local - rank * nl, b),
        kpos_boundary=_blocks_to_tokens(buf_boundary, b),
        edge_local=_blocks_to_tokens(edge, b),
        boundary_in_edge=_blocks_to_tokens(torch.searchsorted(edge, near), b),
        halo_send_in_edge=[
            int(torch.searchsorted(edge, torch.tensor(p.lo - rank * nl))) * b for p in halo_send
        ],
        runs=_runs(ok, b),
    )


def _runs(interior: torch.Tensor, block: int) -> list[tuple[int, bool]]:
    """Maximal runs of equal flags in `interior` [nl], as (tokens, flag)."""
    runs: list[tuple[int, bool]] = []
    for flag in interior.tolist():
        if runs and runs[-1][1] == flag:
            runs[-1] = (runs[-1][0] + block, flag)
        else:
            runs.append((block, flag))
    return runs


@dataclass
class FlexPlan:
    """One rank's work as a single FlexAttention call: every local query block over the
    buffer [halo-left | local | halo-right | received random blocks | zero blocks]."""

    table: BlockTable
    kpos: torch.Tensor
    """long: global token positions of the buffer (0 for the zero blocks, which no entry reads)."""
    pad_blocks: int
    """Zero blocks after the received random blocks: the random part is padded to a size that
    does not change with the step or layer (the pool's size, or else the next power of two),
    so the compiled kernel sees one shape."""
    kernel_plans: dict = field(default_factory=dict)
    """Head dim -> the kernel plan of a call without per-sample masks (with its BlockMask),
    filled on first use: one per (step, layer) for every micro-batch."""


@lru_cache(maxsize=64)
def flex_plan(
    cfg: SparsityConfig,
    seq_len: int,
    world: int,
    rank: int,
    n_heads: int,
    layer: int,
    step: int,
    pattern_len: int | None = None,
) -> FlexPlan:
    """The table of `rank`'s fused call, built once per (step, layer) like `rank_plan`."""
    plan = rank_plan(cfg, seq_len, world, rank, n_heads, layer, step, pattern_len)
    b = cfg.block_size
    n_blocks = seq_len // b
    nl = n_blocks // world
    (l_lo, l_hi), (r_lo, r_hi) = plan.halo_left, plan.halo_right
    local = torch.arange(rank * nl, (rank + 1) * nl)
    mine = plan.random_blocks
    buf = torch.cat([torch.arange(l_lo, l_hi), local, torch.arange(r_lo, r_hi), mine])
    n_random = mine.numel()
    bound = cfg.random_pool_blocks * (n_heads if cfg.random_per_head else 1)
    if n_random > bound:
        bound = 1 << (n_random - 1).bit_length()
    table = build_block_table(
        cfg, seq_len, n_heads, layer, step, local, _slots(n_blocks, buf),
        cfg.n_blocks(pattern_len or seq_len),
    )  # fmt: skip
    pad = max(0, bound - n_random)
    kpos = torch.cat([_blocks_to_tokens(buf, b), torch.zeros(pad * b, dtype=torch.long)])
    return FlexPlan(table=table, kpos=kpos, pad_blocks=pad)
