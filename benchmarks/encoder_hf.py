"""Whole masked-LM models, HF vs halotron's encoder converted from it: time and memory on CPU.

    python -m benchmarks.encoder_hf [--seq-lens 4096 8192 16384] [--reps 3] [--quick]
                                    [--out PATH] [--impls ...] [--update]

One random checkpoint per family (no download: a config, weights drawn from seed 0, LayerNorm
gains and biases randomised too so that a swapped tensor shows), the same weights for every N:
- "hf_longformer": transformers' LongformerForMaskedLM, attention_window 512, the first token
  global (global_attention_mask); "ours_longformer": halotron's encoder converted from the same
  checkpoint by train.hf_encoder.LongformerConverter (window_tokens 512, global projections).
- "hf_bigbird": BigBirdForMaskedLM, attention_type block_sparse, block 64, 3 random blocks, in
  training mode (HF's own per-layer random draw); "ours_bigbird": BigBirdConverter's encoder
  (window 3 blocks, first and last block global, 3 random blocks per head, drawn per step).
  transformers 5.x always builds the dense [B, H, N, N] attention_probs of block_sparse (see
  benchmarks/attention.py): its memory and part of its time grow as N^2; reported as measured.
Every dropout is 0 (halotron's encoder has none), so both compute the same function.

Measured: forward + backward of the MLM loss (cross-entropy over the full logits, labels at 15%
of the positions), batch 1, fp32, 2 intra-op threads; one warm-up, then the best (and median)
of --reps; peak RSS of a fresh child process per (impl, N) above its RSS before it built the
model (weights, gradients, activations; loading transients not counted). A child whose RSS
passes --budget-gib GiB stops itself: recorded "skipped" (over budget), and that impl's longer
lengths are skipped. Noise control is benchmarks/attention.py's (other processes' CPU share
during each child; wait for a quiet machine, re-measure while busy). Exactness at the smallest
N: max |logit difference| (and the MLM loss and word-embedding gradient) of HF vs halotron.
Writes benchmarks/results/encoder_hf_cpu.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.measure import measure_quietly, quiet_matmul, run_child, timing_record
from model.registry import build_model
from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from train.hf_encoder import BigBirdConverter, EncoderConverter, LongformerConverter
from train.memory import peak_kib, reset_peak, rss_kib

THREADS = 2
SHAPE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
             vocab_size=1000)  # fmt: skip
QUICK_SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                   intermediate_size=128, vocab_size=1000)  # fmt: skip
INIT_STD = 0.1  # logits of a few units: a 1e-5 difference means something
HF_ATTENTION_WINDOW = 512
BLOCK, RANDOM_BLOCKS = 64, 3
SEQ_LENS = [4096, 8192, 16384]
QUICK_SEQ_LENS = [1024]  # BigBird block_sparse needs N > (5 + 2 * 3) * 64 = 704
MLM_FRACTION = 0.15
MASK_ID, FIRST_ID = 3, 4  # token ids from 4: no pad id (Longformer 1, BigBird 0)
OVER_BUDGET_EXIT = 3
IMPLS = ["hf_longformer", "ours_longformer", "hf_bigbird", "ours_bigbird"]
PAIRS = {"longformer": ("hf_longformer", "ours_longformer"),
         "bigbird": ("hf_bigbird", "ours_bigbird")}  # fmt: skip
CONVERTERS: dict[str, EncoderConverter] = {
    "longformer": LongformerConverter(),
    "bigbird": BigBirdConverter(),
}
RESULTS = Path(__file__).parent / "results" / "encoder_hf_cpu.json"


# ---- checkpoints, models and the batch ------------------------------------------------------


def hf_config(family: str, shape: dict[str, int], max_n: int) -> Any:
    from transformers import BigBirdConfig, LongformerConfig

    common: dict[str, Any] = {
        **shape,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": INIT_STD,
    }
    if family == "longformer":  # positions from pad_token_id + 1 = 2
        return LongformerConfig(
            **common, attention_window=HF_ATTENTION_WINDOW, max_position_embeddings=max_n + 2
        )
    return BigBirdConfig(
        **common,
        attention_type="block_sparse",
        block_size=BLOCK,
        num_random_blocks=RANDOM_BLOCKS,
        max_position_embeddings=max_n,
    )


def save_checkpoint(family: str, shape: dict[str, int], max_n: int, out: Path) -> Path:
    """A random <family>ForMaskedLM saved in `out` (no download)."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(hf_config(family, shape, max_n))
    with torch.no_grad():  # HF initialises gains to 1 and biases to 0: they would hide a swap
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def build_hf(hf_dir: Path) -> nn.Module:
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForMaskedLM.from_pretrained(hf_dir)


def build_ours(family: str, hf_dir: Path, n: int) -> nn.Module:
    """The encoder `python -m train.hf import` makes of `hf_dir` for n-token sequences."""
    converter = CONVERTERS[family]
    model, attention, state = converter.from_hf(hf_dir)
    model, attention, state = converter.fit_to(model, attention, state, n)
    encoder = build_model(ModelArgs(**model), SparsityConfig(**attention))
    encoder.load_state_dict(state, strict=True)
    return encoder


def word_embedding(model: Any) -> torch.Tensor:
    """The (tied) word embedding [vocab, c] of an HF model or of the encoder."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight
    return model.embed.weight


def mlm_batch(n: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [1, n] with 15% of the positions masked, and their labels (-100 elsewhere)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_ID, vocab, (1, n), generator=gen)
    picked = torch.randperm(n, generator=gen)[: round(MLM_FRACTION * n)]
    labels = torch.full_like(ids, -100)
    labels[0, picked] = ids[0, picked]
    ids[0, picked] = MASK_ID
    return ids, labels


def mlm_step(impl: str, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, step: int):
    """(logits, loss) of one forward; the Longformers with the first token global."""
    glob = torch.zeros_like(ids, dtype=torch.bool)
    glob[:, 0] = True
    longformer = impl.endswith("longformer")
    if impl.startswith("hf_"):
        kwargs = {"global_attention_mask": glob.long()} if longformer else {}
        out = model(input_ids=ids, labels=labels, **kwargs)
        return out.logits, out.loss
    logits = model(ids, step=step, global_mask_bn=glob if longformer else None)
    return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


# ---- the child: one (impl, N) ---------------------------------------------------------------


def watch_memory(limit_kib: int) -> None:
    """Stop this process (exit OVER_BUDGET_EXIT) as soon as its RSS passes `limit_kib`."""

    def watch() -> None:
        while True:
            rss = rss_kib()
            if rss > limit_kib:
                print(f"OVER_BUDGET {rss / 1024 / 1024:.2f}", flush=True)
                os._exit(OVER_BUDGET_EXIT)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def run_one(impl: str, n: int, hf_dir: Path, reps: int, budget_gib: float) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    watch_memory(int(budget_gib * 1024 * 1024))
    reset_peak()
    base_kib = rss_kib()
    family = impl.split("_", 1)[1]
    model = build_hf(hf_dir) if impl.startswith("hf_") else build_ours(family, hf_dir, n)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = mlm_batch(n, word_embedding(model).shape[0])
    model_kib = rss_kib() - base_kib
    can_reset = reset_peak()  # from here: the steps (the weights stay in base + model)
    times, losses = [], []
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        _, loss = mlm_step(impl, model, ids, labels, step=rep)
        loss.backward()
        elapsed = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if rep:
            times.append(elapsed)
        del loss
    top_kib = peak_kib(can_reset)
    return {
        **timing_record(impl, n, times, base_kib, top_kib, can_reset),
        "model_mb": model_kib / 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss": losses[0],
    }


# ---- the parent -----------------------------------------------------------------------------


def measure(impl: str, n: int, hf_dir: Path, reps: int, args: argparse.Namespace) -> dict:
    """`--one impl n` in a fresh process (benchmarks.measure.run_child); an error or the memory
    budget becomes a record."""
    cmd = [sys.executable, "-m", "benchmarks.encoder_hf", "--one", impl, str(n), "--hf-dir",
           str(hf_dir), "--reps", str(reps), "--budget-gib", str(args.budget_gib)]  # fmt: skip

    def over_budget(line: str, returncode: int) -> dict[str, Any] | None:
        if not (line.startswith("OVER_BUDGET ") and returncode == OVER_BUDGET_EXIT):
            return None
        reason = f"over budget: its RSS passed {args.budget_gib} GiB ({line.split()[1]} GiB)"
        return {"status": "skipped", "reason": reason, "over_budget": True}

    return run_child(cmd, {"impl": impl, "n": n}, args.timeout, THREADS, over_budget)


def use_halotron_draw(hf_model: Any, ours: Any, n: int, step: int) -> None:
    """HF BigBird's random table, per layer and head, replaced by halotron's draw (as
    tests/unit/test_hf_encoder.py does): HF's block-sparse arithmetic stays the oracle. Both of
    HF's table builders are covered: N in (1024, 3072, 4096) takes its "old plan", one call per
    head in head order, other N one call for every head."""
    cfg: SparsityConfig = ours.attn_cfg
    n_layers, n_heads = len(ours.blocks), int(ours.args.n_heads)
    for layer, hf_layer in enumerate(hf_model.bert.encoder.layer):
        table = cfg.for_layer(layer, n_layers).random_table(n, n_heads, layer, step)
        rows = [t.numpy().astype(np.int32) for t in table.expand(n_heads, -1, -1)[:, 1:-1]]
        attn, heads = hf_layer.attention.self, itertools.cycle(rows)
        attn._bigbird_block_rand_mask_with_head = lambda *a, rows=rows, **k: rows
        attn._bigbird_block_rand_mask = lambda *a, heads=heads, **k: next(heads)


def compare(impl_hf: str, hf_model: nn.Module, ours: nn.Module, n: int) -> dict[str, float]:
    """Max |logit difference|, |loss difference| and max |word-embedding gradient difference|
    of one forward + backward of both on the same batch (step 0)."""
    ids, labels = mlm_batch(n, word_embedding(ours).shape[0])
    out = []
    for impl, model in ((impl_hf, hf_model), ("ours" + impl_hf[2:], ours)):
        model.zero_grad(set_to_none=True)
        logits, loss = mlm_step(impl, model, ids, labels, step=0)
        loss.backward()
        out.append((logits.detach(), float(loss.detach()), word_embedding(model).grad))
    (hf_logits, hf_loss, hf_grad), (logits, loss, grad) = out
    assert hf_grad is not None and grad is not None
    return {
        "max_abs_logit_diff": float((logits - hf_logits).abs().max()),
        "max_abs_logit": float(hf_logits.abs().max()),
        "abs_loss_diff": abs(loss - hf_loss),
        "max_abs_embedding_grad_diff": float((grad - hf_grad).abs().max()),
    }


def exactness(hf_dirs: dict[str, Path], n: int) -> dict[str, Any]:
    report: dict[str, Any] = {"n": n}
    if "longformer" in hf_dirs:
        d = hf_dirs["longformer"]
        report["longformer"] = {
            "compared": "HF LongformerForMaskedLM in eval mode (dropout 0: its training "
            "function too) vs the converted encoder, first token global",
            **compare("hf_longformer", build_hf(d).eval(), build_ours("longformer", d, n), n),
        }
    if "bigbird" in hf_dirs:
        d = hf_dirs["bigbird"]
        ours = build_ours("bigbird", d, n).eval()
        hf_model = build_hf(d).train()
        use_halotron_draw(hf_model, ours, n, step=0)
        report["bigbird"] = {
            "compared": "HF BigBirdForMaskedLM in training mode (dropout 0) with halotron's "
            "random blocks (per layer and head, step 0) injected as its random table, vs the "
            "converted encoder at step 0: the setting of tests/unit/test_hf_encoder.py. HF's own "
            "arithmetic, only the choice of random blocks shared",
            **compare("hf_bigbird", hf_model, ours, n),
        }
        report["bigbird_not_comparable"] = {
            "why": "not the same function, recorded for scale: HF in eval mode makes every "
            "random block block 0, counted again on top of the global block 0 (no pattern is "
            "that), and in training mode HF draws its own random blocks (numpy, seeded by the "
            "layer), halotron its own (train/hf_encoder.py)",
            "hf_eval_mode": compare("hf_bigbird", build_hf(d).eval(), ours, n),
            "hf_training_mode_own_draw": compare("hf_bigbird", build_hf(d).train(), ours, n),
        }
    return report


def summarize(results: list[dict[str, Any]], ns: list[int]) -> dict[str, Any]:
    """Per N and family: HF / ours for seconds and peak_mb (> 1: ours faster / smaller)."""
    by_key = {(r["impl"], r["n"]): r for r in results if r["status"] == "ok"}
    ratios: dict[str, dict[str, Any]] = {}
    for n in ns:
        row: dict[str, Any] = {}
        for family, (hf, ours) in PAIRS.items():
            a, b = by_key.get((hf, n)), by_key.get((ours, n))
            row[family] = None if a is None or b is None else {
                "seconds_hf_over_ours": a["seconds"] / b["seconds"],
                "peak_mb_hf_over_ours": a["peak_mb"] / b["peak_mb"],
            }  # fmt: skip
        ratios[str(n)] = row
    return ratios


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'N':>6}  {'impl':<16} {'seconds':>8} {'median':>8} {'peak MB':>8}  note")
    for r in report["results"]:
        if r["status"] == "ok":
            note = f"others {r['other_cpu_share']:.0%}" + (" NOISY" if r.get("noisy") else "")
            print(f"{r['n']:>6}  {r['impl']:<16} {r['seconds']:>8.2f} {r['seconds_median']:>8.2f}"
                  f" {r['peak_mb']:>8.0f}  {note}")  # fmt: skip
        else:
            why = r.get("reason") or r.get("error")
            print(f"{r['n']:>6}  {r['impl']:<16} {'-':>8} {'-':>8} {'-':>8}  {r['status']}: {why}")
    print(f"\nmatmul fp32 2048^3: {report['machine']['matmul_gflops']:.1f} GFLOP/s")
    for family, e in report["exactness"].items():
        if isinstance(e, dict) and "max_abs_logit_diff" in e:
            print(f"exactness {family} N={report['exactness']['n']}: {e['max_abs_logit_diff']:.2e}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 3; quick 1)")
    p.add_argument("--budget-gib", type=float, default=8.0, help="RSS budget of one child")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    p.add_argument("--wait-idle", type=float, default=None, help="seconds (default 120; quick 0)")
    p.add_argument("--retries", type=int, default=None, help="when busy (default 2; quick 0)")
    p.add_argument("--busy-threshold", type=float, default=0.15, help="others' CPU share")
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_SEQ_LENS}, tiny model")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--update",
        action="store_true",
        help="re-measure only the noisy, failed or missing entries of --out",
    )
    p.add_argument("--skip-exactness", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 120.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.one:
        result = run_one(args.one[0], int(args.one[1]), args.hf_dir, args.reps, args.budget_gib)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import transformers

    torch.set_num_threads(THREADS)
    shape = QUICK_SHAPE if args.quick else SHAPE
    ns = sorted(args.seq_lens or (QUICK_SEQ_LENS if args.quick else SEQ_LENS))
    load_start = list(os.getloadavg())
    previous = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    keep = {
        (r["impl"], r["n"]): r
        for r in previous.get("results", [])
        if r["status"] == "skipped" or (r["status"] == "ok" and not r.get("noisy"))
    }
    families = [f for f, pair in PAIRS.items() if set(pair) & set(args.impls)]
    with tempfile.TemporaryDirectory(prefix="encoder_hf_") as tmp:
        hf_dirs = {f: save_checkpoint(f, shape, max(ns), Path(tmp) / f) for f in families}
        print(f"fp32 matmul 2048^3 on {THREADS} threads ...", flush=True)
        matmul_runs = previous.get("machine", {}).get("matmul_runs", [])
        matmul_runs = [*matmul_runs, quiet_matmul(args.busy_threshold, args.wait_idle)]
        if previous.get("exactness", {}).get("n") == ns[0]:
            exact = previous["exactness"]
        elif args.skip_exactness:
            exact = {"n": None, "skipped": "--skip-exactness"}
        else:
            print(f"exactness at N={ns[0]} ...", flush=True)
            exact = exactness(hf_dirs, ns[0])
        results: list[dict[str, Any]] = []
        over: dict[str, str] = {}  # impl -> why its longer lengths are skipped
        todo = [(n, impl) for n in ns for impl in args.impls]
        for i, (n, impl) in enumerate(todo, 1):
            if (impl, n) in keep:
                rec = keep[(impl, n)]
            elif impl in over:
                rec = {"impl": impl, "n": n, "status": "skipped", "reason": over[impl]}
            else:
                t0 = time.perf_counter()
                family = impl.split("_", 1)[1]
                rec = measure_quietly(
                    functools.partial(measure, impl, n, hf_dirs[family], args.reps, args),
                    args.busy_threshold, args.wait_idle, args.retries,
                )  # fmt: skip
                rec["took_s"] = time.perf_counter() - t0
            if rec["status"] == "skipped" and impl not in over and rec.get("over_budget"):
                over[impl] = f"over budget: at N={n} its RSS passed {args.budget_gib} GiB"
            what = (f"{rec['seconds']:.2f} s, {rec['peak_mb']:.0f} MB, others "
                    f"{rec['other_cpu_share']:.0%}" if rec["status"] == "ok"
                    else f"{rec['status']}: {rec.get('reason') or rec.get('error')}")  # fmt: skip
            print(f"[{i}/{len(todo)}] N={n} {impl}: {what}", flush=True)
            results.append(rec)
        print(f"fp32 matmul 2048^3 on {THREADS} threads, again ...", flush=True)
        matmul_runs.append(quiet_matmul(args.busy_threshold, args.wait_idle))
    run = {  # one per invocation: --update adds its own
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "measured": [[r["impl"], r["n"]] for r in results if (r["impl"], r["n"]) not in keep],
    }

    report: dict[str, Any] = {
        "settings": {
            "model": {**shape, "initializer_range": INIT_STD, "dropout": 0.0},
            "longformer": {
                "attention_window": HF_ATTENTION_WINDOW,
                "global_tokens": "the first token (global_attention_mask)",
                "ours": "window_tokens=512 (|i-j| <= 256), global_projections, block_size 64",
            },
            "bigbird": {
                "attention_type": "block_sparse",
                "block_size": BLOCK,
                "num_random_blocks": RANDOM_BLOCKS,
                "hf_mode": "train (its own random draw)",
                "ours": "window_blocks 3, global_blocks 2, random_blocks 3 per head, "
                "drawn anew per step (step = rep)",
            },
            "batch": 1,
            "dtype": "float32",
            "threads": THREADS,
            "reps": args.reps,
            "seq_lens": ns,
            "step": "forward + backward of the MLM loss: cross-entropy over the full logits "
            f"[1, N, vocab], labels at {MLM_FRACTION:.0%} of the positions (ids there = "
            f"{MASK_ID}), -100 elsewhere; no optimizer step",
            "seconds": "best (min) of reps after one warm-up; seconds_median too",
            "peak_mb": "peak RSS of a fresh child during the steps above its RSS before it built "
            "the model (weights, gradients, activations; loading transients not counted)",
            "budget_gib": args.budget_gib,
            "noise": "other_cpu_share = CPU share of other processes while the child ran; the "
            f"parent waits up to {args.wait_idle:.0f}s for a quiet machine and re-measures up "
            f"to {args.retries} times while it exceeds {args.busy_threshold}",
            "hf_bigbird_note": "transformers 5.x builds the dense [B, H, N, N] attention_probs "
            "of block_sparse (zeros outside the pattern): memory and part of the time grow as N^2",
        },
        "machine": {
            "matmul_gflops": max(r["gflops"] for r in matmul_runs),
            "matmul": "fp32 2048^3 on 2 threads, best of 5, at the start and the end of the "
            "run (benchmarks.attention.quiet_matmul); matmul_gflops is the highest",
            "matmul_runs": matmul_runs,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "runs": previous.get("machine", {}).get("runs", []) + [run],
        },
        "exactness": exact,
        "results": results,
        "hf_over_ours": summarize(results, ns),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
