"""GPU backend of the sparse attention: FlexAttention with a BlockMask built from the pattern.

`sparse_attention` selects it automatically for CUDA tensors. The BlockMask lists, per query
block, the key blocks of the window, the random draw and the global tokens (every block for a
query block holding a global query); the mask_mod is the pattern's own token rule
(`SparsityConfig.token_rule`, which `dense_mask` evaluates too) with padded keys masked, so the
result equals `dense_attention` over `cfg.dense_mask`. FlexAttention
runs forward and backward on GPU; on CPU it runs forward only, which is how
tests/unit/test_sparse_flex.py checks the mask construction on machines without a GPU.

Legend: B batch, H heads, nb blocks, R random blocks per query block.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from model.sparse_kernel import KernelPlan
from model.sparse_plan import build_block_table, gather_global_positions

_compiled_flex = None
compile_on_cpu = False
"""Compile on CPU too (tests count compilations there); on CUDA the kernel is always compiled."""


def flex_kernel(q, k, v, block_mask, scale):
    """FlexAttention of q, k, v under `block_mask`: the fused (compiled) kernel on CUDA (and on
    CPU with `compile_on_cpu`), eager FlexAttention otherwise. Every sparse path calls it, so a
    benchmark timing it times what the model runs."""
    global _compiled_flex
    if q.is_cuda or compile_on_cpu:
        if _compiled_flex is None:
            # Eager FlexAttention materialises the scores; compiled it is the fused kernel.
            # Shapes are fixed per rank and pattern, so one static compilation serves every
            # layer and step (tests/unit/test_cp_flex.py counts them).
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def build_block_mask(cfg, batch, n_heads, seq_len, layer, step, padding_mask, global_mask, device):
    b = cfg.block_size
    nb = seq_len // b
    table = build_block_table(cfg, seq_len, n_heads, layer, step)
    glob = gather_global_positions(cfg, seq_len, global_mask, batch)
    hx = table.index.shape[0]

    touched = torch.zeros(1, hx, nb, nb, dtype=torch.bool)
    head, q_block, entry = table.valid.nonzero(as_tuple=True)
    touched[0, head, q_block, table.index[head, q_block, entry]] = True
    global_blocks = glob.is_global.view(-1, nb, b).any(-1)  # [1 or B, nb]
    touched = touched | global_blocks[:, None, None, :] | global_blocks[:, None, :, None]
    if cfg.causal:
        touched &= torch.ones(nb, nb, dtype=torch.bool).tril()
    kv_num_blocks = touched.sum(-1).to(torch.int32)
    kv_indices = torch.sort((~touched).to(torch.int8), dim=-1, stable=True).indices
    kv_indices = kv_indices.to(torch.int32)

    padded = (
        padding_mask.bool().to(device)
        if padding_mask is not None
        else torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    )
    per_sample = glob.is_global.expand(batch, -1)  # the pattern's and the sample's globals
    allowed = cfg.token_rule(seq_len, n_heads, layer, step, per_sample, device)

    def mask_mod(b_idx, h, q_idx, kv_idx):
        return allowed(b_idx, h, q_idx, kv_idx) & ~padded[b_idx, kv_idx]

    return BlockMask.from_kv_blocks(
        kv_num_blocks.expand(batch, n_heads, -1).contiguous().to(device),
        kv_indices.expand(batch, n_heads, -1, -1).contiguous().to(device),
        BLOCK_SIZE=b,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


def flex_sparse_attention(q, k, v, cfg, layer, step, padding_mask, global_mask):
    batch, n_heads, seq_len, dim = q.shape
    block_mask = build_block_mask(
        cfg, batch, n_heads, seq_len, layer, step, padding_mask, global_mask, q.device
    )
    return flex_kernel(q, k, v, block_mask, dim**-0.5)


def plan_block_mask(plan: KernelPlan, n_keys: int, n_glob: int, batch: int, heads: int, device):
    """The BlockMask of a blocked-kernel plan (`model.sparse_kernel.make_plan`) over the key
    buffer [table keys (n_keys) | global keys (n_glob) | zero padding to a whole block].

    Listed per query block: its valid table entries and every global block. mask_mod reads the
    plan's own masks (static, per-sample, global), so the flex kernel attends exactly the
    pairs the blocked kernel does, and is False outside the listed blocks too (eager
    FlexAttention evaluates it densely and ignores the lists)."""
    b = plan.block
    index, valid = plan.table.index, plan.table.valid  # [Hx, nq, M]
    hx, nq, m = index.shape
    nk = n_keys // b
    gb = -(-n_glob // b)
    # entry[h, q, key block] = the table entry reading that block (-1: not read)
    entry = torch.full((hx, nq, nk), -1, dtype=torch.long)
    h_i, q_i, e_i = valid.nonzero(as_tuple=True)
    entry[h_i, q_i, index[h_i, q_i, e_i]] = e_i
    cols = torch.where(valid, index, nk + gb)  # invalid entries sort last
    cols = torch.cat([cols, torch.arange(nk, nk + gb).expand(hx, nq, gb)], dim=-1)
    # sorted: the valid entries (distinct blocks), the global blocks, then the invalid ones
    cols = cols.sort(dim=-1).values
    width = nk + gb  # from_kv_blocks reads the last dim as the number of key blocks
    kv_indices = torch.zeros(hx, nq, width, dtype=torch.int32)
    used = min(width, cols.shape[-1])
    kv_indices[..., :used] = cols[..., :used].clamp(max=width - 1).to(torch.int32)
    kv_num_blocks = (valid.sum(-1) + gb).to(torch.int32)

    entry = entry.to(device, non_blocking=True)
    static = plan.static_blocked.to(device, non_blocking=True)  # [Hx, nq, b, M*b]
    sample = plan.sample_blocked
    if sample is not None:
        sample = sample.to(device, non_blocking=True)  # [B, n_keys]
    glob_blocked = plan.global_blocked.to(device, non_blocking=True)  # [1|B, nq, b, G]
    per_head, per_batch = hx > 1, glob_blocked.shape[0] > 1

    def mask_mod(b_idx, h, q_idx, kv_idx):
        qb, r = q_idx // b, q_idx % b
        hh = h if per_head else 0
        in_table = kv_idx < n_keys
        kv_t = kv_idx.clamp(max=n_keys - 1)
        e = entry[hh, qb, kv_t // b]
        ok = in_table & (e >= 0) & ~static[hh, qb, r, e.clamp(min=0) * b + kv_t % b]
        if sample is not None:
            ok = ok & ~sample[b_idx, kv_t]
        if n_glob:
            g = kv_idx - n_keys
            g_ok = (g >= 0) & (g < n_glob)
            bb = b_idx if per_batch else 0
            g_ok = g_ok & ~glob_blocked[bb, qb, r, g.clamp(0, n_glob - 1)]
            ok = ok | g_ok
        return ok

    return BlockMask.from_kv_blocks(
        kv_num_blocks.unsqueeze(0).to(device),
        kv_indices.unsqueeze(0).to(device),
        BLOCK_SIZE=b,
        mask_mod=mask_mod,
        seq_lengths=(nq * b, (nk + gb) * b),
    )


def flex_block_attention(q, k, v, gk, gv, plan: KernelPlan, rk=None, rv=None):
    """`model.sparse_kernel.block_sparse_attention` in one FlexAttention call: the same
    arguments and plan, the same out [B, H, nq*b, D] (and None for the log-sum-exp, which no
    caller of the local kernel reads); in the dtype of q (bf16 stays bf16: the kernel keeps
    its softmax statistics in fp32). The BlockMask is built on first use and kept on
    the plan, so a cached plan serves every micro-batch and the backward."""
    b = plan.block
    k_parts, v_parts = [k], [v]
    if rk is not None:
        k_parts.append(rk)
        v_parts.append(rv)
    n_keys = sum(t.shape[2] for t in k_parts)
    n_glob = gk.shape[2]
    pad = -n_glob % b
    if n_glob:
        k_parts.append(gk)
        v_parts.append(gv)
    if pad:
        k_parts.append(k.new_zeros(*k.shape[:2], pad, k.shape[3]))
        v_parts.append(v.new_zeros(*v.shape[:2], pad, v.shape[3]))
    k_all = k_parts[0] if len(k_parts) == 1 else torch.cat(k_parts, dim=2)
    v_all = v_parts[0] if len(v_parts) == 1 else torch.cat(v_parts, dim=2)
    key = (n_keys, n_glob, q.device)
    if plan.block_mask is None or plan.block_mask[0] != key:
        mask = plan_block_mask(plan, n_keys, n_glob, q.shape[0], q.shape[1], q.device)
        plan.block_mask = (key, mask)
    return flex_kernel(q, k_all, v_all, plan.block_mask[1], plan.scale), None
