"""Move weights between Hugging Face checkpoints and halotron runs.

    python -m train.hf import --hf-dir path/to/llama --out runs/llama [--config recipe.yaml] \
        data.path=artifacts/data/stdlib [section.key=value ...]
    python -m train --config runs/llama/config.yaml --resume        # continue it (any layout)
    python -m train.hf export --checkpoint runs/llama --out hf_llama [--model-type llama]

`import` reads an HF model directory (config.json and safetensors or .bin weights), picks the
converter of its `config.model_type` (CONVERTERS; others are refused with the list of known
ones) and writes a halotron run at step 0: RUN_DIR/config.yaml (the recipe, with the model
keys the checkpoint fixes) and RUN_DIR/checkpoints/step_000000 with every Stateful the Trainer
saves, written by a one-process Trainer whose model holds the converted weights. That
checkpoint is in model space (train.model_space), so `python -m train --resume` continues it
under any tp / pp / cp / dp layout the recipe or its overrides choose. Unless the recipe gives
an attention pattern (any attention key but block_size, causal and seed), the run gets full
attention (causal for a decoder, both sides for an encoder): a window of every block of
train.seq_len, no global or random blocks, which is the HF model's function. A sparse pattern
changes the function (a warning says so). Longformer and BigBird block_sparse checkpoints fix
their own pattern (train/hf_encoder.py).
The tokenizer of data.path must be the checkpoint's: its ids index the embedding.

`export` reads a run's newest checkpoint (train.export, any layout) and writes the HF model
with save_pretrained plus the run's sentencepiece tokenizer wrapped for HF (AutoTokenizer gives
the same ids). The converter is the one whose halotron `model.arch` is the run's, or
--model-type. docs/hf.md says what is exact.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import CheckpointManager
from train.config import Config, load_config, parse_overrides, read_yaml, save_config
from train.hf_common import (
    Converter,
    read_hf_config,
    uncovered_layers,
    write_hf_tokenizer,
)
from train.hf_encoder import (
    BigBirdConverter,
    LongformerConverter,
    RobertaConverter,
    requested_seq_len,
)
from train.hf_llama import LlamaConverter

__all__ = [
    "CONVERTERS", "converter_for", "import_config", "import_hf", "export_hf",
    "full_attention", "uncovered_layers", "main",
]  # fmt: skip

log = logging.getLogger(__name__)

CONVERTERS: dict[str, Converter] = {
    "llama": LlamaConverter(),
    "roberta": RobertaConverter(),
    "longformer": LongformerConverter(),
    "big_bird": BigBirdConverter(),
}
"""HF `config.model_type` -> its converter (train.hf_common.Converter)."""

NOT_PATTERN = ("block_size", "causal", "seed")
"""Attention keys a recipe may give without choosing the pattern (import keeps full attention)."""


def converter_for(model_type: Any) -> Converter:
    """The converter of an HF model type; ValueError listing the known ones."""
    if model_type not in CONVERTERS:
        raise ValueError(
            f"HF model_type={model_type!r} has no converter; known model types: "
            f"{', '.join(sorted(CONVERTERS))}"
        )
    return CONVERTERS[model_type]


def full_attention(seq_len: int, block_size: int, causal: bool = True) -> dict[str, int]:
    """The attention keys of full (causal or bidirectional) attention over `seq_len` tokens: a
    window of every block on each side it looks (clipped to the sequence at shorter lengths),
    no global and no random blocks."""
    n_blocks = -(-seq_len // block_size)
    window = n_blocks if causal else 2 * n_blocks - 1
    return {"window_blocks": window, "global_blocks": 0, "random_blocks": 0}


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def import_config(
    recipe: str | Path | None,
    overrides: list[str],
    fixed: dict[str, dict[str, Any]],
    run_dir: str | Path,
) -> Config:
    """The run's config: the recipe and its overrides, with the `fixed` values ({"model": ...,
    "attention": ...}, what the checkpoint determines) in place of the recipe's (an override
    of one is refused), train.run_dir = `run_dir`, and full attention unless the recipe or
    the overrides give an attention pattern."""
    given = parse_overrides(overrides)
    written = (read_yaml(recipe) or {}) if recipe is not None else {}
    if not isinstance(written, dict):
        written = {}  # load_config below refuses it with its sentence
    for section, values in fixed.items():
        clash = sorted(set(values) & set(given.get(section, {})))
        if clash:
            raise ValueError(
                f"{', '.join(f'{section}.{k}' for k in clash)} cannot be overridden: the HF "
                f"checkpoint fixes it ({', '.join(f'{k}={values[k]}' for k in clash)})"
            )
        replaced = {
            k: v for k, v in (written.get(section) or {}).items() if k in values and v != values[k]
        }
        if replaced:
            log.info(
                "the HF checkpoint fixes %s (the recipe had %s)",
                ", ".join(f"{section}.{k}={values[k]}" for k in replaced),
                ", ".join(f"{k}={v}" for k, v in replaced.items()),
            )
    pinned = [f"{s}.{k}={_value(v)}" for s, values in fixed.items() for k, v in values.items()]
    pinned.append(f"train.run_dir={run_dir}")
    cfg = load_config(recipe, [*overrides, *pinned])
    chosen = {**(written.get("attention") or {}), **given.get("attention", {})}
    if set(chosen) - set(NOT_PATTERN) or set(fixed.get("attention", {})) - set(NOT_PATTERN):
        return cfg
    full = full_attention(cfg.train.seq_len, cfg.attention.block_size, cfg.attention.causal)
    return load_config(
        recipe, [*overrides, *pinned, *(f"attention.{k}={v}" for k, v in full.items())]
    )


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Convert the HF model in `hf_dir` into a halotron run in `out` at step 0 (module doc);
    returns the run's config."""
    from train.loop import Trainer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("python -m train.hf import runs in one process: start it without torchrun")
    hf_dir = Path(hf_dir)
    converter = converter_for(read_hf_config(hf_dir).get("model_type"))
    model, attention, state = converter.from_hf(hf_dir)
    fit_to = getattr(converter, "fit_to", None)  # encoders: RoBERTa -> Longformer positions
    if fit_to is not None:
        seq_len = requested_seq_len(recipe, list(overrides))
        model, attention, state = fit_to(model, attention, state, seq_len)
    cfg = import_config(recipe, list(overrides), {"model": model, "attention": attention}, out)
    if cfg.train.engine == "deepspeed":
        raise ValueError(
            "train.engine=deepspeed cannot resume the imported checkpoint (DeepSpeed resumes only "
            "its own checkpoints): import with train.engine=auto or megatron"
        )
    steps = CheckpointManager(cfg.checkpoint, out).complete_steps()
    if steps:
        raise ValueError(
            f"{out} already holds checkpoints (newest step {steps[-1]}): import into a new "
            "directory"
        )
    sparse = uncovered_layers(cfg)
    if sparse and not set(attention) - set(NOT_PATTERN):  # not the checkpoint's own pattern
        log.warning(
            "the recipe's attention pattern is sparse in layers %s at train.seq_len=%d: the "
            "imported model computes another function than the HF model (its logits equal HF's "
            "only with full attention)", sparse, cfg.train.seq_len,
        )  # fmt: skip
    # One process writes step 0: the local engine's state is model space, any layout resumes it.
    single = replace(cfg.parallel, tp=1, pp=1, cp=1, dp=None, sequence_parallel=False)
    local = replace(
        cfg,
        parallel=single,
        train=replace(cfg.train, engine="local"),
        logging=replace(cfg.logging, wandb_mode="disabled", progress_bar=False),
    )
    with Trainer(local) as trainer:
        with torch.no_grad():
            trainer.engine.model.load_state_dict(state, strict=True)
        trainer.save()
        trainer.ckpt.finalize()
    save_config(cfg, Path(out) / "config.yaml")  # the recipe's layout, engine and logging
    return cfg


def export_hf(checkpoint: str | Path, out: str | Path, model_type: str | None = None) -> Path:
    """Write the newest checkpoint of the run `checkpoint` as an HF model with its tokenizer
    in `out`."""
    from data.tokenizer import Tokenizer
    from train.export import consolidated_state_dict

    run_dir = Path(checkpoint)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: is {run_dir} a training run directory?")
    cfg = load_config(config_path)
    if model_type is not None:
        converter = converter_for(model_type)
    else:
        matching = sorted(t for t, c in CONVERTERS.items() if c.arch == cfg.model.arch)
        if len(matching) > 1:  # the encoders: the one whose model the run is
            matching = [t for t in matching if getattr(CONVERTERS[t], "accepts", bool)(cfg)]
        if not matching:
            raise ValueError(f"no converter exports model.arch={cfg.model.arch!r} yet")
        if len(matching) > 1:
            raise ValueError(
                f"model.arch={cfg.model.arch!r} is exported as {', '.join(matching)}: choose "
                "one with --model-type"
            )
        converter = CONVERTERS[matching[0]]
    manager = CheckpointManager(cfg.checkpoint, run_dir)
    state = manager.load_latest()
    if state is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.dir}")
    tokenizer_file = Path(cfg.data.path) / "tokenizer.model"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"the run's tokenizer {tokenizer_file} is missing (data.path)")
    trained_with = state.get("tokenizer_sha256")
    if trained_with is not None and trained_with != Tokenizer.load(tokenizer_file).sha256:
        raise ValueError(
            f"{tokenizer_file} is another tokenizer than the checkpoint of {run_dir} was "
            f"trained with (sha256 {trained_with[:12]}...)"
        )
    sparse = uncovered_layers(cfg)
    if sparse and not getattr(converter, "exports_pattern", lambda cfg: False)(cfg):
        log.warning(
            "the run attends sparsely in layers %s at train.seq_len=%d; the HF model attends to "
            "every token (every earlier one in a decoder), so its logits are not the run's",
            sparse, cfg.train.seq_len,
        )  # fmt: skip
    weights, _ = consolidated_state_dict(manager.path_of(int(state["step"])))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    converter.to_hf(cfg, weights, out)
    write_hf_tokenizer(tokenizer_file, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.hf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="an HF model directory -> a halotron run at step 0")
    imp.add_argument("--hf-dir", required=True, help="HF model directory (config.json, weights)")
    imp.add_argument("--out", required=True, help="the new run directory (train.run_dir)")
    imp.add_argument("--config", help="YAML recipe (defaults apply when omitted)")
    imp.add_argument("overrides", nargs="*", help="section.key=value overrides")
    exp = commands.add_parser("export", help="a halotron run's newest checkpoint -> an HF model")
    exp.add_argument("--checkpoint", required=True, help="run directory (with config.yaml)")
    exp.add_argument("--out", required=True, help="HF model directory to write")
    exp.add_argument("--model-type", help=f"HF model type ({', '.join(sorted(CONVERTERS))})")
    argv = sys.argv[1:] if argv is None else argv
    sub = {"import": imp, "export": exp}
    if not argv or argv[0] not in sub:
        parser.parse_args(argv)  # prints the usage and exits
    # Per command, so that overrides and options may come in any order.
    args = sub[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "import":
            cfg = import_hf(args.hf_dir, args.out, args.config, args.overrides)
            print(
                f"wrote {args.out}: config.yaml and checkpoints/step_000000 "
                f"(d_model={cfg.model.d_model}, n_layers={cfg.model.n_layers}, vocab_size="
                f"{cfg.model.vocab_size}); continue with: python -m train --config "
                f"{Path(args.out) / 'config.yaml'} --resume"
            )
        else:
            out = export_hf(args.checkpoint, args.out, args.model_type)
            print(f"wrote {out}: load it with transformers' from_pretrained (model and tokenizer)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
