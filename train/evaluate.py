"""Validation loss during training, and the long-context evaluation of a finished run.

    val_batches = build_val_batches(data_args, seq_len, micro_batch_size, max_batches=4)
    val_loss = evaluate(engine, val_batches)

    python -m train.evaluate --checkpoint runs/demo [--out runs/demo/eval.json] [--wandb]
        [--val-batches 8] [--contexts 512,1024,2048] [--depths 0.1,0.5,0.9] [--trials 5]
        [--candidates 8]

`evaluate` is the loop's validation: the batches come from the held-out split and are the same
at every evaluation, and the engine evaluates with a fixed random-block draw, so successive
values are comparable. The command loads the newest checkpoint of a run directory and writes
the loss by document position and the passkey-retrieval table (train/longeval.py) as JSON;
with --wandb it also logs them into the run's wandb run (offline without a key).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from train.engine import Engine

__all__ = ["evaluate", "main"]

log = logging.getLogger(__name__)


def evaluate(engine: Engine, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Summed loss over summed tokens of all `batches`; nan when they hold no token."""
    total, n_tokens = 0.0, 0
    for batch in batches:
        loss_sum, n = engine.eval_step(batch)
        total += loss_sum
        n_tokens += n
    return total / n_tokens if n_tokens else math.nan


def _json_safe(value: Any) -> Any:
    """NaN and infinity as null: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _numbers(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def _log_to_wandb(run: Any, result: dict[str, Any]) -> None:
    """Log the evaluation into the run's own wandb run (resumed by its id) at its step."""
    from train.config import config_to_dict
    from train.metrics import MetricsLogger

    run_id = run.state["progress"]["wandb_run_id"]
    if run_id is None:
        log.warning("--wandb: the checkpoint records no wandb run id; nothing logged")
        return
    metrics = MetricsLogger(run.cfg.logging, run.cfg.train.run_dir, config_to_dict(run.cfg), run_id)
    try:
        values = {"eval/passkey_accuracy": result["passkey"]["accuracy"]}
        for b in result["position_buckets"]:
            if b["tokens"]:
                values[f"eval/loss_pos_{b['lo']}_{b['hi']}"] = b["loss"]
        for row in result["passkey"]["table"]:
            key = f"eval/passkey_ctx{row['context']}_depth{row['depth']:.2f}"
            values[key] = row["accuracy"]
        metrics.log(run.step, values, console=False)
    finally:
        metrics.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="run directory (train.run_dir)")
    parser.add_argument("--out", help="JSON to write (default: RUN_DIR/eval.json)")
    parser.add_argument("--val-batches", type=int, default=8, help="held-out batches (0: all)")
    parser.add_argument("--contexts", help="passkey context lengths, comma separated")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="passkey depths")
    parser.add_argument("--trials", type=int, default=5, help="passkey prompts per cell")
    parser.add_argument("--candidates", type=int, default=8, help="keys scored per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wandb", action="store_true", help="log into the run's wandb run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from train.longeval import load_run, long_context_eval

    try:
        run = load_run(args.checkpoint, args.device)
        result = long_context_eval(
            run,
            val_batches=args.val_batches or None,
            contexts=_numbers(args.contexts, int) if args.contexts else None,
            depths=_numbers(args.depths, float),
            trials=args.trials,
            candidates=args.candidates,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"run_dir": str(args.checkpoint), **result}
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    if args.wandb:
        _log_to_wandb(run, result)
    lines = [f"step {result['step']}: loss by document position"]
    for b in result["position_buckets"]:
        lines.append(
            f"  [{b['lo']:>6}, {b['hi']:>6}) {b['tokens']:>8} tokens  loss {b['loss']:.4f}"
        )
    pk = result["passkey"]
    lines.append(f"passkey accuracy {pk['accuracy']:.3f} (chance {pk['chance']:.3f})")
    for row in pk["table"]:
        lines.append(
            f"  context {row['context']:>6} depth {row['depth']:.2f} distance "
            f"{row['distance']:>8.0f}  accuracy {row['accuracy']:.2f}"
        )
    print("\n".join(lines) + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
