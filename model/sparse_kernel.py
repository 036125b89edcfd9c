"""The blocked pure-PyTorch sparse attention kernel (CPU, and the reference speed elsewhere).

Forward walks the query blocks in chunks: gather the key/value blocks of the block table,
one batched matmul for the scores, one softmax over [table keys | global keys], one matmul
back. Nothing of size seq x seq is ever made. The autograd Function saves only its inputs,
the output and the row log-sum-exp, and recomputes the scores chunk by chunk in backward
(FlashAttention's trick), so memory stays linear in the sequence length.

Legend: B batch, H heads, Hx 1 or heads, nq / nk query / key-buffer blocks, b block size,
C query blocks in a chunk, M table entries per query block, G global keys, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from model.sparse_plan import BlockTable, build_block_table, gather_global_positions

if TYPE_CHECKING:
    from model.sparse_pattern import SparsityConfig

# Score elements per chunk: large enough for efficient batched matmuls, small enough to stay
# in cache-friendly, bounded memory (4 MiB of fp32 scores).
_CHUNK_SCORES = 1 << 20


@dataclass
class KernelPlan:
    table: BlockTable
    static_blocked: torch.Tensor
    """bool [Hx, nq, b, M*b], True = masked out: invalid entries, dilation, the token window's
    band, causality and keys blocked for every sample (shared global keys, attended through
    the global set)."""
    sample_blocked: torch.Tensor | None
    """bool [B, nk*b] keys blocked per sample (padding, per-sample globals), or None."""
    global_blocked: torch.Tensor
    """bool [1 or B, nq, b, G], True = global key g is masked out for the query."""
    block: int
    scale: float
    static_any: torch.Tensor | None = None
    """bool [nq]: some entry of the query block is masked in static_blocked (any head)."""
    global_any: torch.Tensor | None = None
    """bool [nq]: some global key is masked for the query block (any sample)."""
    block_mask: Any = None
    """The FlexAttention BlockMask of this plan, made on first use (model/sparse_flex.py)."""

    def __post_init__(self) -> None:
        # Most query blocks of a pattern mask nothing: their chunks skip the masked_fill.
        if self.static_any is None:
            self.static_any = self.static_blocked.any(dim=(2, 3)).any(dim=0).cpu()
        if self.global_any is None:
            self.global_any = self.global_blocked.any(dim=(2, 3)).any(dim=0).cpu()

    def to(self, device: torch.device | str) -> KernelPlan:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        table = BlockTable(
            move(self.table.index),
            move(self.table.valid),
            move(self.table.dilation),
            self.table.window_entries,
            move(self.table.band),
        )
        return KernelPlan(
            table,
            move(self.static_blocked),
            move(self.sample_blocked),
            move(self.global_blocked),
            self.block,
            self.scale,
            self.static_any,
            self.global_any,
        )


def make_plan(
    table: BlockTable,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_blocked: torch.Tensor,
    g_pos: torch.Tensor,
    g_valid: torch.Tensor,
    causal: bool,
    block: int,
    head_dim: int,
) -> KernelPlan:
    """q_pos [nq*b] / k_pos [nk*b]: global positions of the queries and of the key buffer;
    key_blocked [1 or B, nk*b]: keys table entries must skip; g_pos / g_valid [1 or B, G]."""
    nq, nk = q_pos.numel() // block, k_pos.numel() // block
    hx, _, m = table.index.shape
    mask = table.valid[:, :, None, :, None].expand(hx, nq, block, m, block).clone()
    needs_dilation = bool((table.dilation > 1).any())
    if causal or needs_dilation or table.band is not None:
        kpos_tbl = k_pos.to(torch.int32).view(nk, block)[table.index]  # [Hx, nq, M, b]
        diff = kpos_tbl.unsqueeze(2) - q_pos.to(torch.int32).view(1, nq, block, 1, 1)
        if needs_dilation:
            mask &= diff.remainder(table.dilation[:, :, None, :, None].to(torch.int32)) == 0
        if table.band is not None:  # the token window: its entries trimmed to the band
            w = table.window_entries
            lo, hi = (table.band[:, i].view(-1, 1, 1, 1, 1).to(torch.int32) for i in (0, 1))
            mask[:, :, :, :w] &= (diff[:, :, :, :w] >= lo) & (diff[:, :, :, :w] <= hi)
        if causal:
            mask &= diff <= 0
    shared_blocked = key_blocked.all(dim=0)
    mask &= ~shared_blocked.view(nk, block)[table.index].unsqueeze(2)
    static = mask.flatten(3)
    per_sample = key_blocked & ~shared_blocked
    sample_blocked = key_blocked if bool(per_sample.any()) else None
    gmask = g_valid[:, None, None, :].expand(-1, nq, block, -1)
    if causal:
        gmask = gmask & (g_pos[:, None, None, :] <= q_pos.view(1, nq, block, 1))
    return KernelPlan(
        table=table,
        static_blocked=~static,
        sample_blocked=sample_blocked,
        global_blocked=~gmask,
        block=block,
        scale=1.0 / math.sqrt(head_dim),
    )


def _gather_blocks(x_blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x_blocks [B, H, nk, b, D], index [Hx, C, M] -> [B, H, C, M*b, D]."""
    batch, heads, nk, b, dim = x_blocks.shape
    hx, c, m = index.shape
    if hx == 1:
        out = x_blocks.index_select(2, index.flatten())
    else:
        offsets = (torch.arange(heads, device=index.device) * nk).view(heads, 1, 1)
        flat = x_blocks.reshape(batch, heads * nk, b, dim)
        out = flat.index_select(1, (index + offsets).flatten())
    return out.view(batch, heads, c, m * b, dim)


def _scatter_blocks(grad_blocks: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """grad_blocks [B, H, nk, b, D] += values [B, H, C, M*b, D] at the blocks of index."""
    batch, heads, nk, b, dim = grad_blocks.shape
    hx, c, m = index.shape
    if hx == 1:
        grad_blocks.index_add_(2, index.flatten(), values.reshape(batch, heads, c * m, b, dim))
    else:
        offsets = (torch.arange(heads, device=index.device) * nk).view(heads, 1, 1)
        flat = grad_blocks.view(batch, heads * nk, b, dim)
        rows = values.reshape(batch, heads * c * m, b, dim)
        flat.index_add_(1, (index + offsets).flatten(), rows)


def _gather_kv(kb, vb, rkb, rvb, idx, split: int):
    """Key/value blocks of the table entries idx [Hx, C, M] -> [B, H, C, M*b, D] each. With a
    second buffer (rkb / rvb), entries from `split` on index the virtual buffer [kb | rkb]
    and are read from rkb directly, so kb is never concatenated with it (a full copy)."""
    if rkb is None:
        return _gather_blocks(kb, idx), _gather_blocks(vb, idx)
    win, rand = idx[..., :split], (idx[..., split:] - kb.shape[2]).clamp(min=0)
    k = torch.cat([_gather_blocks(kb, win), _gather_blocks(rkb, rand)], dim=3)
    v = torch.cat([_gather_blocks(vb, win), _gather_blocks(rvb, rand)], dim=3)
    return k, v


def _scatter_kv(dk, drk, idx, split: int, values) -> None:
    """dk (and drk, as in _gather_kv) += values [B, H, C, M*b, D] at the entries idx."""
    if drk is None:
        _scatter_blocks(dk, idx, values)
        return
    b = dk.shape[3]
    win_values, rand_values = values.split([split * b, values.shape[3] - split * b], dim=3)
    _scatter_blocks(dk, idx[..., :split].contiguous(), win_values)
    rand = (idx[..., split:] - dk.shape[2]).clamp(min=0).contiguous()
    _scatter_blocks(drk, rand, rand_values)


def _chunk_blocked(plan: KernelPlan, c0: int, c1: int) -> torch.Tensor:
    blocked = plan.static_blocked[:, c0:c1].unsqueeze(0)  # [1, Hx, C, b, M*b]
    if plan.sample_blocked is None:
        return blocked
    nk = plan.sample_blocked.shape[1] // plan.block
    idx = plan.table.index[:, c0:c1]  # [Hx, C, M]
    per_sample = plan.sample_blocked.view(-1, nk, plan.block)[:, idx]  # [B, Hx, C, M, b]
    return blocked | per_sample.flatten(3).unsqueeze(3)


def _chunk_scores(q_chunk, kg, gk, plan, c0, c1):
    """Masked scores of one chunk: table part [B, H, C, b, M*b], global part [B, H, C, b, G]."""
    s = q_chunk @ kg.transpose(-1, -2)
    assert plan.static_any is not None and plan.global_any is not None
    if plan.sample_blocked is not None or bool(plan.static_any[c0:c1].any()):
        s.masked_fill_(_chunk_blocked(plan, c0, c1), -math.inf)
    sg = q_chunk @ gk.unsqueeze(2).transpose(-1, -2)
    if sg.shape[-1] and bool(plan.global_any[c0:c1].any()):
        sg.masked_fill_(plan.global_blocked[:, None, c0:c1], -math.inf)
    return s, sg


def _chunk_size(batch, heads, nq, b, m, g) -> int:
    return max(1, min(nq, _CHUNK_SCORES // max(1, batch * heads * b * (m * b + g))))


def _safe(lse: torch.Tensor) -> torch.Tensor:
    # A row with no allowed key has lse -inf; subtracting 0 instead keeps exp() at exactly 0.
    return lse.masked_fill(lse.isinf(), 0.0)


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B, H, n*b, D] -> [B, H, n, b, D]."""
    batch, heads, n, dim = x.shape
    return x.view(batch, heads, n // b, b, dim)


def _forward(q, k, v, gk, gv, plan: KernelPlan, rk=None, rv=None):
    batch, heads, n_q, dim = q.shape
    b = plan.block
    nq = n_q // b
    m = plan.table.index.shape[2]
    split = plan.table.window_entries
    qb = q.view(batch, heads, nq, b, dim)
    kb, vb = _blocks(k, b), _blocks(v, b)
    rkb = None if rk is None else _blocks(rk, b)
    rvb = None if rv is None else _blocks(rv, b)
    out = torch.empty_like(qb)
    lse = torch.empty(batch, heads, nq, b, dtype=q.dtype, device=q.device)
    gv5 = gv.unsqueeze(2)
    step = _chunk_size(batch, heads, nq, b, m, gk.shape[2])
    for c0 in range(0, nq, step):
        c1 = min(nq, c0 + step)
        idx = plan.table.index[:, c0:c1]
        kg, vg = _gather_kv(kb, vb, rkb, rvb, idx, split)
        s, sg = _chunk_scores(qb[:, :, c0:c1] * plan.scale, kg, gk, plan, c0, c1)
        row_max = torch.maximum(s.amax(-1), sg.amax(-1)) if sg.shape[-1] else s.amax(-1)
        row_max = _safe(row_max)
        p = s.sub_(row_max.unsqueeze(-1)).exp_()
        pg = sg.sub_(row_max.unsqueeze(-1)).exp_()
        total = p.sum(-1) + pg.sum(-1)
        chunk_lse = row_max + torch.log(total)
        inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total)).unsqueeze(-1)
        out[:, :, c0:c1] = (p @ vg + pg @ gv5) * inv
        lse[:, :, c0:c1] = chunk_lse
    return out.view(batch, heads, n_q, dim), lse.view(batch, heads, n_q)


def _backward(q, k, v, gk, gv, out, lse, d_out, plan: KernelPlan, rk=None, rv=None):
    batch, heads, n_q, dim = q.shape
    b = plan.block
    nq = n_q // b
    m = plan.table.index.shape[2]
    split = plan.table.window_entries
    qb = q.view(batch, heads, nq, b, dim)
    kb, vb = _blocks(k, b), _blocks(v, b)
    rkb = None if rk is None else _blocks(rk, b)
    rvb = None if rv is None else _blocks(rv, b)
    dob = d_out.reshape(batch, heads, nq, b, dim)
    delta = (dob * out.view(batch, heads, nq, b, dim)).sum(-1)  # [B, H, nq, b]
    lse_b = _safe(lse.view(batch, heads, nq, b))
    dq = torch.empty_like(qb)
    dk = torch.zeros_like(kb)
    dv = torch.zeros_like(vb)
    drk = drv = None
    if rkb is not None and rvb is not None:
        drk, drv = torch.zeros_like(rkb), torch.zeros_like(rvb)
    dgk = torch.zeros_like(gk)
    dgv = torch.zeros_like(gv)
    gv5, gk5 = gv.unsqueeze(2), gk.unsqueeze(2)
    step = _chunk_size(batch, heads, nq, b, m, gk.shape[2])
    for c0 in range(0, nq, step):
        c1 = min(nq, c0 + step)
        idx = plan.table.index[:, c0:c1]
        kg, vg = _gather_kv(kb, vb, rkb, rvb, idx, split)
        q_chunk = qb[:, :, c0:c1] * plan.scale
        s, sg = _chunk_scores(q_chunk, kg, gk, plan, c0, c1)
        row_lse = lse_b[:, :, c0:c1].unsqueeze(-1)
        p, pg = s.sub_(row_lse).exp_(), sg.sub_(row_lse).exp_()
        do = dob[:, :, c0:c1]
        row_delta = delta[:, :, c0:c1].unsqueeze(-1)
        ds = (do @ vg.transpose(-1, -2)).sub_(row_delta).mul_(p)
        dsg = (do @ gv5.transpose(-1, -2)).sub_(row_delta).mul_(pg)
        dq[:, :, c0:c1] = (ds @ kg + dsg @ gk5) * plan.scale
        _scatter_kv(dk, drk, idx, split, ds.transpose(-1, -2) @ q_chunk)
        _scatter_kv(dv, drv, idx, split, p.transpose(-1, -2) @ do)
        rows = (c1 - c0) * b
        dgk += dsg.reshape(batch, heads, rows, -1).transpose(-1, -2) @ q_chunk.reshape(
            batch, heads, rows, dim
        )
        dgv += pg.reshape(batch, heads, rows, -1).transpose(-1, -2) @ do.reshape(
            batch, heads, rows, dim
        )
    d_rand: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if drk is not None and drv is not None:
        d_rand = (drk.view_as(rk), drv.view_as(rv))
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dgk, dgv, *d_rand


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gk, gv, plan, rk, rv):  # type: ignore[override]
        q, k, v, gk, gv = (t.contiguous() for t in (q, k, v, gk, gv))
        if rk is not None:
            rk, rv = rk.contiguous(), rv.contiguous()
        out, lse = _forward(q, k, v, gk, gv, plan, rk, rv)
        ctx.save_for_backward(q, k, v, gk, gv, out, lse, rk, rv)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):  # type: ignore[override]
        q, k, v, gk, gv, out, lse, rk, rv = ctx.saved_tensors
        grads = _backward(q, k, v, gk, gv, out, lse, d_out.contiguous(), ctx.plan, rk, rv)
        return (*grads[:5], None, *grads[5:])


def block_sparse_attention(q, k, v, gk, gv, plan: KernelPlan, rk=None, rv=None):
    """Attention of every query of q [B, H, nq*b, D] over its table blocks of the key buffer
    k / v [B, H, nk*b, D] and the global keys gk / gv [B, H, G, D], one softmax over both.
    With rk / rv [B, H, nr*b, D] the key buffer is [k | rk] (as the table and the plan's key
    positions index it) and the random entries (from table.window_entries on) read only rk:
    a small buffer of random blocks need not be concatenated with a large local one.
    Returns (out [B, H, nq*b, D], lse [B, H, nq*b]); differentiable in q, k, v, gk, gv
    (and rk, rv)."""
    return _BlockSparseAttention.apply(q, k, v, gk, gv, plan, rk, rv)


def global_query_attention(q_glob, k, v, g_pos, k_pos, key_valid, causal: bool, need_lse=True):
    """Global queries q_glob [B, H, G, D] at positions g_pos [1 or B, G] over every key of
    k / v [B, H, Nk, D] at positions k_pos [Nk]; key_valid [1 or B, Nk] or None; the
    positions and key_valid are host tensors (plan metadata).
    Returns (out, lse) so that partial results over key shards merge exactly; with
    need_lse=False lse is None and the fused SDPA kernel does the work."""
    allowed = None  # built on the host (plan metadata), so that reading it is no device sync
    if key_valid is not None:
        allowed = key_valid.cpu()[:, None, None, :]
    if causal:
        ordered = k_pos.cpu().view(1, 1, 1, -1) <= g_pos.cpu()[:, None, :, None]
        allowed = ordered if allowed is None else allowed & ordered
    every_row_has_a_key = allowed is None or bool(allowed.any(-1).all())
    if allowed is not None:
        allowed = allowed.to(k.device, non_blocking=True)
    if not need_lse and every_row_has_a_key:
        # SDPA's convention for a row with no allowed key differs; such rows take the path below.
        return F.scaled_dot_product_attention(q_glob, k, v, attn_mask=allowed), None
    scale = 1.0 / math.sqrt(q_glob.shape[-1])
    s = (q_glob * scale) @ k.transpose(-1, -2)  # [B, H, G, Nk]
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _safe(lse).unsqueeze(-1))
    return p @ v, lse


def count_allowed_pairs(cfg: SparsityConfig, seq_len: int, n_heads: int, layer: int, step: int):
    """Exact number of attended (query, key) pairs over all heads, in O(seq) memory; any
    length (a partial last block is padded with keys nobody attends, as sparse_attention does)."""
    cfg.validate_seq_len(seq_len)
    b = cfg.block_size
    padded_len = cfg.n_blocks(seq_len) * b
    table = build_block_table(cfg, padded_len, n_heads, layer, step)
    glob = gather_global_positions(cfg, padded_len, None, 1, pattern_len=seq_len)
    pos = torch.arange(padded_len)
    pad = pos >= seq_len
    plan = make_plan(
        table,
        pos,
        pos,
        glob.is_global | pad.view(1, -1),
        glob.positions,
        glob.valid & ~pad[glob.positions],
        cfg.causal,
        b,
        1,
    )
    per_row = (~plan.static_blocked).flatten(1, 2).sum(-1)
    per_row = per_row + (~plan.global_blocked).flatten(1, 2).sum(-1)
    per_row = per_row.expand(n_heads, -1) if per_row.shape[0] == 1 else per_row
    is_global = glob.is_global[0]
    full = (pos + 1).clamp(max=seq_len) if cfg.causal else torch.full_like(pos, seq_len)
    per_row = torch.where(is_global.view(1, -1), full.view(1, -1), per_row)
    return int(per_row[:, :seq_len].sum())
