"""Passkey beyond the window: window-only vs BigBird (whole-sequence and pooled random blocks)
at the same attention budget, trained.

    python -m benchmarks.passkey_paths [--steps 1000] [--seq-len 256] [--layers 2]
                                       [--pool-blocks 4] [--quick]
                                       [--out benchmarks/results/passkey_paths.json]

Three causal models of the same size, seed, data and number of steps differ only in the pattern:
- window: a sliding window of 6 blocks, no global and no random blocks;
- bigbird: the demo's pattern (configs/demo.yaml): window 3 blocks, 1 global, 2 random, the
  random blocks drawn from the whole sequence (random_pool_blocks=0, forced whatever the
  demo config says);
- bigbird_pool: the same with random_pool_blocks=P (`--pool-blocks`): each (step, layer) draws
  a stratified pool of P blocks, one per 1/P of the sequence, and every query block draws its
  2 random blocks from the pool blocks outside its window (model/sparse_random.py).
P defaults to 4, a quarter of the 16 blocks of the default sequence: one pool block per
4-block stratum, so the last query block still finds about 3 pool blocks before its window
to draw its 2 from, while the pool is a real restriction (a quarter of the candidates, the
regime in which a pool pays under context parallelism: traffic flat in N) and a multiple of
the usual cp degrees 2 and 4 (every rank sends the same).
Each query block attends to 6 key blocks in all three, and `train.flops.attention_pairs` (the
pattern's exact pair count, the MFU budget) is the same to the pair for window and bigbird;
bigbird_pool never spends more and spends a little less (about 6 % at the defaults, varying
with the step's pool): a causal query block early in the sequence may find fewer than 2 pool
blocks before its window. The report gives each pattern's pairs averaged over the training
steps. Defaults: block 16, 256 tokens (16 blocks), 2 layers of width 64, so the window-only
receptive field is 10 blocks and about a third of the keys lie beyond it; about 10 min on 2
idle CPU cores.

Task (synthetic, integer tokens): a cyclic filler, a MARKER followed by a `key_len`-token
key planted at a uniformly random position, and at the end QUERY then the key again; the loss is
the cross entropy of the key tokens at the answer positions only (teacher forced). Key token i
comes from its own vocabulary of `key_values` ids, so chance is 1/key_values per token and
1/key_values**key_len for the whole key. Training plants half of the keys (`--near-fraction`)
in the last 2 blocks before QUERY, which every pattern sees directly (a curriculum;
`--near-fraction 0` trains on uniform keys only); evaluation plants every key uniformly.

A window-only model with L layers sees from the last block back L * (window_blocks - 1) blocks
(its receptive field: `window_reach_blocks`); a key before that is invisible to it, so its
accuracy there must be chance. In a causal model the global block is a visible prefix, so a key
beyond the window reaches the answer only through random blocks (or by sitting in the prefix).
Accuracy is reported by bucket, each token accuracy with its binomial standard error
(`stderr`, the key tokens counted as trials): `within_reach`, `beyond_reach`, and beyond reach
split by whether the evaluated step's random draw connects the key to the answer
(`beyond_with_path`, `beyond_without_path`, from the composed dense masks). Evaluation uses
fresh draws (steps after the training steps), as training does, and the same sequences for
every pattern. Writes JSON with a `verdict` (`verdict()`: the window-only model at chance
beyond its reach, BigBird above chance there when a path exists, at 3 binomial standard
deviations; and whether bigbird_pool is) and `pool_vs_whole` (`pool_vs_whole()`: bigbird_pool
minus bigbird beyond reach, its standard error and z; the pool matches the whole-sequence
draw when |z| < 2); exits 0 either way. The structural twin of this benchmark (gradients are
exactly zero beyond the receptive field) is tests/unit/test_passkey_paths.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.sparse import SparsityConfig, sparse_attention
from model.transformer import ModelArgs, Transformer
from train.config import load_config
from train.engine import OptimArgs, ScheduleArgs, lr_at
from train.flops import attention_pairs

RESULTS = Path(__file__).parent / "results" / "passkey_paths.json"
DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
BUCKETS = ("within_reach", "beyond_reach", "beyond_with_path", "beyond_without_path")


@dataclass(frozen=True)
class PasskeyTask:
    """Vocabulary layout and geometry of the synthetic passkey sequences."""

    seq_len: int = 512
    """Tokens per sequence, the answer positions included."""
    key_len: int = 2
    """Tokens of the key."""
    key_values: int = 16
    """Values each key token can take (its own id range per key position)."""
    filler_values: int = 16
    """Ids of the filler, which cycles through them from a random phase (the repeated filler
    line of train/longeval.py's passkey prompt, in integers)."""

    @property
    def marker(self) -> int:
        return self.filler_values

    @property
    def query(self) -> int:
        return self.filler_values + 1

    @property
    def vocab_size(self) -> int:
        return self.filler_values + 2 + self.key_len * self.key_values

    @property
    def answer_start(self) -> int:
        """Position of QUERY, whose logits predict the first key token."""
        return self.seq_len - self.key_len

    def batch(
        self, gen: torch.Generator, size: int, near_fraction: float = 0.0, near_tokens: int = 0
    ) -> dict[str, torch.Tensor]:
        """tokens [size, seq_len], keys [size, key_len] (the answers as token ids) and
        key_start [size] (position of the key's first token). The key is planted uniformly,
        except in a `near_fraction` of the rows, where its marker lies in the last `near_tokens`
        tokens before QUERY."""
        n, k, q = self.seq_len, self.key_len, self.answer_start
        phase = torch.randint(0, self.filler_values, (size, 1), generator=gen)
        tokens = (phase + torch.arange(n)) % self.filler_values
        offsets = self.filler_values + 2 + self.key_values * torch.arange(k)
        keys = torch.randint(0, self.key_values, (size, k), generator=gen) + offsets
        marker_at = torch.randint(0, q - k, (size,), generator=gen)  # the key ends before QUERY
        if near_fraction > 0:
            lowest = max(0, q - k - near_tokens)
            near = torch.randint(lowest, q - k, (size,), generator=gen)
            marker_at = torch.where(
                torch.rand(size, generator=gen) < near_fraction, near, marker_at
            )
        rows = torch.arange(size)
        tokens[rows, marker_at] = self.marker
        for i in range(k):
            tokens[rows, marker_at + 1 + i] = keys[:, i]
        tokens[:, q] = self.query
        tokens[:, q + 1 :] = keys[:, : k - 1]
        return {"tokens": tokens, "keys": keys, "key_start": marker_at + 1}


def patterns(block_size: int, pool_blocks: int = 4) -> dict[str, SparsityConfig]:
    """The window-only pattern, the demo's causal BigBird pattern (configs/demo.yaml at
    `block_size`, random blocks from the whole sequence) and the same with a pool of
    `pool_blocks` random candidates; the window is as wide as window + global + random key
    blocks per query block."""
    if pool_blocks < 1:
        raise ValueError(f"pool_blocks={pool_blocks} must be >= 1 (0 is the bigbird pattern)")
    demo = load_config(DEMO_CONFIG).attention
    bigbird = replace(demo, block_size=block_size, random_pool_blocks=0)
    width = bigbird.window_blocks + bigbird.global_blocks + bigbird.random_blocks
    window = replace(bigbird, window_blocks=width, global_blocks=0, random_blocks=0)
    pool = replace(bigbird, random_pool_blocks=pool_blocks)
    return {"window": window, "bigbird": bigbird, "bigbird_pool": pool}


def window_reach_blocks(cfg: SparsityConfig, n_layers: int) -> int:
    """Blocks before its own that a query block's receptive field spans through the window
    alone after `n_layers` layers (causal: its left reach per layer)."""
    return n_layers * cfg.reach_blocks[0]


def reachable_from(cfg: SparsityConfig, seq_len: int, n_layers: int, step: int, query: int):
    """bool [seq_len]: tokens whose embedding can influence position `query`'s output through
    the composed attention masks of the layers at `step` (exact; O(seq^2) per layer)."""
    seen = torch.zeros(seq_len)
    seen[query] = 1.0
    for layer in reversed(range(n_layers)):
        mask = cfg.dense_mask(seq_len, layer=layer, step=step)[0].float()
        seen = ((seen @ mask) > 0).float()
    return seen.bool()


def train(
    cfg: SparsityConfig,
    task: PasskeyTask,
    model_args: ModelArgs,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    log_every: int,
    near_fraction: float = 0.0,
    near_tokens: int = 0,
) -> tuple[Transformer, list[dict[str, float]], float]:
    """AdamW on the answer loss with the trainer's schedule (`train.engine.lr_at`: linear warmup
    over a tenth of the steps, then cosine decay to lr / 10); the same batches for every
    pattern (one generator per run, seeded alike; `near_*`: PasskeyTask.batch). Returns the
    model, the loss curve (mean over each `log_every` steps) and the seconds spent."""
    model = Transformer(model_args, cfg, attention_fn=sparse_attention, seed=seed)
    optim = OptimArgs(lr=lr, weight_decay=0.0)
    schedule = ScheduleArgs(warmup_steps=max(1, steps // 10), min_lr=lr / 10)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, optim, schedule, steps) / optim.lr
    )
    gen = torch.Generator().manual_seed(seed)
    q = task.answer_start
    curve, window_losses = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        data = task.batch(gen, batch, near_fraction, near_tokens)
        logits = model(data["tokens"], step=step)[:, q:]
        loss = F.cross_entropy(logits.flatten(0, 1), data["keys"].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window_losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": sum(window_losses) / len(window_losses)})
            window_losses = []
            print(f"  step {step + 1}: answer loss {curve[-1]['loss']:.3f}", flush=True)
    return model, curve, time.perf_counter() - t0


@torch.no_grad()
def evaluate(
    model: Transformer,
    cfg: SparsityConfig,
    task: PasskeyTask,
    reach: int,
    samples: int,
    batch: int,
    first_step: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Greedy accuracy of the key tokens (per token, with its `binomial_stderr`, and whole key)
    by bucket, `reach` being the window-only receptive field in blocks (the same buckets for
    every pattern); each batch uses the random draw of its own step, from `first_step` on
    (draws training never saw)."""
    model.eval()
    n_layers = model.args.n_layers
    gen = torch.Generator().manual_seed(seed)
    q, n, b = task.answer_start, task.seq_len, cfg.block_size
    # The key must be seen by every answer position; the answer sits in the last block.
    last_block = (n - 1) // b
    tallies = {name: [0, 0.0, 0.0] for name in BUCKETS}  # samples, token hits, key hits
    for i in range((samples + batch - 1) // batch):
        step = first_step + i
        data = task.batch(gen, min(batch, samples - i * batch))
        pred = model(data["tokens"], step=step)[:, q:].argmax(-1)
        hits = (pred == data["keys"]).float()
        path = reachable_from(cfg, n, n_layers, step, q)
        for row in range(hits.shape[0]):
            start = int(data["key_start"][row])
            key_pos = torch.arange(start, start + task.key_len)
            within = start // b >= last_block - reach
            with_path = bool(path[key_pos].all())
            names = ["within_reach"] if within else ["beyond_reach"]
            if not within:
                names.append("beyond_with_path" if with_path else "beyond_without_path")
            for name in names:
                t = tallies[name]
                t[0] += 1
                t[1] += float(hits[row].mean())
                t[2] += float(hits[row].all())
    model.train()
    return {name: summarize_bucket(t[0], t[1], t[2], task.key_len) for name, t in tallies.items()}


def summarize_bucket(
    samples: float, token_hits: float, key_hits: float, key_len: int
) -> dict[str, Any]:
    """A bucket's report from its tallies (None accuracies when it is empty)."""
    n = int(samples)
    if not n:
        return {"samples": 0, "token_accuracy": None, "stderr": None, "key_accuracy": None}
    token_accuracy = token_hits / n
    return {
        "samples": n,
        "token_accuracy": round(token_accuracy, 4),
        "stderr": round(binomial_stderr(token_accuracy, n * key_len), 4),
        "key_accuracy": round(key_hits / n, 4),
    }


def binomial_stderr(p: float, trials: int) -> float:
    """sqrt(p (1 - p) / trials): the standard error of an accuracy `p` over `trials` tokens
    (the key tokens of a sample counted as independent trials, which they are not quite)."""
    return math.sqrt(p * (1 - p) / trials)


def _above(bucket: dict[str, Any], chance: float, key_len: int) -> float | None:
    """How many binomial standard deviations the bucket's token accuracy lies above `chance`
    (its key tokens counted as trials); None for an empty bucket."""
    n = bucket["samples"] * key_len
    if not n:
        return None
    sigma = math.sqrt(chance * (1 - chance) / n)
    return round((bucket["token_accuracy"] - chance) / sigma, 2)


def verdict(report: dict[str, Any], sigmas: float = 3.0) -> dict[str, Any]:
    """What the run shows, each claim a boolean from the accuracies (per-token, against the
    chance 1/key_values, at `sigmas` binomial standard deviations):
    - window_beyond_at_chance: the window-only model is not above chance beyond its reach;
    - bigbird_beyond_with_path_above_chance: BigBird retrieves keys beyond the window's reach
      when the step's random/global blocks connect them to the answer;
    - bigbird_beyond_without_path_at_chance: and not when they do not (None: no such sample);
    `demonstrated` is all three (the last may be None). Apart from it:
    - bigbird_pool_beyond_with_path_above_chance: the same as the second claim for the pooled
      draw (None: its draws connected no key beyond reach to the answer)."""
    chance = report["chance"]["token_accuracy"]
    key_len = report["settings"]["task"]["key_len"]
    window = report["patterns"]["window"]["accuracy"]
    bigbird = report["patterns"]["bigbird"]["accuracy"]
    pool = report["patterns"]["bigbird_pool"]["accuracy"]
    z = {
        "window_beyond_reach": _above(window["beyond_reach"], chance, key_len),
        "bigbird_beyond_with_path": _above(bigbird["beyond_with_path"], chance, key_len),
        "bigbird_beyond_without_path": _above(bigbird["beyond_without_path"], chance, key_len),
        "bigbird_pool_beyond_with_path": _above(pool["beyond_with_path"], chance, key_len),
    }
    claims = {
        "window_beyond_at_chance": z["window_beyond_reach"] is not None
        and z["window_beyond_reach"] < sigmas,
        "bigbird_beyond_with_path_above_chance": z["bigbird_beyond_with_path"] is not None
        and z["bigbird_beyond_with_path"] >= sigmas,
        "bigbird_beyond_without_path_at_chance": None
        if z["bigbird_beyond_without_path"] is None
        else z["bigbird_beyond_without_path"] < sigmas,
    }
    pool_with_path = z["bigbird_pool_beyond_with_path"]
    return {
        "sigmas": sigmas,
        "z_above_chance": z,
        **claims,
        "demonstrated": all(v is not False for v in claims.values()),
        "bigbird_pool_beyond_with_path_above_chance": None
        if pool_with_path is None
        else pool_with_path >= sigmas,
    }


def pool_vs_whole(report: dict[str, Any], bucket: str = "beyond_reach") -> dict[str, Any]:
    """bigbird_pool's token accuracy in `bucket` minus bigbird's, with the standard error of
    the difference (the two binomial standard errors in quadrature, as for independent
    samples: both models see the same sequences, which this ignores) and z = difference /
    stderr; `pool_matches_whole` is |z| < 2. All None when a bucket is empty or both standard
    errors are 0 (z undefined)."""
    pool = report["patterns"]["bigbird_pool"]["accuracy"][bucket]
    whole = report["patterns"]["bigbird"]["accuracy"][bucket]
    out: dict[str, Any] = {
        "bucket": bucket,
        "pool_token_accuracy": pool["token_accuracy"],
        "whole_token_accuracy": whole["token_accuracy"],
        "difference": None,
        "stderr": None,
        "z": None,
        "pool_matches_whole": None,
    }
    if not pool["samples"] or not whole["samples"]:
        return out
    difference = pool["token_accuracy"] - whole["token_accuracy"]
    stderr = math.sqrt(pool["stderr"] ** 2 + whole["stderr"] ** 2)
    out["difference"] = round(difference, 4)
    out["stderr"] = round(stderr, 4)
    if stderr > 0:
        out["z"] = round(difference / stderr, 2)
        out["pool_matches_whole"] = abs(out["z"]) < 2
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=None, help="default 256; quick 128")
    p.add_argument("--block-size", type=int, default=None, help="default 16; quick 8")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=None, help="default 64; quick 32")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="default 1000; quick 4")
    p.add_argument("--batch", type=int, default=None, help="default 32; quick 4")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--key-len", type=int, default=2)
    p.add_argument("--key-values", type=int, default=16)
    p.add_argument(
        "--near-fraction", type=float, default=0.5,
        help="training rows whose key lies in the last --near-blocks blocks (evaluation: none)",
    )  # fmt: skip
    p.add_argument("--near-blocks", type=int, default=2)
    p.add_argument(
        "--pool-blocks", type=int, default=4,
        help="random_pool_blocks of the bigbird_pool pattern (>= 1)",
    )  # fmt: skip
    p.add_argument("--eval-samples", type=int, default=None, help="default 1024; quick 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.pool_blocks < 1:
        p.error(f"--pool-blocks {a.pool_blocks} must be >= 1 (0 is the bigbird pattern)")
    torch.set_num_threads(a.threads)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if a.quick else full)

    seq_len = pick(a.seq_len, 256, 128)
    block = pick(a.block_size, 16, 8)
    steps = pick(a.steps, 1000, 4)
    batch = pick(a.batch, 32, 4)
    eval_samples = pick(a.eval_samples, 1024, 16)
    task = PasskeyTask(seq_len=seq_len, key_len=a.key_len, key_values=a.key_values)
    model_args = ModelArgs(
        vocab_size=task.vocab_size,
        d_model=pick(a.d_model, 64, 32),
        n_layers=a.layers,
        n_heads=a.heads,
    )
    cfgs = patterns(block, a.pool_blocks)
    # the pool's pair count varies with the step's pool: the mean over the training steps
    budget = {
        name: sum(
            attention_pairs(cfg, seq_len, model_args.n_heads, model_args.n_layers, step)
            for step in range(steps)
        )
        / steps
        for name, cfg in cfgs.items()
    }
    reach = window_reach_blocks(cfgs["window"], model_args.n_layers)
    print(f"pairs per sequence {budget}; window-only reach {reach} blocks", flush=True)

    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name, cfg in cfgs.items():
        print(f"{name}: {cfg}", flush=True)
        model, curve, seconds = train(
            cfg, task, model_args, steps, batch, a.lr, a.seed, max(1, steps // 10),
            a.near_fraction, a.near_blocks * block,
        )  # fmt: skip
        t0 = time.perf_counter()
        buckets = evaluate(model, cfg, task, reach, eval_samples, 64, steps, a.seed + 1)
        results[name] = {
            "pattern": asdict(cfg),
            "attention_pairs": round(budget[name], 1),
            "train_seconds": round(seconds, 1),
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "loss_curve": [{"step": c["step"], "loss": round(c["loss"], 4)} for c in curve],
            "accuracy": buckets,
        }
        print(json.dumps(buckets), flush=True)

    report = {
        "benchmark": "passkey_paths",
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": a.threads,
            "cpus": os.cpu_count(),
        },
        "settings": {
            "quick": a.quick,
            "model": asdict(model_args),
            "task": asdict(task),
            "block_size": block,
            "steps": steps,
            "batch": batch,
            "lr": a.lr,
            "near_fraction": a.near_fraction,
            "near_tokens": a.near_blocks * block,
            "seed": a.seed,
            "pool_blocks": a.pool_blocks,
            "eval_samples": eval_samples,
        },
        "budget": {
            "attention_pairs": {name: round(pairs, 1) for name, pairs in budget.items()},
            "ratio_bigbird_to_window": round(budget["bigbird"] / budget["window"], 4),
            "ratio_bigbird_pool_to_window": round(budget["bigbird_pool"] / budget["window"], 4),
        },
        "window_reach": {"blocks": reach, "tokens": reach * block},
        "chance": {
            "token_accuracy": 1.0 / task.key_values,
            "key_accuracy": 1.0 / task.key_values**task.key_len,
        },
        "patterns": results,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    report["verdict"] = verdict(report)
    report["pool_vs_whole"] = pool_vs_whole(report)
    print(json.dumps({k: report[k] for k in ("verdict", "pool_vs_whole")}, indent=2), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
