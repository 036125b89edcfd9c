"""Train a language model from a YAML recipe.

    python -m data.prepare --out artifacts/data/stdlib --vocab-size 4096
    python -m train --config configs/demo.yaml [--resume [yes|auto]] [section.key=value ...]

Overrides use dotted keys, e.g. `train.steps=50 attention.window_blocks=5`. `--resume`
continues from the newest complete checkpoint in the run's checkpoint directory (or starts
fresh, with a warning, when there is none); `--resume auto` does the same silently (the
launchers pass it, so that a restarted or requeued job continues); under a torchrun restart
resuming is the default. The resolved config is written to `<train.run_dir>/config.yaml`.
Multi-process launches (torchrun, multi-node, the deepspeed launcher, SLURM): docs/launch.md.
A second run on a `train.run_dir` in use is refused (exit 2), naming the holder's host and pid.
SIGTERM / SIGUSR1 stop the run after a checkpoint (exit status 0, "preempted" printed). Exit
status 3: stopped by train.max_nan_skips NaN/Inf steps (after a checkpoint) or a hung collective.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from parallel.collective_timeout import CollectiveTimeout
from train.config import load_config
from train.engine import NonFiniteLossError
from train.loop import train
from train.run_setup import RESUME_MODES


def _bare_resume(argv: list[str]) -> list[str]:
    """`--resume section.key=value` is a bare --resume, then an override: `--resume=yes` keeps
    the override in its place among the others (the later of two values for a key wins)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--resume" and "=" in out[i + 1] and not out[i + 1].startswith("-"):
            out[i] = "--resume=yes"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML recipe (defaults apply when omitted)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        default="no",
        metavar="{" + ",".join(RESUME_MODES) + "}",
        help="continue from the newest complete checkpoint (auto: only if there is one)",
    )
    # The deepspeed launcher appends --local_rank=N (the rank also comes in LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(_bare_resume(sys.argv[1:] if argv is None else argv))
    if args.resume not in RESUME_MODES:
        parser.error(
            f"argument --resume: invalid choice: {args.resume!r} "
            f"(choose from {', '.join(RESUME_MODES)})"
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume)  # rank 0 holds train.run_dir's lock
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CollectiveTimeout) as e:  # after a checkpoint / a hung peer
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # a checkpoint that cannot be written (train.checkpoint names it)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 speaks for the run
    if result.preempted:
        print(
            f"preempted: stopped after step {result.steps} of {cfg.train.steps} with a "
            f"checkpoint; continue with --resume | run dir {result.run_dir}"
        )
        return 0
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(
        f"done: steps {result.steps} (this run {result.steps - result.start_step}), "
        f"tokens {result.tokens:,}, {result.seconds:.1f} s | train loss first10 "
        f"{result.mean_loss(first=True):.4f} -> last10 {result.mean_loss(first=False):.4f} | "
        f"val loss {val} | run dir {result.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
