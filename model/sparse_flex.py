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

from model.sparse_plan import build_block_table, gather_global_positions

_compiled_flex = None


def _flex(q, k, v, block_mask, scale):
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            # Eager FlexAttention materialises the scores; compiled it is the fused kernel.
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
    return _flex(q, k, v, block_mask, dim**-0.5)
