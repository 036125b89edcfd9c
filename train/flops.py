"""Sparse-aware training FLOPs and model FLOPs utilisation (MFU).

    from train.flops import step_flops, peak_flops, mfu
    flops = step_flops(cfg.model, cfg.attention, seq_len, batch_tokens=B * seq_len)
    util = mfu(flops / step_seconds, peak_flops(configured=None))    # a fraction of the peak

    meter = MFUMeter.create(cfg.model, cfg.attention, seq_len, tokens=B * seq_len)  # the loop's
    metrics.log(step, meter.metrics(tokens_processed, seconds, n_devices=world))

    python -m train.flops --config configs/demo.yaml      # per-token breakdown and the peak

Matmuls: every linear weight (q/k/v, output, MLP, LM head; the embedding lookup is free) costs
2 FLOPs per token forward and 4 backward, the usual 6 * params. Attention counts only the pairs
the sparsity pattern allows (`model.sparse.count_pairs`, per layer because the random draw
depends on the layer and attention.layers may give each layer its own pattern): q.k and p.v
are 2 * head_dim FLOPs each per pair and head forward, and the backward twice that, so
3 * 4 * head_dim * pairs. A dense model would count N^2 pairs; the
block-sparse one counts O(N), which is what MFU must be measured against.

The peak: logging.peak_tflops when configured, else the known bf16 peak of the GPU, else a
measured one: the best of several timed runs (after a warmup, each long enough for the clock)
of the matmuls the model itself does at its working size (tokens x d_model x the MLP width, and
x the vocabulary) and of a large square one, the best of those shapes. One small matmul timed
once, as before, under-measured the machine and reported MFU above 100 %.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from model.sparse import SparsityConfig, count_pairs
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
    "working_matmuls",
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
    """Allowed (query, key) pairs of one sequence, summed over heads and layers (each layer's
    own pattern, attention.layers)."""
    return sum(
        count_pairs(attn_cfg.for_layer(layer, n_layers), seq_len, n_heads, layer, step)
        for layer in range(n_layers)
    )


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


MATMUL_CAP = 2048
"""Largest dimension of a measured matmul of the model's: larger ones run no faster, only
longer."""
SQUARE_MATMUL = {"cpu": 1024, "cuda": 8192}
"""Side of the square matmul measured besides the model's (near the hardware's best rate, so
that the peak is not the rate of a small matmul at which the model itself does better)."""


def working_matmuls(model_args: ModelArgs, tokens: int) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) of the model's largest matmuls over `tokens` tokens (a micro-batch): the MLP's
    and the LM head's, each dimension at most MATMUL_CAP."""
    m, k = min(tokens, MATMUL_CAP), min(model_args.d_model, MATMUL_CAP)
    widths = {min(model_args.hidden, MATMUL_CAP), min(model_args.vocab_size, MATMUL_CAP)}
    return tuple((m, k, n) for n in sorted(widths))


@lru_cache(maxsize=8)
def measure_matmul_flops(
    device: str = "cpu",
    shape: tuple[int, int, int] = (512, 512, 512),
    repeats: int = 5,
    min_seconds: float = 0.01,
) -> float:
    """Best FLOP/s of an [m, k] x [k, n] matmul on `device` (fp32 on CPU, bf16 on CUDA, as the
    peak table) over `repeats` timed runs after a warmup; a run repeats the matmul until it
    lasts `min_seconds`, so that a short one is not timed by a single clock reading."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    m, k, n = shape
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(k, n, device=dev, dtype=dtype)

    def timed(times: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(times):
            torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    times = 1
    while (seconds := timed(times)) < min_seconds:  # warmup, and the count of a long run
        times = max(2 * times, int(times * 1.2 * min_seconds / max(seconds, 1e-9)))
    best = min(timed(times) for _ in range(repeats))
    return 2.0 * m * k * n * times / max(best, 1e-9)


def peak_flops(
    configured: float | None = None,
    device: torch.device | str | None = None,
    shapes: tuple[tuple[int, int, int], ...] = (),
) -> float:
    """Peak FLOP/s to measure MFU against: `configured` when given (a config value), else the
    known bf16 peak of the CUDA device by name, else the best measured FLOP/s of matmuls of
    `shapes` (`working_matmuls` gives the model's) and a SQUARE_MATMUL on the device
    (measure_matmul_flops)."""
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
    side = SQUARE_MATMUL.get(dev.type, SQUARE_MATMUL["cpu"])
    shapes = (*shapes, (side, side, side))
    measured = max(measure_matmul_flops(str(dev), shape) for shape in shapes)
    log.info(
        "MFU against a measured peak of %.3g TFLOP/s (the best [m, k] x [k, n] matmul of %s on "
        "%s; set logging.peak_tflops to use the hardware's)", measured / 1e12,
        ", ".join(f"{m}x{k}x{n}" for m, k, n in shapes), dev,
    )  # fmt: skip
    return measured


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
        tokens: int | None = None,
    ) -> MFUMeter:
        """`tokens`: of a micro-batch, the size of the matmuls a measured peak times (default
        one sequence)."""
        per = flops_per_token(model_args, attn_cfg, seq_len).total
        shapes = working_matmuls(model_args, tokens or seq_len)
        return cls(per, peak_flops(configured_peak, device, shapes))

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
    configured = cfg.logging.peak_tflops
    shapes = working_matmuls(cfg.model, cfg.train.micro_batch_size * seq_len)
    peak = peak_flops(None if configured is None else configured * 1e12, shapes=shapes)
    dense_pairs = seq_len * (seq_len + 1) // 2 if cfg.attention.causal else seq_len**2
    dense_attn = 12.0 * cfg.model.head_dim * cfg.model.n_heads * cfg.model.n_layers
    dense_attn *= dense_pairs / seq_len
    print(
        f"seq_len {seq_len}: training FLOPs/token {per.total:.4g} (matmul {per.matmul:.4g}, "
        f"sparse attention {per.attention:.4g}; dense attention would be {dense_attn:.4g})\n"
        f"peak FLOP/s here: {peak:.4g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
