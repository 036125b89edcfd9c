"""Picture of a recipe's attention pattern split across context-parallel ranks (parallel.show).

    python -m train.show --config configs/demo.yaml --cp 4 --out pattern.png \
        [--seq-len N] [--layer L | --layer all] [--head H] [--step S] [--bytes-per-value 4] \
        [key=value ...]

Reads the recipe (train.config, overrides as for `python -m train`) and draws
parallel.show.render_pattern of layer L's pattern (its own with attention.layers): each
(query block, key block) cell coloured by where its rank gets the key from (local, halo,
global, random/pool), with the forward bytes per rank. `--layer all` draws every layer's
pattern, one panel each (parallel.show.render_layers).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from parallel.show import classify_blocks, describe_pattern, render_layers, render_pattern
from train.config import load_config

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.show", description=__doc__)
    parser.add_argument("--config", required=True, help="training YAML recipe")
    parser.add_argument("--cp", type=int, required=True, help="context-parallel ranks")
    parser.add_argument("--out", default="pattern.png", help="PNG to write")
    parser.add_argument("--seq-len", type=int, default=None, help="default: train.seq_len")
    parser.add_argument("--layer", default="0", help="a layer index, or all: one panel each")
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--step", type=int, default=0, help="step of the random-block draw")
    parser.add_argument("--bytes-per-value", type=int, default=4, help="4 for fp32 K/V, 2 for bf16")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    if args.layer != "all" and not args.layer.lstrip("-").isdigit():
        parser.error(f"--layer {args.layer} must be a layer index or all")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        seq_len = args.seq_len or cfg.train.seq_len
        n_heads, head_dim, n_layers = cfg.model.n_heads, cfg.model.head_dim, cfg.model.n_layers
        name = Path(args.config).name
        if args.layer == "all":
            path = render_layers(
                cfg.attention, n_layers, seq_len, args.cp, n_heads, head_dim, args.out,
                args.head, args.step, args.bytes_per_value,
                f"{name}: N={seq_len}, cp={args.cp}, head {args.head}",
            )  # fmt: skip
            log.info("wrote %s (%d layers)", path, n_layers)
            return 0
        layer = int(args.layer)
        attn = cfg.attention.for_layer(layer, n_layers)
        cats = classify_blocks(attn, seq_len, args.cp, n_heads, layer, args.step, args.head)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = (
        f"{name}: N={seq_len}, {describe_pattern(attn)}; cp={args.cp}, layer {layer}, "
        f"head {args.head}"
    )
    path = render_pattern(
        attn, seq_len, args.cp, n_heads, head_dim, args.out, layer, args.head, args.step,
        args.bytes_per_value, title, cats,
    )  # fmt: skip
    log.info("wrote %s (%d x %d blocks)", path, cats.shape[0], cats.shape[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
