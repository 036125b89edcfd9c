"""The random-block draw of BigBird-style attention: counter-based, per row, O(rows x r).

Each non-global query block I draws `r` distinct key blocks, uniformly, from its *candidates*:
the non-global blocks of a candidate set outside I's window reach [I - left, I + right]
(causal: only blocks before the reach). The candidate set is either every block of the
sequence (BigBird's draw; under context parallelism a rank then needs about r remote blocks
per local query block, traffic O(N/P)) or a *pool* of `pool_blocks` blocks drawn per
(seed, step, layer[, head]) and known to every rank (traffic flat in N; parallel/cp_plan.py).

Nothing here is of size n_blocks x n_blocks: a row's draw is a pure function of
(key, row), where key = hash(seed, step, layer, head), computed with a 32-bit integer hash in
int64 arithmetic, so any rank can compute any row's draw (its own rows to plan its queries,
other ranks' rows to know what to send) without asking and without drawing the others.
Sampling r distinct candidates uses Floyd's algorithm (uniform over r-subsets).

Legend: nq = query-block rows drawn, r = random blocks per row, p = pool size.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (lowbias32) of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hash32(key: int, row: torch.Tensor, lane: int) -> torch.Tensor:
    """Uniform 32-bit values (int64 in [0, 2^32)) for counter (row, lane) under a 64-bit key."""
    lo, hi = key & _M32, (key >> 32) & _M32
    x = (row.to(torch.int64) * 0x9E3779B1 + lane * 0x85EBCA77 + lo) & _M32
    return _mix32(_mix32(x) ^ hi)


def below(h: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Map 32-bit hashes h to integers in [0, n) (n >= 1) by multiply-shift (Lemire)."""
    return (h * n) >> 32


def choose_distinct(key: int, rows: torch.Tensor, count: torch.Tensor, r: int) -> torch.Tensor:
    """For each row, min(r, count) distinct indices drawn uniformly from [0, count), then -1.

    rows [nq] (the hash counters), count [nq] -> long [nq, r]. Floyd's algorithm: for
    j = count - r .. count - 1, take t uniform in [0, j]; keep t unless already taken, else j.
    Rows with count <= r take every index."""
    nq = rows.numel()
    out = torch.full((nq, r), -1, dtype=torch.long)
    if r == 0 or nq == 0:
        return out
    few = count <= r
    lanes = torch.arange(r).view(1, -1)
    out = torch.where(few.view(-1, 1) & (lanes < count.view(-1, 1)), lanes, out)
    for m in range(r):
        j = count - r + m  # >= 0 on the rows that use it
        t = below(hash32(key, rows, m), (j + 1).clamp(min=1))
        taken = (out[:, :m] == t.view(-1, 1)).any(dim=1)
        pick = torch.where(taken, j, t)
        out[:, m] = torch.where(few, out[:, m], pick)
    return out


def pool_blocks(key: int, candidates: torch.Tensor, n_blocks: int, pool: int) -> torch.Tensor:
    """A stratified pool: the sequence's blocks cut into `pool` equal strata, one uniform pick
    among the candidate (non-global) blocks of each stratum; strata without a candidate are
    skipped. When `pool` divides into the ranks' slices, every cp rank owns the same number of
    pool blocks (pool / P), so the pool's traffic is the same on every rank and for every N.
    candidates: sorted long [c] -> sorted long [<= pool]."""
    if pool >= n_blocks:
        return candidates.clone()
    strata = torch.arange(pool)
    edges = (torch.arange(pool + 1) * n_blocks) // pool  # stratum s = blocks [edges[s], edges[s+1])
    first = torch.searchsorted(candidates, edges[:-1])
    last = torch.searchsorted(candidates, edges[1:])
    count = last - first
    keep = count > 0
    pick = first + below(hash32(key, strata, 0), count.clamp(min=1))
    return candidates[pick[keep]]


def draw_rows(
    key: int,
    rows: torch.Tensor,
    candidates: torch.Tensor,
    reach_lo: torch.Tensor,
    reach_hi: torch.Tensor,
    r: int,
) -> torch.Tensor:
    """Random key blocks of the query-block rows `rows` [nq]: r distinct blocks per row from
    the sorted `candidates` [c] outside [reach_lo, reach_hi] (inclusive, per row), -1 where
    fewer exist. long [nq, r]."""
    a = torch.searchsorted(candidates, reach_lo)  # candidates before the reach: [0, a)
    b = torch.searchsorted(candidates, reach_hi, right=True)  # after it: [b, c)
    count = a + (candidates.numel() - b)
    picks = choose_distinct(key, rows, count, r)
    if candidates.numel() == 0:
        return picks
    index = torch.where(picks < a.view(-1, 1), picks, picks - a.view(-1, 1) + b.view(-1, 1))
    blocks = candidates[index.clamp(0, candidates.numel() - 1)]
    return torch.where(picks >= 0, blocks, -1)
