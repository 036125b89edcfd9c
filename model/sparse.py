"""Block-sparse attention of the BigBird / Longformer family: the pattern and the public entry.

    from model.sparse import SparsityConfig, sparse_attention
    cfg = SparsityConfig(block_size=64, window_blocks=3, global_blocks=2, random_blocks=3)
    out = sparse_attention(q, k, v, cfg, layer=0)     # q, k, v: [batch, heads, seq, head_dim]
    mask = cfg.dense_mask(seq_len, layer=0)            # the exact pattern, [heads or 1, seq, seq]

The rule, for query token i and key token j (blocks I = i // b, J = j // b):

    allowed(i, j) = (window(i, j) or random(I, J) or global(i) or global(j))
                    and (j <= i if causal) and not padded(j)

- window: (j - i) % d == 0, with d the head's dilation, and
  - token window (window_tokens = w > 0): bidirectional |i - j| <= (w / 2) * d (w even),
    causal 0 <= i - j < w * d;
  - block window (window_tokens = 0): J - I in [-left * d, right * d]; bidirectional
    left = right = (window_blocks - 1) / 2, causal left = window_blocks - 1, right = 0.
- global: the ITC blocks (bidirectional: the first ceil(g/2) and last floor(g/2) blocks;
  causal: the first g blocks, a visible prefix), explicit `global_tokens`, the `etc_tokens`
  extra leading tokens, and a per-sample `global_mask`. A global query sees every key (still
  causal in causal models); a global key is seen by every query.
- random: each non-global query block sees `random_blocks` key blocks drawn outside the window
  (of every head, or of its own head with `random_per_head`) and outside the ITC blocks; causal
  draws only from blocks before the window. The draw is a pure function of
  (seed, step, layer[, head]) so every rank can recompute every other rank's choice.
A key reachable by two rules counts once. `dense_mask` is built from this rule directly and,
with dense attention, is the oracle for every test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.sparse_kernel import (
    block_sparse_attention,
    count_allowed_pairs,
    global_query_attention,
    make_plan,
)
from model.sparse_pattern import SparsityConfig
from model.sparse_plan import build_block_table, gather_global_positions

__all__ = [
    "SparsityConfig",
    "count_pairs",
    "sparse_attention",
    "dense_attention",
    "reference_attention",
    "pad_masks",
]


def count_pairs(
    cfg: SparsityConfig, seq_len: int, n_heads: int = 1, layer: int = 0, step: int = 0
) -> int:
    """Attended (query, key) pairs of `cfg` summed over heads, without an N x N tensor."""
    return count_allowed_pairs(cfg, seq_len, n_heads, layer, step)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Softmax attention over a dense bool mask; a row with no allowed key gives zeros.
    The reference every sparse and parallel path is tested against."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: SparsityConfig,
    layer: int = 0,
    step: int = 0,
    padding_mask: torch.Tensor | None = None,
    global_mask: torch.Tensor | None = None,
    global_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The oracle: dense attention over `cfg.dense_mask` (and the padding), O(seq^2). With
    `global_qkv` the rows of the global queries are dense attention of its q over its k and v
    (their mask rows are every key: a global query sees them all)."""
    seq_len = q.shape[2]
    mask = cfg.dense_mask(
        seq_len, layer=layer, step=step, global_mask=global_mask, n_heads=q.shape[1]
    )
    if padding_mask is not None:
        mask = mask if mask.dim() == 4 else mask.unsqueeze(0)
        mask = mask & ~padding_mask.bool()[:, None, None, :]
    out = dense_attention(q, k, v, mask)
    if global_qkv is None:
        return out
    batch = q.shape[0] if global_mask is None else global_mask.shape[0]
    is_global = gather_global_positions(cfg, seq_len, global_mask, batch).is_global
    rows = dense_attention(*global_qkv, mask)
    return torch.where(is_global.to(out.device)[:, None, :, None], rows, out)


def _check_inputs(q, k, v, padding_mask, global_mask) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k and v must have the same shape [batch, heads, seq, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, m in (("padding_mask", padding_mask), ("global_mask", global_mask)):
        if m is not None and tuple(m.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(
                f"{name} must be [batch, seq] = {(q.shape[0], q.shape[2])}; got {tuple(m.shape)}"
            )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: SparsityConfig,
    layer: int = 0,
    step: int = 0,
    padding_mask: torch.Tensor | None = None,
    global_mask: torch.Tensor | None = None,
    backend: str = "auto",
    global_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact block-sparse attention on one device; memory and time linear in seq. Any length:
    a partial last block is padded inside and its pad keys masked.

    q, k, v: [batch, heads, seq, head_dim]. padding_mask: [batch, seq] bool, True = padded
    key (never attended). global_mask: [batch, seq] bool, True = global token of that sample.
    backend: "auto" (FlexAttention on CUDA, the blocked kernel elsewhere), "flex" or "blocked".
    global_qkv: Longformer's separate global projections (q, k, v of the same shape): the
    global queries' rows are then softmax(q_g k_g^T) v_g over every key; None: q, k, v.
    """
    if backend not in ("auto", "flex", "blocked"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'flex' or 'blocked'")
    _check_inputs(q, k, v, padding_mask, global_mask)
    if global_qkv is not None and any(t.shape != q.shape for t in global_qkv):
        raise ValueError("global_qkv must be three tensors of the shape of q, k and v")
    batch, n_heads, seq_len, _ = q.shape
    cfg.validate_seq_len(seq_len)
    padded_len = cfg.n_blocks(seq_len) * cfg.block_size
    if padded_len != seq_len:
        # The last block is partial: pad it with keys nobody may attend, drop the pad queries.
        pad = padded_len - seq_len
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if global_qkv is not None:
            qg, kg, vg = (F.pad(t, (0, 0, 0, pad)) for t in global_qkv)
            global_qkv = (qg, kg, vg)
        padding_mask, global_mask = pad_masks(padding_mask, global_mask, seq_len, padded_len, batch)
        out = sparse_attention(
            q, k, v, cfg, layer, step, padding_mask, global_mask, backend, global_qkv
        )
        return out[:, :, :seq_len]
    glob = gather_global_positions(cfg, seq_len, global_mask, batch)
    positions = torch.arange(seq_len)
    key_valid = None if padding_mask is None else ~padding_mask.bool().cpu()
    if backend == "flex" or (backend == "auto" and q.is_cuda):
        from model.sparse_flex import flex_sparse_attention

        out = flex_sparse_attention(q, k, v, cfg, layer, step, padding_mask, global_mask)
        if global_qkv is None or glob.positions.shape[-1] == 0:
            return out
        return _global_rows(out, *global_qkv, glob, positions, key_valid, cfg.causal)
    table = build_block_table(cfg, seq_len, n_heads, layer, step)
    key_blocked = glob.is_global
    if key_valid is not None:
        key_blocked = key_blocked | ~key_valid
    g_valid = glob.valid
    if key_valid is not None:
        g_valid = g_valid & key_valid.gather(1, glob.positions.expand(batch, -1))
    plan = make_plan(
        table,
        positions,
        positions,
        key_blocked,
        glob.positions,
        g_valid,
        cfg.causal,
        cfg.block_size,
        q.shape[-1],
    )
    if q.device.type != "cpu":
        plan = plan.to(q.device)  # host metadata, copied once
    gk, gv = _gather_rows(k, glob.positions), _gather_rows(v, glob.positions)
    out, _ = block_sparse_attention(q, k, v, gk, gv, plan)
    if glob.positions.shape[-1] == 0:
        return out
    qg, kg, vg = (q, k, v) if global_qkv is None else global_qkv
    return _global_rows(out, qg, kg, vg, glob, positions, key_valid, cfg.causal)


def _global_rows(out, qg, kg, vg, glob, positions, key_valid, causal: bool) -> torch.Tensor:
    """`out` with the rows of the global queries replaced by their attention over every key:
    queries of qg at the global positions, keys kg, values vg."""
    q_glob = _gather_rows(qg, glob.positions)
    g_out, _ = global_query_attention(
        q_glob, kg, vg, glob.positions, positions, key_valid, causal, need_lse=False
    )
    return _scatter_rows(out, g_out, glob.positions, glob.valid)


def pad_masks(
    padding_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    true_len: int,
    padded_len: int,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [batch, true_len] (or already [batch, padded_len]) masks of a sequence padded to
    `padded_len`: the keys past `true_len` are padding, and none of them is global."""
    pad = padded_len - true_len
    if padding_mask is None:
        padding_mask = torch.zeros(batch, true_len, dtype=torch.bool)
    padding_mask = F.pad(padding_mask.bool()[:, :true_len], (0, pad), value=True)
    if global_mask is not None:
        global_mask = F.pad(global_mask.bool()[:, :true_len], (0, pad))
    return padding_mask, global_mask


def _gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], positions [B or 1, G] -> [B, H, G, D]."""
    batch, heads, _, dim = x.shape
    idx = positions.to(x.device).expand(batch, -1)[:, None, :, None]
    return x.gather(2, idx.expand(batch, heads, -1, dim))


def _scatter_rows(
    out: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Replace the global query rows of `out` with `rows`; padded slots write nothing."""
    batch, heads, seq_len, dim = out.shape
    idx = positions.to(out.device).expand(batch, -1)[:, None, :, None]
    idx = idx.expand(batch, heads, -1, dim)
    keep = valid.to(out.device).expand(batch, -1)[:, None, :, None]
    placed = torch.zeros_like(out).scatter_add(2, idx, rows * keep)
    # Counting (not assigning) keeps padded slots, which repeat a position, from erasing a flag.
    hits = torch.zeros(batch, seq_len, device=out.device)
    hits.scatter_add_(1, positions.to(out.device).expand(batch, -1), keep[:, 0, :, 0].float())
    return torch.where(hits[:, None, :, None] > 0, placed, out)
