"""Rotary position embedding (RoPE) on explicit, global token positions.

    from model.rope import apply_rope
    q_bhnd = apply_rope(q_bhnd, position_ids_bn, theta=10000.0)

The angles are computed from `position_ids` rather than from the index along the sequence axis,
so that a context-parallel rank holding tokens [r*n, (r+1)*n) rotates them exactly as the
single-device model does (it passes its global positions). Shapes: b batch, h heads, n tokens,
d head dim (even).
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "rope_angles"]


def rope_angles(
    position_ids_bn: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [b, 1, n, d/2] in float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension; got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids_bn.device)
    inv_freq = theta ** (-exponents / head_dim)
    angles = position_ids_bn.to(torch.float32).unsqueeze(-1) * inv_freq  # [b, n, d/2]
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x_bhnd: torch.Tensor, position_ids_bn: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) by position * theta^(-2i/d)."""
    cos, sin = rope_angles(position_ids_bn, x_bhnd.shape[-1], theta)
    x = x_bhnd.float()
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x_bhnd.dtype)
