"""Building blocks of the transformer and the seam that chooses its linear layers.

    from model.layers import LocalLinears, RMSNorm, MLP
    linears = LocalLinears()               # plain nn.Linear / nn.Embedding on one device
    mlp = MLP(d_model=128, hidden=352, kind="swiglu", linears=linears)

`Linears` is the seam for tensor parallelism (issue 5): a Megatron-core implementation returns
ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding wrappers and reports its
`tp_size`, and the model asks it for every projection instead of calling nn.Linear itself.
A column layer splits its output features across tensor-parallel ranks, a row layer its input
features (and reduces the output).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linears", "LocalLinears", "RMSNorm", "MLP", "gelu"]


class Linears(Protocol):
    """Factory of the model's projections; every returned module maps a tensor to a tensor."""

    tp_size: int

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module: ...

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module: ...

    def embedding(self, vocab_size: int, dim: int) -> nn.Module: ...


class LocalLinears:
    """Single-device layers: nn.Linear (bias-free unless asked) and nn.Embedding."""

    tp_size = 1

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size, dim)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    """GELU of model.mlp's `kind`: "gelu_tanh" the tanh approximation (HF's "gelu_new"),
    otherwise the exact (erf) one."""
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


class MLP(nn.Module):
    """SwiGLU (gate and up projections, silu) or GELU ("gelu": erf; "gelu_tanh": the tanh
    approximation) feed-forward block; `bias`: both projections with a bias (BERT's)."""

    def __init__(
        self, d_model: int, hidden: int, kind: str, linears: Linears, bias: bool = False
    ) -> None:
        super().__init__()
        self.kind = kind
        # SwiGLU's gate and up projections form one column layer (as in Megatron-core); a TP
        # implementation must keep each rank's shard laid out as [gate | up].
        width = 2 * hidden if kind == "swiglu" else hidden
        self.up = linears.column(d_model, width, bias=bias)
        self.down = linears.row(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = gelu(h, self.kind)
        return self.down(h)
