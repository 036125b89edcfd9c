"""Check context-parallel attention against the single-device dense reference, for a config.

    python -m parallel.verify --config configs/X.yaml --cp 4 [--seq-len N] [--batch 2]
    torchrun --nproc-per-node 4 -m parallel.verify --config configs/X.yaml --cp 4

Reads the YAML's top-level `attention:` mapping (SparsityConfig fields) and `train.seq_len`,
spawns `--cp` gloo ranks on this machine (or, under torchrun, uses the launched ranks), runs
`cp_sparse_attention` on random q, k, v (every rank its slice) and dense masked attention on
the whole sequence, and compares the output and the q/k/v gradients of a random upstream
gradient. Prints PASS or FAIL with the max errors; exits 1 on FAIL. The reference is
O(seq^2) in memory: pass a smaller --seq-len for long-context configs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from model.sparse import SparsityConfig, dense_attention
from model.transformer import ModelArgs
from parallel.context_parallel import cp_sparse_attention
from parallel.local_ranks import run_local_ranks

logger = logging.getLogger(__name__)

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def load_attention(path: str, layer: int = 1) -> tuple[SparsityConfig, int | None]:
    """(the pattern of `layer` from the `attention:` mapping, train.seq_len or None); with
    attention.layers, that layer's own pattern (model.n_layers from the YAML)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    attention = raw.get("attention")
    if not isinstance(attention, dict):
        raise ValueError(f"{path}: needs a top-level `attention:` mapping of SparsityConfig fields")
    known = set(SparsityConfig.__dataclass_fields__) - {"_dilations"}
    unknown = sorted(set(attention) - known)
    if unknown:
        raise ValueError(f"{path}: unknown attention keys {unknown}; known: {sorted(known)}")
    seq_len = (raw.get("train") or {}).get("seq_len")
    n_layers = (raw.get("model") or {}).get("n_layers", ModelArgs.n_layers)
    return SparsityConfig(**attention).for_layer(layer, n_layers), seq_len


def compare(rank: int, world: int, cfg: SparsityConfig, args: argparse.Namespace) -> dict:
    """Max errors of this rank's slice (output and gradients) against the dense reference."""
    dtype = getattr(torch, args.dtype)
    n, b, h, d = args.seq_len, args.batch, args.heads, args.head_dim
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v, d_out = (torch.randn(b, h, n, d, generator=gen, dtype=dtype) for _ in range(4))
    padding_mask = global_mask = None
    if args.padding:
        padding_mask = torch.zeros(b, n, dtype=torch.bool)
        padding_mask[-1, n - n // 3 :] = True
    if args.global_mask:
        global_mask = torch.zeros(b, n, dtype=torch.bool)
        global_mask[:, torch.randint(0, n, (3,), generator=gen)] = True
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    mask = cfg.dense_mask(n, args.layer, args.step, global_mask, n_heads=h)
    if padding_mask is not None:
        mask = (mask if mask.dim() == 4 else mask.unsqueeze(0)) & ~padding_mask[:, None, None]
    ref = dense_attention(qr, kr, vr, mask)
    (ref * d_out).sum().backward()
    local = slice(rank * n // world, (rank + 1) * n // world)
    ql, kl, vl = (t[:, :, local].clone().requires_grad_() for t in (q, k, v))
    out = cp_sparse_attention(
        ql, kl, vl, cfg, None, args.layer, args.step, padding_mask, global_mask
    )
    (out * d_out[:, :, local]).sum().backward()
    assert all(t.grad is not None for t in (ql, kl, vl, qr, kr, vr))
    pairs = {
        "out": (out, ref),
        "dq": (ql.grad, qr.grad),
        "dk": (kl.grad, kr.grad),
        "dv": (vl.grad, vr.grad),
    }
    errors = torch.tensor(
        [float((a - b[:, :, local]).detach().abs().max()) for a, b in pairs.values()],  # type: ignore[index,operator]
        dtype=torch.float64,
    )
    if world > 1:
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return dict(zip(pairs, errors.tolist(), strict=True))


def run(cfg: SparsityConfig, args: argparse.Namespace) -> dict:
    """Errors over all ranks: spawned here, or the torchrun ranks when launched by torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
        if dist.get_world_size() != args.cp:
            raise ValueError(f"--cp {args.cp} must equal torchrun's world size")
        try:
            return compare(dist.get_rank(), args.cp, cfg, args)
        finally:
            dist.destroy_process_group()
    threads = max(1, (os.cpu_count() or 1) // args.cp)
    per_rank = run_local_ranks(
        compare, args.cp, args=(cfg, args), timeout=args.timeout, threads=threads
    )
    return per_rank[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML with an `attention:` mapping")
    p.add_argument("--cp", type=int, required=True, help="context-parallel ranks")
    p.add_argument("--seq-len", type=int, help="default: train.seq_len of the config")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=0, help="default: per-head dilations, else 2")
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    p.add_argument("--layer", type=int, default=1, help="its pattern and random draw")
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--padding", action="store_true", help="pad the last third of a sample")
    p.add_argument("--global-mask", action="store_true", help="3 per-sample global tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=300, help="gloo timeout, seconds")
    args = p.parse_args(argv)
    cfg, seq_len = load_attention(args.config, args.layer)
    args.seq_len = args.seq_len or seq_len
    if not args.seq_len:
        p.error("the config has no train.seq_len: pass --seq-len")
    if args.seq_len % (args.cp * cfg.block_size):
        p.error(
            f"seq_len {args.seq_len} must be a multiple of cp x attention.block_size = "
            f"{args.cp} x {cfg.block_size}"
        )
    try:
        cfg.validate_seq_len(args.seq_len)
    except ValueError as err:
        p.error(str(err))
    if args.heads == 0:
        dil = cfg.dilation
        args.heads = len(dil) if isinstance(dil, tuple) else 2
    if args.seq_len > 8192:
        logger.warning("dense reference at seq_len=%d is O(seq^2) in memory", args.seq_len)
    errors = run(cfg, args)
    worst = max(errors.values())
    ok = worst <= TOLERANCE[args.dtype]
    if int(os.environ.get("RANK", "0")) == 0:
        detail = " ".join(f"{k}={v:.2e}" for k, v in errors.items())
        print(
            f"{'PASS' if ok else 'FAIL'} cp={args.cp} seq_len={args.seq_len} batch={args.batch} "
            f"heads={args.heads} {args.dtype} max errors: {detail} "
            f"(tolerance {TOLERANCE[args.dtype]:.0e})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
