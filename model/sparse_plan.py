"""Which key blocks each query block reads: the block table the sparse kernel executes.

The table indexes a *key buffer*. On one device the buffer is the sequence itself; under
context parallelism (parallel/context_parallel.py) it is [halo-left | local | halo-right |
random blocks] and `key_block_slot` maps a global block id to its place in that buffer.
Global keys never enter the table: they are masked out of it and attended through a separate
global key set, which is how a key reachable by two rules counts once.

Legend: Hx = 1 or heads (per-head only with per-head dilation or random draws), nq = query
blocks, M = table entries per query block (window span, then random blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.sparse_pattern import SparsityConfig


@dataclass
class BlockTable:
    index: torch.Tensor
    """long [Hx, nq, M]: key-buffer block of each entry (0 where invalid)."""
    valid: torch.Tensor
    """bool [Hx, nq, M]: the entry is part of the pattern for this head."""
    dilation: torch.Tensor
    """long [Hx, 1, M]: a key of the entry is allowed iff (k_pos - q_pos) % dilation == 0
    (the window's dilation; 1 for random entries)."""
    window_entries: int = 0
    """The first `window_entries` of the M entries are the window's, the rest random draws."""
    band: torch.Tensor | None = None
    """long [Hx, 2] for a token window (attention.window_tokens), else None: a key of a
    *window* entry is allowed iff band[h, 0] <= k_pos - q_pos <= band[h, 1] (the kernel plan
    trims the entries' blocks to the band token by token; random entries are not trimmed)."""


@dataclass
class GlobalSet:
    positions: torch.Tensor
    """long [1 or batch, G]: global token positions (padded slots repeat a valid position)."""
    valid: torch.Tensor
    """bool [1 or batch, G]: the slot holds a real global token."""
    is_global: torch.Tensor
    """bool [1 or batch, seq]: token flags."""


def window_offsets(cfg: SparsityConfig, n_blocks: int) -> torch.Tensor:
    """Block offsets of the window entries: the widest head's reach, clipped to the sequence
    (a window wider than the sequence lists each block once)."""
    left, right = cfg.reach_blocks
    return torch.arange(-min(left, n_blocks - 1), min(right, n_blocks - 1) + 1)


def build_block_table(
    cfg: SparsityConfig,
    seq_len: int,
    n_heads: int,
    layer: int = 0,
    step: int = 0,
    q_blocks: torch.Tensor | None = None,
    key_block_slot: torch.Tensor | None = None,
    pattern_blocks: int | None = None,
    random_block_slot: torch.Tensor | None = None,
) -> BlockTable:
    """Table for the query blocks `q_blocks` (global ids; default all) of a `seq_len` sequence.

    key_block_slot: long [n_blocks], the buffer slot of each global key block (-1 = absent).
    pattern_blocks: the blocks of the true sequence when `seq_len` includes whole blocks of
    padding (context parallelism pads to cp x block): random draws stay inside it.
    random_block_slot: a separate slot map for the random entries (default key_block_slot).
    """
    n_blocks = seq_len // cfg.block_size
    if q_blocks is None:
        q_blocks = torch.arange(n_blocks)
    dilations = torch.tensor(cfg.head_dilations(n_heads))
    per_head = bool((dilations != dilations[0]).any()) or cfg.random_per_head
    heads = n_heads if per_head else 1

    reach = torch.tensor([cfg.window_reach_blocks(int(d)) for d in dilations[:heads]])
    offsets = window_offsets(cfg, n_blocks).view(1, 1, -1)
    win_blocks = q_blocks.view(1, -1, 1) + offsets  # [1, nq, S]
    in_reach = (offsets >= -reach[:, :1, None]) & (offsets <= reach[:, 1:, None])  # [Hx, 1, S]
    win_valid = in_reach & (win_blocks >= 0) & (win_blocks < n_blocks)  # [Hx, nq, S]
    win_blocks = win_blocks.expand(heads, -1, -1)

    rand = cfg.random_rows(q_blocks, pattern_blocks or n_blocks, n_heads, layer, step)
    rand = rand.expand(heads, -1, -1)
    rand_valid = rand >= 0

    n_win, n_rand = win_blocks.shape[2], rand.shape[2]
    valid = torch.cat([win_valid, rand_valid], dim=2)
    if key_block_slot is not None:
        rand_slot = key_block_slot if random_block_slot is None else random_block_slot
        win_blocks = key_block_slot[win_blocks.clamp(0, n_blocks - 1)]
        rand = rand_slot[rand.clamp(0, n_blocks - 1)]
        if bool((valid & (torch.cat([win_blocks, rand], dim=2) < 0)).any()):
            raise RuntimeError("a pattern key block is missing from the key buffer")
    blocks = torch.cat([win_blocks, rand], dim=2).clamp(min=0)
    if key_block_slot is None:
        blocks = blocks.clamp(max=n_blocks - 1)
    dil = torch.cat(
        [
            dilations[:heads].view(heads, 1, 1).expand(heads, 1, n_win),
            torch.ones(heads, 1, n_rand, dtype=torch.long),
        ],
        dim=2,
    )
    band = None
    if cfg.window_tokens:
        band = torch.tensor([cfg.window_band(int(d)) for d in dilations[:heads]])
    return BlockTable(
        index=blocks.contiguous(),
        valid=valid.contiguous(),
        dilation=dil,
        window_entries=n_win,
        band=band,
    )


def gather_global_positions(
    cfg: SparsityConfig,
    seq_len: int,
    global_mask: torch.Tensor | None,
    batch: int,
    pattern_len: int | None = None,
) -> GlobalSet:
    """The global tokens: the config's (those of a `pattern_len`-token sequence, default
    seq_len, the rest being padding), plus a per-sample `global_mask` [batch, seq]."""
    flags = torch.zeros(1, seq_len, dtype=torch.bool)
    flags[0, cfg.global_positions(pattern_len or seq_len)] = True
    if global_mask is not None:
        flags = flags | global_mask.bool().cpu()
    counts = flags.sum(dim=1)
    width = int(counts.max())
    # Stable sort puts the True positions first, in order; slots past a sample's count are
    # padding and repeat its first global position (or 0) so every index stays in range.
    order = torch.sort((~flags).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width).view(1, -1) < counts.view(-1, 1)
    first = torch.where(counts > 0, order[:, 0] if width else 0, 0).view(-1, 1)
    positions = torch.where(valid, order, first) if width else order
    return GlobalSet(positions=positions, valid=valid, is_global=flags)
