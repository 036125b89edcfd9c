"""Long-context evaluation of a trained run: loss by position and passkey retrieval.

    python -m train.evaluate --checkpoint runs/demo [--out runs/demo/eval.json]

    from train.longeval import load_run, loss_by_position, passkey_accuracy
    run = load_run("runs/demo")                       # config, model (eval mode), tokenizer
    buckets = loss_by_position(run.model, val_batches, edges=position_edges(2048, 64))
    table = passkey_accuracy(run.model, run.tokenizer.encode, pad_id, contexts=[2048],
                             depths=[0.1, 0.5, 0.9], trials=5, candidates=8)

Position buckets: the next-token loss of every held-out token, grouped by its position inside its
document (`position_ids`; documents start at a sequence boundary), so a model that uses long
context shows a loss that keeps falling with position. Passkey: a document of filler lines with
`PASS_KEY = 12345` planted at a depth (0 = start, 1 = just before the question) ends with
`assert PASS_KEY == `; the model passes a trial when the true key is the likeliest of
`candidates` random 5-digit keys (summed log-probability of the key's tokens), so chance is
1 / candidates and no decoding is needed. Legend: K candidates, L context tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.sparse import sparse_attention
from model.transformer import Transformer

__all__ = [
    "FILLER",
    "NEEDLE",
    "QUESTION",
    "PasskeyPrompt",
    "LoadedRun",
    "load_run",
    "position_edges",
    "loss_by_position",
    "build_passkey_prompt",
    "passkey_accuracy",
    "long_context_eval",
]

log = logging.getLogger(__name__)

# Code-shaped, because the demo models learn from Python source: the filler is a comment line.
FILLER = "    # The grass is green. The sky is blue. The sun is yellow. Here we go again.\n"
NEEDLE = ("PASS_KEY = ", "  # remember the pass key\n")
"""Text before and after the key; the key's tokens are encoded on their own, exactly as the
candidates are, so the key in the prompt and the scored answer are the same token ids."""
QUESTION = "\nassert PASS_KEY == "

Encode = Callable[[str], list[int]]


# ---- loading a run --------------------------------------------------------------------------


@dataclass
class LoadedRun:
    cfg: Any
    """The run's resolved train.config.Config (from RUN_DIR/config.yaml)."""
    model: Transformer
    tokenizer: Any
    """data.tokenizer.Tokenizer of the run's prepared data."""
    step: int
    """Optimizer steps of the loaded checkpoint."""
    state: dict[str, Any]
    """The checkpoint payload (its "progress": losses, val_history, wandb_run_id, ...)."""


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """The newest complete checkpoint of `run_dir` as an eval-mode model, with its config and
    tokenizer; FileNotFoundError with the reason when something is missing."""
    from data.tokenizer import Tokenizer
    from train.checkpoint import CheckpointManager
    from train.config import load_config
    from train.export import consolidated_state_dict

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: is {run_dir} a training run directory?")
    cfg = load_config(config_path)
    manager = CheckpointManager(cfg.checkpoint, run_dir)
    state = manager.load_latest()
    if state is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.dir}")
    # any layout's checkpoint, in the single-process model's names (train.export)
    weights, _ = consolidated_state_dict(manager.path_of(int(state["step"])))
    model = Transformer(cfg.model, cfg.attention, attention_fn=sparse_attention)
    model.load_state_dict(weights)
    model.to(device).eval()
    tok_path = Path(cfg.data.path) / "tokenizer.model"
    if not tok_path.is_file():
        raise FileNotFoundError(f"the run's tokenizer {tok_path} is missing (data.path)")
    return LoadedRun(cfg, model, Tokenizer.load(tok_path), int(state["step"]), state)


# ---- loss by position -----------------------------------------------------------------------


def position_edges(seq_len: int, first: int) -> list[int]:
    """Bucket edges 0, first, 2*first, 4*first, ... up to seq_len (doubling widths)."""
    edges, edge = [0], first
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


@torch.no_grad()
def loss_by_position(
    model: Transformer, batches: Iterable[dict[str, torch.Tensor]], edges: Sequence[int]
) -> list[dict[str, float]]:
    """Mean next-token loss and perplexity of the tokens whose document position lies in each
    [edges[i], edges[i+1]); evaluated with the fixed random-block draw (step 0)."""
    n = len(edges) - 1
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    bounds = torch.tensor(list(edges[1:-1]))
    device = next(model.parameters()).device
    for batch in batches:
        logits = model(batch["tokens"].to(device), batch["position_ids"].to(device), step=0)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            batch["labels"].to(device).flatten().clamp(min=0),
            reduction="none",
        ).cpu()
        mask = batch["loss_mask"].flatten().double()
        bucket = torch.bucketize(batch["position_ids"].flatten(), bounds, right=True)
        sums.index_add_(0, bucket, loss.double() * mask)
        counts.index_add_(0, bucket, mask)
    out = []
    for i in range(n):
        tokens = int(counts[i])
        mean = float(sums[i] / counts[i]) if tokens else math.nan
        out.append(
            {
                "lo": int(edges[i]),
                "hi": int(edges[i + 1]),
                "tokens": tokens,
                "loss": mean,
                "ppl": math.exp(mean) if tokens else math.nan,
            }
        )
    return out


# ---- passkey retrieval ----------------------------------------------------------------------


@dataclass
class PasskeyPrompt:
    tokens: list[int]
    """The prompt: filler with the needle inside, then the question; the answer comes next."""
    key_ids: list[int]
    key_start: int
    """Index in `tokens` of the key's first token."""
    depth: float
    """Where the needle landed: its start over the filler tokens (0 = first, 1 = last)."""

    @property
    def distance(self) -> int:
        """Tokens from the key's first token to the answer position."""
        return len(self.tokens) - self.key_start


def build_passkey_prompt(
    encode: Encode,
    n_tokens: int,
    depth: float,
    key: str,
    filler: str = FILLER,
    needle: tuple[str, str] = NEEDLE,
    question: str = QUESTION,
) -> PasskeyPrompt:
    """A prompt of exactly `n_tokens` tokens with the needle at the filler line boundary nearest
    `depth` (in [0, 1]) and the question at the end."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth={depth} must lie in [0, 1]")
    key_ids = encode(key)
    before, after = encode(needle[0]), encode(needle[1])
    question_ids = encode(question)
    line = encode(filler)
    n_filler = n_tokens - len(before) - len(key_ids) - len(after) - len(question_ids)
    if n_filler < 0 or not line:
        raise ValueError(f"{n_tokens} tokens cannot hold the passkey needle and the question")
    filler_ids = (line * (n_filler // len(line) + 1))[:n_filler]
    # The needle starts a line, so it reads as a statement of the program.
    at = min(round(depth * n_filler / len(line)) * len(line), n_filler // len(line) * len(line))
    tokens = filler_ids[:at] + before + key_ids + after + filler_ids[at:] + question_ids
    return PasskeyPrompt(
        tokens=tokens,
        key_ids=key_ids,
        key_start=at + len(before),
        depth=at / n_filler if n_filler else 0.0,
    )


def _random_keys(rng: random.Random, count: int, digits: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if key not in keys:
            keys.append(key)
    return keys


@torch.no_grad()
def _candidate_scores(
    model: Transformer,
    prompt: list[int],
    candidates: list[list[int]],
    context: int,
    pad_id: int,
    chunk: int = 4,
) -> list[float]:
    """Summed log-probability of each candidate's tokens right after `prompt`, every row padded
    to `context` tokens (padding after the answer is invisible to a causal model)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for first in range(0, len(candidates), chunk):
        group = candidates[first : first + chunk]
        rows = [prompt + c + [pad_id] * (context - len(prompt) - len(c)) for c in group]
        logits = model(torch.tensor(rows, device=device), step=0)  # [k, L, V]
        logp = logits[:, len(prompt) - 1 :].float().log_softmax(-1)
        for i, cand in enumerate(group):
            picked = logp[i, torch.arange(len(cand)), torch.tensor(cand, device=device)]
            scores.append(float(picked.sum()))
    return scores


def passkey_accuracy(
    model: Transformer,
    encode: Encode,
    pad_id: int,
    contexts: Sequence[int],
    depths: Sequence[float],
    trials: int = 5,
    candidates: int = 8,
    digits: int = 5,
    seed: int = 0,
) -> list[dict[str, float]]:
    """One row per (context, depth): accuracy over `trials` prompts (the true key scored above
    every other candidate), the mean key-to-answer distance, and the needle's actual depth."""
    if candidates < 2 or trials < 1:
        raise ValueError("passkey needs candidates >= 2 and trials >= 1")
    rows = []
    for context in contexts:
        for depth in depths:
            hits, distances, placed = 0, [], []
            for trial in range(trials):
                rng = random.Random(f"passkey:{seed}:{context}:{depth}:{trial}")
                keys = _random_keys(rng, candidates, digits)
                cand_ids = [encode(k) for k in keys]
                width = max(len(c) for c in cand_ids)
                prompt = build_passkey_prompt(encode, context - width, depth, keys[0])
                scores = _candidate_scores(model, prompt.tokens, cand_ids, context, pad_id)
                hits += int(scores[0] > max(scores[1:]))
                distances.append(prompt.distance)
                placed.append(prompt.depth)
            rows.append(
                {
                    "context": int(context),
                    "depth": float(depth),
                    "actual_depth": sum(placed) / trials,
                    "distance": sum(distances) / trials,
                    "trials": trials,
                    "accuracy": hits / trials,
                }
            )
    return rows


def _valid_contexts(attn_cfg, seq_len: int, requested: Sequence[int] | None) -> list[int]:
    wanted = list(requested) if requested else [seq_len // 4, seq_len // 2, seq_len]
    ok = []
    for n in sorted(set(wanted)):
        try:
            attn_cfg.validate_seq_len(n)
        except ValueError as e:
            if requested:
                raise
            log.info("passkey: skipping context %d (%s)", n, e)
            continue
        ok.append(n)
    return ok


def long_context_eval(
    run: LoadedRun,
    val_batches: int | None = 8,
    contexts: Sequence[int] | None = None,
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    trials: int = 5,
    candidates: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Both evaluations of a loaded run, as a JSON-ready dict."""
    from data.loader import build_val_batches

    cfg = run.cfg
    seq_len, block = cfg.train.seq_len, cfg.attention.block_size
    # Every document starts a sequence, so position_ids count the document's own context.
    data_args = dataclasses.replace(cfg.data, doc_start_at_boundary=True)
    batches = build_val_batches(
        data_args, seq_len, cfg.train.micro_batch_size, val_batches, cfg.attention.etc_tokens
    )
    buckets = loss_by_position(run.model, batches, position_edges(seq_len, block))
    ctx = _valid_contexts(cfg.attention, seq_len, contexts)
    table = passkey_accuracy(
        run.model, run.tokenizer.encode, run.tokenizer.pad_id, ctx, depths, trials,
        candidates, seed=seed,
    )  # fmt: skip
    total = sum(r["accuracy"] * r["trials"] for r in table)
    return {
        "step": run.step,
        "seq_len": seq_len,
        "position_buckets": buckets,
        "passkey": {
            "candidates": candidates,
            "chance": 1.0 / candidates,
            "accuracy": total / sum(r["trials"] for r in table) if table else math.nan,
            "table": table,
        },
    }
