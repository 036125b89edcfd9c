"""Sparse-aware training FLOPs and model FLOPs utilisation (MFU).

    from train.flops import step_flops, peak_flops, mfu
    flops = step_flops(cfg.model, cfg.attention, seq_len, batch_tokens=B * seq_len)
    util = mfu(flops / step_seconds, peak_flops(configured=None))    # a fraction of the peak

    meter = MFUMeter.create(cfg.model, cfg.attention, seq_len)        # what the loop keeps
    metrics.log(step, meter.metrics(tokens_processed, seconds, n_devices=world))

    python -m train.flops --config configs/demo.yaml      # per-token breakdown and the peak

Matmuls: every linear weight (q/k/v, output, MLP, LM head; the embedding lookup is free) costs
2 FLOPs per token forward and 4 backward, the usual 6 * params. Attention counts only the pairs
the sparsity pattern allows (`SparsityConfig.count_pairs`, per layer because the random draw
depends on the layer): q.k and p.v are 2 * head_dim FLOPs each per pair and head forward, and
the backward twice that, so 3 * 4 * head_dim * pairs. A dense model would count N^2 pairs; the
block-sparse one counts O(N), which is what MFU must be measured against.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from model.sparse import SparsityConfig
from model.transformer import ModelArgs

__all__ = [
    "FlopsPerToken",
    "PEAK_FLOPS",
    "linear_params",
    "attention_pairs",
    "flops_per_token",
    "step_flops",
    "mfu",
    "peak_flops",
    "measure_matmul_flops",
    "MFUMeter",
]

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (no structured sparsity), by a substring of the device name;
# the first match wins, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


@dataclass(frozen=True)
class FlopsPerToken:
    """Training (forward + backward) FLOPs per token of a `seq_len` sequence."""

    matmul: float
    """6 * linear weights: projections, MLP and LM head."""
    attention: float
    """12 * head_dim * allowed pairs (all heads, all layers) / seq_len."""

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def linear_params(args: ModelArgs) -> int:
    """Weights of every matmul a token goes through (the LM head counted even when tied)."""
    d, h = args.d_model, args.hidden
    mlp_width = 2 * h if args.mlp == "swiglu" else h
    per_layer = 3 * d * d + d * d + d * mlp_width + h * d
    return args.n_layers * per_layer + d * args.vocab_size


@lru_cache(maxsize=32)
def attention_pairs(
    attn_cfg: SparsityConfig, seq_len: int, n_heads: int, n_layers: int, step: int = 0
) -> int:
    """Allowed (query, key) pairs of one sequence, summed over heads and layers."""
    return sum(attn_cfg.count_pairs(seq_len, n_heads, layer, step) for layer in range(n_layers))


def flops_per_token(
    model_args: ModelArgs, attn_cfg: SparsityConfig, seq_len: int, training: bool = True
) -> FlopsPerToken:
    """FLOPs per token; `training=False` gives the forward alone (a third)."""
    pairs = attention_pairs(attn_cfg, seq_len, model_args.n_heads, model_args.n_layers)
    factor = 3 if training else 1
    return FlopsPerToken(
        matmul=factor * 2.0 * linear_params(model_args),
        attention=factor * 4.0 * model_args.head_dim * pairs / seq_len,
    )


def step_flops(
    model_args: ModelArgs, attn_cfg: SparsityConfig, seq_len: int, batch_tokens: int
) -> float:
    """Training FLOPs of an optimizer step over `batch_tokens` tokens (micro_batch_size *
    grad_accum * seq_len: every token processed, loss-masked or not)."""
    return flops_per_token(model_args, attn_cfg, seq_len).total * batch_tokens


def mfu(flops_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved over peak FLOP/s (0.4 means 40 %)."""
    if not peak > 0:
        raise ValueError(f"peak FLOP/s must be positive; got {peak}")
    return flops_per_s / peak


@lru_cache(maxsize=4)
def measure_matmul_flops(device: str = "cpu", n: int = 512, repeats: int = 5) -> float:
    """Best observed FLOP/s of an n x n fp32 matmul on `device`: the fallback peak."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def peak_flops(configured: float | None = None, device: torch.device | str | None = None) -> float:
    """Peak FLOP/s to measure MFU against: `configured` when given (a config value), else the
    known bf16 peak of the CUDA device by name, else a measured fp32 matmul on the device."""
    if configured is not None:
        if not configured > 0:
            raise ValueError(f"peak_flops={configured} must be positive")
        return float(configured)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, value in PEAK_FLOPS:
            if key in name:
                return value
        log.warning("no known peak for %s; using a measured matmul rate", name)
    return measure_matmul_flops(str(dev))


@dataclass(frozen=True)
class MFUMeter:
    """FLOPs per token and the peak, computed once; turns (tokens, seconds) into metrics."""

    flops_per_token: float
    """Training FLOPs per token of the whole model (flops_per_token(...).total)."""
    peak: float
    """Peak FLOP/s of one device."""

    @classmethod
    def create(
        cls,
        model_args: ModelArgs,
        attn_cfg: SparsityConfig,
        seq_len: int,
        configured_peak: float | None = None,
        device: torch.device | str | None = None,
    ) -> MFUMeter:
        per = flops_per_token(model_args, attn_cfg, seq_len).total
        return cls(per, peak_flops(configured_peak, device))

    def metrics(self, tokens: int, seconds: float, n_devices: int = 1) -> dict[str, float]:
        """{"perf/tflops_per_s", "perf/mfu"} for `tokens` processed (every token of every
        sequence of every data-parallel rank, padding included) in `seconds` by `n_devices`."""
        flops_per_s = self.flops_per_token * tokens / max(seconds, 1e-12)
        return {
            "perf/tflops_per_s": flops_per_s / 1e12,
            "perf/mfu": mfu(flops_per_s / n_devices, self.peak),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.flops", description=__doc__)
    parser.add_argument("--config", help="YAML recipe")
    parser.add_argument("--seq-len", type=int, default=None, help="default: train.seq_len")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    from train.config import load_config

    cfg = load_config(args.config, args.overrides)
    seq_len = args.seq_len or cfg.train.seq_len
    per = flops_per_token(cfg.model, cfg.attention, seq_len)
    dense_pairs = seq_len * (seq_len + 1) // 2 if cfg.attention.causal else seq_len**2
    dense_attn = 12.0 * cfg.model.head_dim * cfg.model.n_heads * cfg.model.n_layers
    dense_attn *= dense_pairs / seq_len
    print(
        f"seq_len {seq_len}: training FLOPs/token {per.total:.4g} (matmul {per.matmul:.4g}, "
        f"sparse attention {per.attention:.4g}; dense attention would be {dense_attn:.4g})\n"
        f"peak FLOP/s here: {peak_flops():.4g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
