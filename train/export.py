"""Consolidate a checkpoint into one state dict of the single-process model.

    python -m train.export --checkpoint runs/demo --out model.pt        # newest checkpoint
    python -m train.export --checkpoint runs/demo/checkpoints/step_000200 --out model.pt

    model = Transformer(cfg.model, cfg.attention)      # the run's config.yaml
    model.load_state_dict(torch.load("model.pt"))

The local and Megatron engines' checkpoints hold their parameters in model space
(train.model_space: the single-process names and unpadded shapes, written with
torch.distributed.checkpoint by any layout); this reads them in one process, without
torch.distributed, and writes a plain `model.transformer.Transformer` state dict (a tied LM
head repeats the embedding, as Transformer.state_dict does). DeepSpeed checkpoints are not
read here (DeepSpeed's zero_to_fp32 does that).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import read_meta, step_dir_of
from train.sharded_state import ShardedStateRef

__all__ = ["consolidated_state_dict", "export", "main"]

log = logging.getLogger(__name__)


def _rank0_state(step_dir: Path) -> dict[str, Any]:
    world = read_meta(step_dir).get("world", 1)
    path = step_dir / ("state.pt" if world == 1 else "state_rank00000.pt")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint {step_dir} is incomplete")
    # weights_only=False: our own file (RNG states, the config).
    return torch.load(path, map_location="cpu", weights_only=False)


def consolidated_state_dict(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the single-process Transformer's state dict, the run's resolved config) of
    `checkpoint`: a run directory, a checkpoint directory or one step_N directory."""
    from model.registry import build_model
    from train.config import config_from_dict

    step_dir = step_dir_of(checkpoint)
    state = _rank0_state(step_dir)
    cfg = config_from_dict(state["config"])
    engine = state.get("engine", {})
    if engine.get("deepspeed"):
        raise ValueError(
            f"{step_dir} was written by the DeepSpeed engine: consolidate it with DeepSpeed's "
            "zero_to_fp32 (deepspeed.utils.zero_to_fp32) instead"
        )
    ref = engine.get("tensors")
    if not isinstance(ref, ShardedStateRef):
        raise ValueError(f"{step_dir} holds no model-space tensors (written by an older halotron)")
    tensors = _read_model_tensors(step_dir / ref.name)
    with torch.device("meta"):
        names = build_model(cfg.model, cfg.attention).state_dict()
    out = {}
    for name in names:
        source = f"model.{name}"
        if source not in tensors and name == "lm_head.weight" and cfg.model.tie_embeddings:
            source = "model.embed.weight"
        if source not in tensors:
            raise ValueError(f"the checkpoint {step_dir} has no tensor for {name!r}")
        out[name] = tensors[source].float()
    log.info("step %d of %s: %d tensors", state["step"], step_dir, len(out))
    return out, state["config"]


def _read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}/.metadata is missing: the checkpoint is incomplete")
    return ShardedStateRef(path.name, path).read_whole("model.")


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the consolidated state dict of `checkpoint` to `out` (torch.save)."""
    state_dict, config = consolidated_state_dict(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out)
    n_params = sum(v.numel() for k, v in state_dict.items() if k != "lm_head.weight")
    model = config["model"]
    print(
        f"wrote {out}: {len(state_dict)} tensors, {n_params / 1e6:.2f}M parameters "
        f"(d_model={model['d_model']}, n_layers={model['n_layers']}, "
        f"vocab_size={model['vocab_size']}); load it into Transformer(cfg.model, cfg.attention)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoint directory or step_N"
    )
    parser.add_argument("--out", required=True, help="file to write (a torch state dict)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(f"reading {args.checkpoint} ...")
        export(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
