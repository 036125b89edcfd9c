"""Sequence-parallel (context-parallel) block-sparse attention, exact against one device.

    from parallel.context_parallel import cp_sparse_attention
    out_local = cp_sparse_attention(q_local, k_local, v_local, cfg, group, layer=0, step=0,
                                    padding_mask=None, global_mask=None, traffic=None)

Rank r of the cp group holds the contiguous tokens [r*n, (r+1)*n) of q, k, v
([batch, heads, n, head_dim], n = seq / P, a multiple of the block size); padding_mask and
global_mask are the FULL [batch, seq] masks, the same on every rank. The result is this rank's
slice of `sparse_attention` on the whole sequence, forward and backward. Check it with
`python -m parallel.verify --config configs/X.yaml --cp 4`; the algorithm and its traffic are
in docs/context_parallel.md:

1. global rows (q, k, v of the global tokens) -> all-reduce of zero-filled contributions;
2. random key blocks outside the window reach -> one all-to-all(-v);
3. window halo -> non-blocking P2P; the interior query blocks (and the global queries' partial
   softmax over the local keys) are computed while it travels, then the boundary blocks;
4. global queries: per-rank partials merged exactly by log-sum-exp (one all-reduce), the owner
   writes the rows.
Legend: B batch, H heads, n local tokens, D head dim, G global slots.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model.sparse import SparsityConfig, pad_masks
from model.sparse_flex import flex_block_attention
from model.sparse_kernel import block_sparse_attention, make_plan
from model.sparse_plan import GlobalSet, gather_global_positions
from parallel.cp_check import check_call, describe, local_problem
from parallel.cp_comm import (
    CPComm,
    all_reduce_sum,
    attach_token,
    halo_exchange,
    random_exchange,
    token_grad,
)
from parallel.cp_plan import flex_plan, rank_plan
from parallel.traffic import TrafficCounter, all_reduce_bytes

__all__ = ["cp_sparse_attention", "pad_for_cp"]


def cp_sparse_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    cfg: SparsityConfig,
    group: dist.ProcessGroup | None = None,
    layer: int = 0,
    step: int = 0,
    padding_mask: torch.Tensor | None = None,
    global_mask: torch.Tensor | None = None,
    traffic: TrafficCounter | None = None,
    overlap: bool = True,
    seq_len: int | None = None,
    backend: str = "auto",
    global_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """This rank's slice [B, H, n, D] of exact sparse attention over the whole sequence.

    overlap=False waits for the halo before any compute (same result; for measuring what the
    overlap hides, benchmarks/cp_overlap.py).

    seq_len: the true length of a sequence that the caller padded to a multiple of
    P x block_size (`pad_for_cp`); the positions past it are masked keys and their outputs
    are meaningless; the pattern (global blocks, random draws) is that of `seq_len` tokens.
    The masks may then be [batch, seq_len] or [batch, padded length].

    backend: "auto" (FlexAttention on CUDA, the blocked kernel elsewhere), "flex" (one fused
    call per rank over the whole key buffer, after the halo has arrived) or "blocked".

    global_qkv: this rank's slices of Longformer's separate global projections (as q, k, v):
    the global queries then attend every key through them (`sparse_attention`'s global_qkv).

    group: the cp process group (None = WORLD; without torch.distributed initialised, one
    rank). Raises ValueError on every rank (not a hang) for impossible or mismatched arguments.
    """
    if backend not in ("auto", "flex", "blocked"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'flex' or 'blocked'")
    comm = CPComm.create(group, traffic, layer)
    padded_len = q_local.shape[2] * comm.world if q_local.dim() == 4 else 0
    pattern_len = padded_len if seq_len is None else seq_len
    padding_mask, global_mask = _pad_masks(padding_mask, global_mask, pattern_len, padded_len)
    problem = local_problem(
        q_local, k_local, v_local, cfg, comm.world, padding_mask, global_mask, pattern_len
    )
    if problem is None and global_qkv is not None:
        if any(t.shape != q_local.shape for t in global_qkv):
            problem = "global_qkv must be three tensors of the shape of q, k and v"
    check_call(
        comm, problem, describe(q_local, cfg, comm.world, padding_mask, global_mask, pattern_len)
    )
    batch, heads, n_local, dim = q_local.shape
    seq_len = padded_len
    plan = rank_plan(cfg, seq_len, comm.world, comm.rank, heads, layer, step, pattern_len)
    glob = gather_global_positions(cfg, seq_len, global_mask, batch, pattern_len)
    key_valid = None if padding_mask is None else ~padding_mask.bool().cpu()
    skip = glob.is_global if key_valid is None else glob.is_global | ~key_valid  # [1|B, N]
    g_valid = glob.valid
    if key_valid is not None:
        g_valid = g_valid & key_valid.gather(1, glob.positions.expand(batch, -1))
    lo = comm.rank * n_local
    n_glob = glob.positions.shape[-1]
    token = None

    qg_local, kg_local, vg_local = (q_local, k_local, v_local) if global_qkv is None else global_qkv
    if n_glob:
        rows = _owned_rows(torch.stack([qg_local, k_local, v_local]), glob, lo, n_local)
        rows, token = all_reduce_sum(comm, "global", token, rows)
        q_glob, gk, gv = rows.unbind(0)
    else:
        gk = gv = k_local.new_zeros(batch, heads, 0, dim)
    if plan.random_in_group:
        rk, rv, token = random_exchange(comm, plan, cfg.block_size, token, k_local, v_local)
    else:
        rk = rv = k_local.new_zeros(batch, heads, 0, dim)
    edge = plan.edge_local.to(k_local.device)
    k_edge, v_edge = k_local.index_select(2, edge), v_local.index_select(2, edge)
    wait_halo = None
    if plan.halo_in_group:
        wait_halo = halo_exchange(comm, plan, cfg.block_size, token, k_edge, v_edge)
    kl = vl = kr = vr = k_local.new_zeros(batch, heads, 0, dim)

    def global_partial():  # the global queries' softmax over the local keys
        if not n_glob:
            return None
        k_valid_local = None if key_valid is None else key_valid[:, lo : lo + n_local]
        return _global_partial(q_glob, kg_local, vg_local, glob, lo, k_valid_local, cfg.causal)

    if backend == "flex" or (backend == "auto" and q_local.is_cuda):
        partial = global_partial()  # during the halo transfer
        if wait_halo is not None:
            kl, vl, kr, vr, token = wait_halo()
        fplan = flex_plan(cfg, seq_len, comm.world, comm.rank, heads, layer, step, pattern_len)
        # Without per-sample masks the kernel plan (and the BlockMask kept on it) depends only
        # on (step, layer): built once, it serves every micro-batch and the backward.
        shared = padding_mask is None and global_mask is None
        kplan = fplan.kernel_plans.get(dim) if shared else None
        if kplan is None:
            kplan = make_plan(
                fplan.table, torch.arange(lo, lo + n_local), fplan.kpos, skip[:, fplan.kpos],
                glob.positions, g_valid, cfg.causal, cfg.block_size, dim,
            )  # fmt: skip
            if shared:
                fplan.kernel_plans[dim] = kplan
        zeros = k_local.new_zeros(batch, heads, fplan.pad_blocks * cfg.block_size, dim)
        k_buf = torch.cat([kl, k_local, kr, rk, zeros], dim=2)
        v_buf = torch.cat([vl, v_local, vr, rv, zeros], dim=2)
        parts = [flex_block_attention(q_local, k_buf, v_buf, gk, gv, kplan)[0]]
    else:
        if wait_halo is not None and not overlap:
            kl, vl, kr, vr, token = wait_halo()
            wait_halo = None
        q_runs = q_local.split([tokens for tokens, _ in plan.runs], dim=2)

        def run(interior, table, k_buf, v_buf, k_pos, rk_buf=None, rv_buf=None):
            q_sel = [
                q for q, (_, inner) in zip(q_runs, plan.runs, strict=True) if inner == interior
            ]
            q_blocks = plan.interior if interior else plan.boundary
            kplan = make_plan(
                table, _tokens(q_blocks, cfg.block_size), k_pos, skip[:, k_pos],
                glob.positions, g_valid, cfg.causal, cfg.block_size, dim,
            )  # fmt: skip
            if q_local.device.type != "cpu":
                kplan = kplan.to(q_local.device)
            q_cat = q_sel[0] if len(q_sel) == 1 else torch.cat(q_sel, dim=2)
            out = block_sparse_attention(q_cat, k_buf, v_buf, gk, gv, kplan, rk_buf, rv_buf)[0]
            sizes = [tokens for tokens, inner in plan.runs if inner == interior]
            return list(out.split(sizes, 2))

        out_interior: list[torch.Tensor] = []
        if plan.interior.numel():  # overlaps the halo transfer
            rk_buf = rv_buf = None
            if plan.kpos_interior.numel() > n_local:  # random entries: their own small buffer
                drawn = plan.random_local.to(k_local.device)
                rk_buf = torch.cat([rk, k_local.index_select(2, drawn)], dim=2)
                rv_buf = torch.cat([rv, v_local.index_select(2, drawn)], dim=2)
            out_interior = run(
                True, plan.table_interior, k_local, v_local, plan.kpos_interior, rk_buf, rv_buf
            )
        partial = global_partial()  # also during the transfer
        if wait_halo is not None:
            kl, vl, kr, vr, token = wait_halo()
        out_boundary: list[torch.Tensor] = []
        if plan.boundary.numel():
            near = plan.boundary_in_edge.to(k_local.device)
            k_buf = torch.cat([kl, k_edge.index_select(2, near), kr, rk], dim=2)
            v_buf = torch.cat([vl, v_edge.index_select(2, near), vr, rv], dim=2)
            out_boundary = run(False, plan.table_boundary, k_buf, v_buf, plan.kpos_boundary)
        # the runs back in sequence order: one concatenation
        parts = [(out_interior if inner else out_boundary).pop(0) for _, inner in plan.runs]
    if not n_glob:
        return attach_token(parts, token)
    assert partial is not None
    merged, token = _merge_partials(comm, token, *partial)
    return _place_rows(parts, merged, glob, lo, n_local, token)


def pad_for_cp(x: torch.Tensor, world: int, block: int, dim: int = 2) -> torch.Tensor:
    """x padded with zeros along `dim` to a multiple of world x block (what each cp rank's
    equal slice of whole blocks needs); pass the true length as cp_sparse_attention's seq_len."""
    step = world * block
    pad = -x.shape[dim] % step
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _pad_masks(padding_mask, global_mask, pattern_len: int, padded_len: int):
    """Masks over the padded sequence: keys past the true length are padding."""
    if pattern_len >= padded_len or pattern_len <= 0:
        return padding_mask, global_mask
    for m in (padding_mask, global_mask):
        if m is not None and m.shape[-1] not in (pattern_len, padded_len):
            return padding_mask, global_mask  # local_problem names the bad shape
    batch = next((m.shape[0] for m in (padding_mask, global_mask) if m is not None), 1)
    return pad_masks(padding_mask, global_mask, pattern_len, padded_len, batch)


def _tokens(blocks: torch.Tensor, block: int) -> torch.Tensor:
    return (blocks.view(-1, 1) * block + torch.arange(block).view(1, -1)).flatten()


def _owned_rows(x: torch.Tensor, glob: GlobalSet, lo: int, n_local: int) -> torch.Tensor:
    """x [S, B, H, n, D] -> [S, B, H, G, D]: the global rows this rank owns, zeros elsewhere."""
    _, batch, heads, _, dim = x.shape
    pos = glob.positions.expand(batch, -1)
    owned = ((pos >= lo) & (pos < lo + n_local)).to(x.device)
    idx = (pos - lo).clamp(0, n_local - 1).to(x.device)[None, :, None, :, None]
    rows = x.gather(3, idx.expand(x.shape[0], batch, heads, -1, dim))
    return rows * owned[None, :, None, :, None].to(x.dtype)


def _global_partial(q_glob, k, v, glob: GlobalSet, lo: int, key_valid, causal: bool):
    """Unnormalised softmax of the global queries over this rank's keys, shifted by the local
    row max m: (m [B, H, G] detached, l = sum exp(s - m), u = exp(s - m) @ v). The shift is a
    constant of the exact result, so treating it as one keeps the gradients exact (and
    finite where a rank holds no allowed key)."""
    n_local = k.shape[2]
    s = (q_glob * (1.0 / math.sqrt(q_glob.shape[-1]))) @ k.transpose(-1, -2)  # [B, H, G, n]
    allowed = None
    if key_valid is not None:
        allowed = key_valid.to(k.device)[:, None, None, :]
    if causal:
        k_pos = torch.arange(lo, lo + n_local).view(1, 1, 1, -1)
        ordered = (k_pos <= glob.positions[:, None, :, None]).to(k.device)
        allowed = ordered if allowed is None else allowed & ordered
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    m = s.detach().amax(dim=-1)
    has_key = torch.isfinite(m)
    e = torch.exp(s - torch.where(has_key, m, 0.0).unsqueeze(-1))
    return m, has_key, e.sum(-1), e @ v


def _merge_partials(comm: CPComm, token, m, has_key, l_sum, u):
    """Exact log-sum-exp merge of the partials of every rank: out = sum_p e_p u_p / sum_p e_p l_p
    with e_p = exp(m_p - max_p m_p); replicated on every rank."""
    m_all = torch.where(has_key, m, -math.inf)
    if comm.world > 1:
        with comm.blocked("global_merge", "forward"):
            dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=comm.group)
        comm.count("global_merge", "forward", all_reduce_bytes(m_all.numel() * 8, comm.world))
    scale = torch.where(has_key, torch.exp(m - torch.where(has_key, m_all, 0.0)), 0.0)
    packed = torch.cat([u * scale.unsqueeze(-1), (l_sum * scale).unsqueeze(-1)], dim=-1)
    packed, token = all_reduce_sum(comm, "global_merge", token, packed)
    num, den = packed[..., :-1], packed[..., -1:]
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0), token


class _PlaceRows(torch.autograd.Function):
    """The output runs joined in order, with the merged global rows this rank owns written
    over them; depends on the chain's last token (see cp_comm.attach_token). One full-size
    buffer in forward and one in backward."""

    @staticmethod
    def forward(ctx, token, rows, owner, slot, where, *parts):  # type: ignore[override]
        out = torch.cat(parts, dim=2)  # fresh, so written in place
        out[owner, :, where] = rows[owner, :, slot]
        ctx.save_for_backward(owner, slot, where)
        ctx.sizes, ctx.rows_shape = [part.shape[2] for part in parts], rows.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        owner, slot, where = ctx.saved_tensors
        d_rows = grad.new_zeros(ctx.rows_shape)
        d_rows[owner, :, slot] = grad[owner, :, where]
        d_out = grad.clone()
        d_out[owner, :, where] = 0
        return (token_grad(ctx, 0, grad), d_rows, None, None, None, *d_out.split(ctx.sizes, dim=2))


def _place_rows(parts, rows, glob: GlobalSet, lo: int, n_local: int, token) -> torch.Tensor:
    """This rank's output [B, H, n, D]: the runs `parts` in order, with the merged global
    query rows [B, H, G, D] it owns in their places (padded slots, which repeat a position,
    are not valid and write nothing)."""
    batch = rows.shape[0]
    pos = glob.positions.expand(batch, -1)
    keep = glob.valid.expand(batch, -1) & (pos >= lo) & (pos < lo + n_local)
    owner, slot = keep.nonzero(as_tuple=True)
    where = pos[owner, slot] - lo
    device = rows.device
    return _PlaceRows.apply(
        token, rows, owner.to(device), slot.to(device), where.to(device), *parts
    )
