"""Training metrics to the console (logging) and to Weights & Biases.

    metrics = MetricsLogger(LoggingArgs(), run_dir="runs/demo", config=config_dict)
    metrics.log(step, {"train/loss": 7.1, "train/lr": 3e-3})
    metrics.log_image("pattern/attention", "runs/demo/pattern.png")   # once, e.g. at start
    metrics.finish()

wandb runs offline unless a key is present (`wandb_mode: auto`), writing
`<run_dir>/wandb/offline-run-*/` (sync it later with `wandb sync`). The run id is kept in
checkpoints so that a resumed training continues the same wandb run. Runs are grouped and
named by `logging.group` / `logging.run_name`. In a multi-rank run every rank builds one, the
others with wandb disabled and no console lines. What the trainer logs per step is described
in train/step_metrics.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LoggingArgs", "MetricsLogger", "resolve_wandb_mode"]

log = logging.getLogger(__name__)

_WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class LoggingArgs:
    """Console and wandb logging."""

    log_every: int = 10
    """Log training metrics every this many steps (and at the first and last step)."""
    wandb_mode: str = "auto"
    """auto (online when WANDB_API_KEY is set, else offline; WANDB_MODE in the environment
    wins), online, offline or disabled."""
    project: str = "halotron"
    """wandb project."""
    group: str | None = None
    """wandb group (e.g. one per sweep or layout comparison)."""
    run_name: str | None = None
    """wandb run name; null lets wandb choose one."""
    progress_bar: bool = True
    """Show a tqdm progress bar with ETA on stderr."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for perf/mfu; null: the known bf16 peak of the GPU by name
    (train.flops.PEAK_FLOPS), else a measured fp32 matmul rate."""
    pattern_picture: bool = True
    """Attach parallel.show's picture of the attention pattern over the cp ranks to the wandb
    run when it starts (pattern.png in the run directory)."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"logging.log_every={self.log_every!r} must be a positive integer")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"logging.peak_tflops={self.peak_tflops!r} must be positive or null")
        if self.wandb_mode not in _WANDB_MODES:
            raise ValueError(
                f"logging.wandb_mode={self.wandb_mode!r} must be one of {', '.join(_WANDB_MODES)}"
            )


def resolve_wandb_mode(mode: str) -> str:
    """The mode wandb will run in: an explicit setting, else WANDB_MODE, else by the key."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """Console lines through `logging` and a wandb run (created at construction)."""

    def __init__(
        self,
        args: LoggingArgs,
        run_dir: str | os.PathLike,
        config: dict[str, Any],
        resume_id: str | None = None,
        console: bool = True,
    ) -> None:
        """console=False: no console lines (the other ranks of a multi-process run)."""
        self.args = args
        self.console = console
        self.mode = resolve_wandb_mode(args.wandb_mode)
        self.run: Any = None
        if self.mode == "disabled":
            return
        import wandb

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=args.project,
            group=args.group,
            name=args.run_name,
            dir=str(run_dir),
            config=config,
            id=resume_id,
            resume="allow" if resume_id else None,
            mode=self.mode,  # type: ignore[arg-type]
            # console="off": the trainer's own logging is the console record; wandb's stdout
            # wrapping would duplicate it and fights with pytest's capture.
            settings=wandb.Settings(console="off", quiet=True),
        )
        log.info("wandb %s run %s in %s", self.mode, self.run.id, self.run.dir)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def run_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if console and self.console:
            log.info("step %d | %s", step, " | ".join(_fmt(k, v) for k, v in metrics.items()))
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        """A PNG as a wandb.Image under `key` (works offline; synced with the run)."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _fmt(key: str, value: float) -> str:
    name = key.split("/")[-1]
    if name == "lr":
        return f"{name} {value:.2e}"
    if name.endswith("_per_s") and name != "tflops_per_s":
        return f"{name} {value:,.0f}"
    if name == "mfu":
        return f"mfu {100 * value:.2f}%"
    if name.endswith("_bytes"):
        return f"{name[:-6]} {value / 2**20:,.2f} MiB"
    if key.startswith(("time/", "comm/")) and name.endswith("_s"):
        return f"{name[:-2]} {1000 * value:,.1f} ms"
    if name.endswith("_gib"):
        return f"{name[:-4]} {value:.2f} GiB"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{name} {value}"
    return f"{name} {value:.4f}"
