"""Sample text from a causal checkpoint, with the model's own block-sparse attention.

    python -m train.generate --checkpoint runs/demo --prompt "def parse(path):" \
        [--max-tokens 64] [--temperature 0.8] [--top-k 40] [--seed 0] [--device cpu]

    from train.generate import SamplingArgs, generate, load_generator
    gen = load_generator("runs/demo")                 # the newest checkpoint, eval mode
    ids = generate(gen.model, gen.prompt_ids("def f("), SamplingArgs(max_tokens=32),
                   vocab_limit=gen.tokenizer.vocab_size, eos_id=gen.tokenizer.eos_id)
    print(gen.tokenizer.decode(ids))

One process, CPU or CUDA. The run's config.yaml names the model and its data directory, whose
sentencepiece model is the tokenizer (the one the trainer used: a checkpoint trained with
another tokenizer is refused). The weights are the newest complete checkpoint, consolidated
into the single-process model by train.export (any layout's checkpoint). A bidirectional
(masked-LM) checkpoint is refused: its tokens see the future, so it cannot continue a text.

Decoding recomputes the whole prefix for every new token: there is no KV cache. That is
O(n) forward passes of a model whose attention is linear in n, so O(n^2) work for n tokens;
plenty for inspecting a checkpoint, not a serving path. It keeps generation exactly the
training forward: `sparse_attention` at any length (a partial last block is padded inside)
with the random blocks drawn for step 0 and each layer's index, a deterministic pattern. With
BigBird's whole-sequence draw a query block's random blocks depend only on that block (causal
draws look only backwards), so a token's logits do not change as the text grows (tested); a
random-block pool (attention.random_pool_blocks > 0) is drawn over the current length, so
there the earlier tokens' attention may change, and recomputing the prefix is what the model
computes at that length. The prompt starts with the end-of-document
token, as every packed training document does (data/packing.py: it plays the role of BOS),
at position 0. Generation stops after `max_tokens` tokens, or at the end-of-document token
unless `stop_at_eos` is off. Past train.seq_len tokens RoPE sees positions it was not trained
on (a warning says so).

Sampling: temperature 0 is greedy (argmax); otherwise the logits are divided by the
temperature, all but the `top_k` largest dropped (0: keep all) and a token drawn from the
softmax with a torch.Generator seeded by `seed`, so a seed repeats its text. Logits of the
model's padding rows beyond the tokenizer's vocabulary are never chosen. Legend: v vocab.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.transformer import Transformer

__all__ = ["SamplingArgs", "Generator", "load_generator", "generate", "next_token", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingArgs:
    """How tokens are chosen."""

    max_tokens: int = 64
    """At most this many new tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax, no randomness)."""
    top_k: int = 0
    """Sample among the k likeliest tokens only; 0 keeps the whole vocabulary."""
    seed: int = 0
    """Seed of the sampling generator (the same seed and prompt give the same text)."""
    stop_at_eos: bool = True
    """Stop when the model ends the document (the end-of-document token, not printed)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"--max-tokens={self.max_tokens} must be >= 0")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k={self.top_k} must be >= 0 (0 = the whole vocabulary)")


def next_token(
    logits_v: torch.Tensor, args: SamplingArgs, generator: torch.Generator | None = None
) -> int:
    """The token chosen from one position's logits [v] (see the module docstring)."""
    logits_v = logits_v.float()
    if args.temperature == 0:
        return int(logits_v.argmax())
    logits_v = logits_v / args.temperature
    if 0 < args.top_k < logits_v.numel():
        kth = torch.topk(logits_v, args.top_k).values[-1]
        logits_v = logits_v.masked_fill(logits_v < kth, -float("inf"))
    probs = torch.softmax(logits_v, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    args: SamplingArgs,
    vocab_limit: int | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """The new token ids after `prompt_ids` (at least one id). Every step runs the model over
    the whole prefix at positions 0..n-1 with the attention of step 0 (no KV cache).
    `vocab_limit`: ids at or above it (the model's padding rows) are never chosen; `eos_id`:
    generation ends there when `args.stop_at_eos` (the token is not returned)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    if not model.attn_cfg.causal:
        raise ValueError(_BIDIRECTIONAL)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(args.seed)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(args.max_tokens):
        tokens_bn = torch.tensor([ids], device=device)
        logits_v = model(tokens_bn, step=0)[0, -1]
        if vocab_limit is not None and vocab_limit < logits_v.numel():
            logits_v = logits_v[:vocab_limit]
        token = next_token(logits_v, args, generator)
        if args.stop_at_eos and token == eos_id:
            break
        ids.append(token)
        new.append(token)
    return new


_BIDIRECTIONAL = (
    "this checkpoint is a bidirectional (masked-LM) encoder (attention.causal=false): every "
    "token sees the tokens after it, so it cannot continue a text; generation needs a causal "
    "language model (attention.causal=true, data.objective=clm)"
)


@dataclass
class Generator:
    """A loaded causal run: the eval-mode model, its tokenizer and config."""

    model: Transformer
    tokenizer: Any
    """data.tokenizer.Tokenizer of the run's data directory."""
    cfg: Any
    """The run's train.config.Config."""
    step: int
    """Optimizer steps of the loaded checkpoint."""

    def prompt_ids(self, text: str) -> list[int]:
        """The end-of-document token (a document's start in training), then `text`'s ids."""
        return [self.tokenizer.eos_id, *self.tokenizer.encode(text)]


def load_generator(run_dir: str | Path, device: str = "cpu") -> Generator:
    """The newest complete checkpoint of the causal run `run_dir`; ValueError for a
    bidirectional run or a tokenizer other than the checkpoint's, FileNotFoundError for what
    is missing."""
    from train.config import load_config
    from train.longeval import load_run

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: is {run_dir} a training run directory?")
    if not load_config(config_path).attention.causal:
        raise ValueError(f"{run_dir}: {_BIDIRECTIONAL}")
    run = load_run(run_dir, device)
    trained_with = run.state.get("tokenizer_sha256")
    if trained_with is not None and trained_with != run.tokenizer.sha256:
        raise ValueError(
            f"{run.cfg.data.path} holds another tokenizer (sha256 {run.tokenizer.sha256[:12]}...) "
            f"than the checkpoint of {run_dir} was trained with ({trained_with[:12]}...)"
        )
    return Generator(run.model, run.tokenizer, run.cfg, run.step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="run directory (with config.yaml)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-tokens", type=int, default=SamplingArgs.max_tokens)
    parser.add_argument("--temperature", type=float, default=SamplingArgs.temperature)
    parser.add_argument("--top-k", type=int, default=SamplingArgs.top_k)
    parser.add_argument("--seed", type=int, default=SamplingArgs.seed)
    parser.add_argument(
        "--ignore-eos", action="store_true", help="keep going past the end-of-document token"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        sampling = SamplingArgs(
            args.max_tokens, args.temperature, args.top_k, args.seed, not args.ignore_eos
        )
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but this torch sees no CUDA device")
        gen = load_generator(args.checkpoint, device)
        prompt = gen.prompt_ids(args.prompt)
        seq_len = gen.cfg.train.seq_len
        if len(prompt) + sampling.max_tokens > seq_len:
            log.warning(
                "prompt (%d tokens) + --max-tokens %d exceed train.seq_len=%d: positions past "
                "it were never trained", len(prompt), sampling.max_tokens, seq_len,
            )  # fmt: skip
        ids = generate(gen.model, prompt, sampling, gen.tokenizer.vocab_size, gen.tokenizer.eos_id)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + gen.tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
