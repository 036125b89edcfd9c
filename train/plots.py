"""Loss curves of a run directory as a PNG.

    python -m train.plots runs/demo [--out runs/demo/loss.png]

Reads the training loss of every step ("losses") and the validation history ("val_history") from
the newest complete checkpoint of the run, and draws both against the step (the training loss
also as a moving average).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_losses", "main"]

log = logging.getLogger(__name__)


def _moving_average(values: Sequence[float], width: int) -> list[float]:
    """Mean of the last `width` finite values at each index (NaN where there is none): a
    skipped step's NaN loss leaves a gap instead of poisoning the rest of the curve."""
    out, total, count = [], 0.0, 0
    for i, v in enumerate(values):  # running sums: one pass however wide the window
        if math.isfinite(v):
            total, count = total + v, count + 1
        if i >= width and math.isfinite(values[i - width]):
            total, count = total - values[i - width], count - 1
        if not count:
            total = 0.0  # no rounding residue carried across a gap
        out.append(total / count if count else math.nan)
    return out


def plot_losses(
    losses: Sequence[float],
    val_history: Sequence[tuple[int, float]],
    out: str | Path,
    title: str = "",
) -> Path:
    """Write the training loss (index i = step i + 1) and the (step, val loss) points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#90cdf4", linewidth=0.8, label="train loss")
    if len(losses) >= 10:
        width = max(5, len(losses) // 50)
        smooth = _moving_average(losses, width)
        ax.plot(steps, smooth, color="#2b6cb0", label=f"train loss ({width}-step mean)")
    if val_history:
        vs, vl = zip(*val_history, strict=True)
        ax.plot(vs, vl, "o-", color="#e53e3e", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plots", description=__doc__)
    parser.add_argument("run_dir", help="training run directory (train.run_dir)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from train.checkpoint import CheckpointArgs, CheckpointManager
    from train.config import load_config

    run_dir = Path(args.run_dir)
    config = run_dir / "config.yaml"
    ckpt_args = load_config(config).checkpoint if config.is_file() else CheckpointArgs()
    state = CheckpointManager(ckpt_args, run_dir).load_latest()
    if state is None:
        print(f"error: no complete checkpoint in {run_dir}", file=sys.stderr)
        return 2
    progress = state["progress"]
    losses = [float(v) for v in progress["losses"]]
    val = [(int(s), float(v)) for s, v in progress["val_history"]]
    out = Path(args.out) if args.out else run_dir / "loss.png"
    plot_losses(losses, val, out, f"{run_dir.name}: step {state['step']}")
    log.info("wrote %s (%d steps, %d evaluations)", out, len(losses), len(val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
