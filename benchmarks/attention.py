"""Single-device sparse attention vs dense SDPA and HF BigBird / Longformer: time and memory.

    python -m benchmarks.attention [--seq-lens 4096 8192 16384 32768] [--reps 3]
                                   [--dense-max-n 16384] [--out PATH] [--quick]

Forward+backward wall time (one warm-up, then the best of --reps) and peak resident memory
for B=1, H=4, D=64 (hidden 256), fp32 on the CPU with 2 intra-op threads, for:

- attention only, q/k/v tensors requiring grad:
  "ours_bigbird" / "ours_longformer" (model.sparse.sparse_attention) and "dense_sdpa"
  (torch.nn.functional.scaled_dot_product_attention, same shape, no mask);
- a self-attention layer from hidden states [1, N, 256], Q/K/V projections included:
  "ours_bigbird_layer" vs "hf_bigbird" (transformers' BigBirdBlockSparseAttention) and
  "ours_longformer_layer" vs "hf_longformer" (transformers' LongformerSelfAttention).

Every (impl, N) runs in a fresh child process (`--one IMPL N`), which resets the kernel's
peak-RSS counter (/proc/self/clear_refs) before it makes its inputs and reports the peak RSS
(VmHWM) minus the RSS at that point (ru_maxrss where the reset is not allowed). The parent
also times a 2048^3 fp32 matmul for the machine's GFLOP/s, checks our output and gradients
against the dense masked oracle at the smallest N, and writes JSON
(benchmarks/results/attention_cpu.json). Asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.measure import measure_quietly, quiet_matmul, run_child, timing_record
from model.sparse import SparsityConfig, count_pairs, reference_attention, sparse_attention
from train.memory import peak_kib, reset_peak, rss_kib

BATCH, HEADS, HEAD_DIM = 1, 4, 64
HIDDEN = HEADS * HEAD_DIM
THREADS = 2
BLOCK = 64
BIGBIRD: dict[str, Any] = dict(block_size=BLOCK, window_blocks=3, global_blocks=2, random_blocks=3)
LONGFORMER: dict[str, Any] = dict(
    block_size=BLOCK, window_blocks=9, global_blocks=2, random_blocks=0
)
HF_ATTENTION_WINDOW = 512  # HF Longformer: 256 tokens each side of the query
HF_GLOBAL_TOKENS = 128
SEQ_LENS = [4096, 8192, 16384, 32768]
QUICK_SEQ_LENS = [1024, 2048]
TARGET_N = 16384
RESULTS = Path(__file__).parent / "results" / "attention_cpu.json"

# fwd: QK^T and PV, 2 matmuls x 2 flops per multiply-add -> 4 * pairs * D.
# bwd: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q -> 8 * pairs * D (the QK^T recompute
# of a FlashAttention-style backward is not counted as useful work).
FWD_FLOPS_PER_PAIR_DIM = 4
FWD_BWD_MULTIPLIER = 3.0
FLOP_FORMULA = (
    "useful_flops_fwd = 4 * pairs * D; useful_flops_fwd_bwd = 3.0 * useful_flops_fwd "
    "= 12 * pairs * D (backward = 4 matmuls = 2x forward; the QK^T recompute of the "
    "backward is not counted, with it the multiplier would be 3.5); pairs = allowed "
    "(query, key) pairs of the pattern summed over heads and batch (dense: B*H*N^2)"
)

# attention-only impls, then layer impls (with Q/K/V projections) paired as ours vs HF
ATTN_IMPLS = ["ours_bigbird", "ours_longformer", "dense_sdpa"]
LAYER_IMPLS = ["ours_bigbird_layer", "hf_bigbird", "ours_longformer_layer", "hf_longformer"]
IMPLS = ATTN_IMPLS + LAYER_IMPLS
# speedup name -> (baseline impl, our impl); speedup = seconds(baseline) / seconds(ours)
SPEEDUPS = {
    "ours_bigbird_vs_dense_sdpa": ("dense_sdpa", "ours_bigbird"),
    "ours_longformer_vs_dense_sdpa": ("dense_sdpa", "ours_longformer"),
    "ours_bigbird_layer_vs_hf_bigbird": ("hf_bigbird", "ours_bigbird_layer"),
    "ours_longformer_layer_vs_hf_longformer": ("hf_longformer", "ours_longformer_layer"),
}
# target name -> (speedup name, minimum speedup)
TARGETS = {
    "ours_4x_faster_than_hf_bigbird": ("ours_bigbird_layer_vs_hf_bigbird", 4.0),
    "ours_4x_faster_than_hf_longformer": ("ours_longformer_layer_vs_hf_longformer", 4.0),
    "ours_8x_faster_than_dense_sdpa": ("ours_bigbird_vs_dense_sdpa", 8.0),
}


# ---- memory ---------------------------------------------------------------------------------


# ---- the implementations --------------------------------------------------------------------


def sparsity(name: str) -> SparsityConfig:
    return SparsityConfig(**(BIGBIRD if "bigbird" in name else LONGFORMER))


class OursLayer(nn.Module):
    """Our self-attention layer as model/transformer.py builds it: one fused Q/K/V projection
    (Linear(256, 768), the same weights as HF's three Linear(256, 256)) + sparse_attention."""

    def __init__(self, cfg: SparsityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = sparse_attention(q, k, v, self.cfg, layer=0)
        return out.transpose(1, 2).reshape(b, n, HIDDEN)


def hf_longformer_mask(n: int) -> torch.Tensor:
    """HF's per-layer convention: -10000 masked, 0 local, +10000 global. Global tokens: the
    same 128 positions as our pattern's two global blocks (first and last 64 tokens)."""
    mask = torch.zeros(BATCH, n)
    mask[:, SparsityConfig(**LONGFORMER).global_positions(n)] = 10000.0
    assert int((mask > 0).sum()) == HF_GLOBAL_TOKENS * BATCH
    return mask


def build(impl: str, n: int) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """A fwd function returning the output, and the leaves whose .grad to clear per rep."""
    gen = torch.Generator().manual_seed(0)
    if impl in ATTN_IMPLS:
        q, k, v = (
            torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3)
        )
        if impl == "dense_sdpa":
            return (lambda: F.scaled_dot_product_attention(q, k, v)), [q, k, v]
        cfg = sparsity(impl)
        return (lambda: sparse_attention(q, k, v, cfg, layer=0)), [q, k, v]

    torch.manual_seed(0)
    x = torch.randn(BATCH, n, HIDDEN, generator=gen).requires_grad_()
    if impl.startswith("ours_"):
        layer = OursLayer(sparsity(impl)).train()
        return (lambda: layer(x)), [x, *layer.parameters()]
    if impl == "hf_bigbird":
        from transformers import BigBirdConfig, BigBirdModel
        from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

        bb_cfg = BigBirdConfig(
            hidden_size=HIDDEN,
            num_attention_heads=HEADS,
            attention_type="block_sparse",
            block_size=BIGBIRD["block_size"],
            num_random_blocks=BIGBIRD["random_blocks"],
            max_position_embeddings=n,
            attention_probs_dropout_prob=0.0,
        )
        bb = BigBirdBlockSparseAttention(bb_cfg, seed=0).train()
        blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
            torch.ones(BATCH, n), BIGBIRD["block_size"]
        )

        def bigbird() -> torch.Tensor:
            out = bb(
                x,
                band_mask=band,
                from_mask=from_mask,
                to_mask=to_mask,
                from_blocked_mask=blocked,
                to_blocked_mask=blocked,
            )
            return out[0]

        return bigbird, [x, *bb.parameters()]
    if impl == "hf_longformer":
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        lf_cfg = LongformerConfig(
            hidden_size=HIDDEN,
            num_attention_heads=HEADS,
            attention_window=[HF_ATTENTION_WINDOW],
            attention_probs_dropout_prob=0.0,
        )
        lf = LongformerSelfAttention(lf_cfg, layer_id=0).train()
        mask = hf_longformer_mask(n)
        masked, is_global = mask < 0, mask > 0
        any_global = bool(is_global.any())

        def longformer() -> torch.Tensor:
            out = lf(
                x,
                attention_mask=mask,
                is_index_masked=masked,
                is_index_global_attn=is_global,
                is_global_attn=any_global,
            )
            return out[0]

        return longformer, [x, *lf.parameters()]
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def run_one(impl: str, n: int, reps: int) -> dict[str, Any]:
    """Child mode: time fwd+bwd of one (impl, N) and measure its peak memory."""
    torch.set_num_threads(THREADS)
    can_reset = reset_peak()
    base_kib = rss_kib()
    fwd, leaves = build(impl, n)
    grad_out: torch.Tensor | None = None
    times = []
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        out = fwd()
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out)
        elapsed = time.perf_counter() - t0
        if rep:
            times.append(elapsed)
        del out
    return timing_record(impl, n, times, base_kib, peak_kib(can_reset), can_reset)


# ---- one measurement in a fresh process --------------------------------------------------


def measure(impl: str, n: int, reps: int, timeout: float) -> dict[str, Any]:
    """Run `--one impl n` in a fresh process (benchmarks.measure.run_child); an error becomes
    a record, not a crash."""
    cmd = [sys.executable, "-m", "benchmarks.attention", "--one", impl, str(n), "--reps", str(reps)]
    return run_child(cmd, {"impl": impl, "n": n}, timeout, THREADS)


# ---- machine, flops and exactness -----------------------------------------------------------


def pairs(impl: str, n: int) -> int:
    if impl == "dense_sdpa":
        return BATCH * HEADS * n * n
    return BATCH * count_pairs(sparsity(impl), n, n_heads=HEADS)


def exactness(n: int) -> dict[str, Any]:
    """Ours vs the dense masked oracle (model.sparse.reference_attention): outputs and grads."""
    gen = torch.Generator().manual_seed(2)
    report: dict[str, Any] = {"n": n}
    for name in ("bigbird", "longformer"):
        cfg = sparsity(name)
        q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
        g = torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen)
        results = []
        for fn in (sparse_attention, reference_attention):
            qq, kk, vv = leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = fn(qq, kk, vv, cfg, layer=0)
            out.backward(g)
            results.append([out.detach(), *(t.grad for t in leaves)])
        errs = [float((a - b).abs().max()) for a, b in zip(*results, strict=True)]
        report[f"ours_{name}"] = {"max_abs_err_out": errs[0], "max_abs_err_grad": max(errs[1:])}
    return report


def equivalence() -> dict[str, str]:
    lf = SparsityConfig(**LONGFORMER)
    left, right = lf.reach_tokens
    return {
        "bigbird": (
            "ours SparsityConfig(block_size=64, window_blocks=3, global_blocks=2, "
            "random_blocks=3) = HF BigBird block_sparse (block_size=64, num_random_blocks=3): "
            "a 3-block sliding window, first and last block global, 3 random key blocks per "
            "query block (the random draws differ)"
        ),
        "longformer": (
            f"ours SparsityConfig(block_size=64, window_blocks=9, global_blocks=2, "
            f"random_blocks=0): window of {lf.window_blocks} blocks = centre block + "
            f"{lf.left_blocks} blocks ({left} tokens) each side, so every query sees at least "
            f"{left} and at most {left + BLOCK - 1} tokens each side (576 window keys); HF "
            f"Longformer attention_window={HF_ATTENTION_WINDOW} = {HF_ATTENTION_WINDOW // 2} "
            f"tokens each side (513 keys). Global: our 2 global blocks are tokens [0, 64) and "
            f"[N-64, N), {HF_GLOBAL_TOKENS} tokens; HF gets the same {HF_GLOBAL_TOKENS} "
            "positions as global (attention_mask +10000). HF also applies separate "
            "query_global/key_global/value_global projections, which ours does not have"
        ),
    }


# ---- the parent -----------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]], ns: list[int], target_n: int) -> dict[str, Any]:
    by_key = {(r["impl"], r["n"]): r for r in results}
    speedups: dict[str, dict[str, float | None]] = {}
    for n in ns:
        row: dict[str, float | None] = {}
        for name, (base, ours) in SPEEDUPS.items():
            a, b = by_key.get((base, n)), by_key.get((ours, n))
            ok = a and b and a["status"] == "ok" and b["status"] == "ok"
            row[name] = a["seconds"] / b["seconds"] if ok and a and b else None
        speedups[str(n)] = row
    targets: dict[str, Any] = {"n": target_n}
    for name, (speedup, minimum) in TARGETS.items():
        value = speedups.get(str(target_n), {}).get(speedup)
        targets[name] = {
            "speedup": speedup,
            "value": value,
            "minimum": minimum,
            "met": None if value is None else value >= minimum,
        }
    return {"speedups": speedups, "targets": targets}


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'N':>6}  {'impl':<22} {'seconds':>9} {'peak MB':>9} {'GFLOP/s':>8}  note")
    for r in report["results"]:
        if r["status"] == "ok":
            gf = r.get("useful_gflops")
            gf_s = f"{gf:8.1f}" if gf is not None else f"{'':>8}"
            note = f"others {r['other_cpu_share']:.0%}" + (" NOISY" if r.get("noisy") else "")
            print(
                f"{r['n']:>6}  {r['impl']:<22} {r['seconds']:>9.3f} {r['peak_mb']:>9.1f} {gf_s}"
                f"  {note}"
            )
        else:
            note = r.get("reason") or r.get("error")
            print(f"{r['n']:>6}  {r['impl']:<22} {'-':>9} {'-':>9} {'':>8}  {r['status']}: {note}")
    print(f"\nmatmul fp32 2048^3: {report['machine']['matmul_gflops']:.1f} GFLOP/s")
    for n, row in report["speedups"].items():
        cells = ", ".join(f"{k}={v:.2f}x" for k, v in row.items() if v is not None)
        print(f"speedups N={n}: {cells}")
    for name, t in report["targets"].items():
        if name != "n":
            print(f"target {name} at N={report['targets']['n']}: {t['value']} -> met={t['met']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 3; quick 1)")
    p.add_argument("--dense-max-n", type=int, default=16384)
    p.add_argument("--target-n", type=int, default=None, help="N of the targets")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    p.add_argument("--wait-idle", type=float, default=None, help="seconds (default 120; quick 0)")
    p.add_argument("--retries", type=int, default=None, help="when busy (default 2; quick 0)")
    p.add_argument("--busy-threshold", type=float, default=0.15, help="others' CPU share")
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_SEQ_LENS}, reps 1")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--update",
        action="store_true",
        help="re-measure only the noisy, failed or missing entries of an existing --out",
    )
    p.add_argument("--skip-exactness", action="store_true", help="no check vs the oracle")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 120.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2

    if args.one:
        result = run_one(args.one[0], int(args.one[1]), reps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    torch.set_num_threads(THREADS)
    ns = args.seq_lens or (QUICK_SEQ_LENS if args.quick else SEQ_LENS)
    target_n = args.target_n or (max(ns) if args.quick else TARGET_N)
    load_start = list(os.getloadavg())  # the machine may be shared: record how busy it was
    previous = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    keep = {
        (r["impl"], r["n"]): r
        for r in previous.get("results", [])
        if r["status"] == "skipped" or (r["status"] == "ok" and not r.get("noisy"))
    }
    print(f"fp32 matmul 2048^3 on {THREADS} threads ...", flush=True)
    matmul_runs = previous.get("machine", {}).get("matmul_runs", [])
    matmul_runs = [*matmul_runs, quiet_matmul(args.busy_threshold, args.wait_idle)]
    if previous.get("exactness", {}).get("n") == min(ns):
        exact = previous["exactness"]
    elif args.skip_exactness:
        exact = {"n": None, "skipped": "--skip-exactness"}
    else:
        print(f"exactness at N={min(ns)} ...", flush=True)
        exact = exactness(min(ns))
    results = []
    todo = [(n, impl) for n in ns for impl in args.impls]
    for i, (n, impl) in enumerate(todo, 1):
        rec: dict[str, Any]
        if (impl, n) in keep:
            rec = keep[(impl, n)]
            print(f"[{i}/{len(todo)}] N={n} {impl}: kept from {args.out}", flush=True)
        elif impl == "dense_sdpa" and n > args.dense_max_n:
            reason = (
                f"N={n} > --dense-max-n={args.dense_max_n}: O(N^2) time "
                f"(~{4 * HEADS * n * n * HEAD_DIM * FWD_BWD_MULTIPLIER / 1e9:.0f} GFLOP)"
            )
            rec = {"impl": impl, "n": n, "status": "skipped", "reason": reason}
        else:
            t0 = time.perf_counter()
            rec = measure_quietly(
                functools.partial(measure, impl, n, reps, args.timeout),
                args.busy_threshold, args.wait_idle, args.retries,
            )  # fmt: skip
            took = time.perf_counter() - t0
            what = (
                f"{rec['seconds']:.3f} s, {rec['peak_mb']:.0f} MB, others "
                f"{rec['other_cpu_share']:.0%}"
                if rec["status"] == "ok"
                else rec["error"]
            )
            print(f"[{i}/{len(todo)}] N={n} {impl}: {what} ({took:.0f}s)", flush=True)
        if rec["status"] == "ok":
            rec["pairs"] = pairs(impl, n) if impl in ATTN_IMPLS else None
            if rec["pairs"] is not None:
                flops = FWD_FLOPS_PER_PAIR_DIM * rec["pairs"] * HEAD_DIM * FWD_BWD_MULTIPLIER
                rec["useful_gflops"] = flops / rec["seconds"] / 1e9
        results.append(rec)
    print(f"fp32 matmul 2048^3 on {THREADS} threads, again ...", flush=True)
    matmul_runs.append(quiet_matmul(args.busy_threshold, args.wait_idle))
    gflops = max(run["gflops"] for run in matmul_runs)
    for rec in results:
        if "useful_gflops" in rec:
            rec["fraction_of_matmul"] = rec["useful_gflops"] / gflops

    report: dict[str, Any] = {
        "settings": {
            "batch": BATCH,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "hidden": HIDDEN,
            "dtype": "float32",
            "threads": THREADS,
            "reps": reps,
            "seconds": "best (min) of reps after one warm-up, forward+backward; seconds_median too",
            "noise": "other_cpu_share = CPU share of other processes during the child; the "
            f"parent waits up to {args.wait_idle:.0f}s for a quiet machine and re-measures up "
            f"to {args.retries} times while it exceeds {args.busy_threshold}",
            "peak_mb": "peak RSS of a fresh child process above its RSS before the inputs",
            "seq_lens": ns,
            "dense_max_n": args.dense_max_n,
            "bigbird": BIGBIRD,
            "longformer": LONGFORMER,
            "hf_longformer": {
                "attention_window": HF_ATTENTION_WINDOW,
                "global_tokens": HF_GLOBAL_TOKENS,
            },
            "impls": {
                "ours_bigbird / ours_longformer": "sparse_attention on q, k, v [1, 4, N, 64]",
                "dense_sdpa": "F.scaled_dot_product_attention on q, k, v [1, 4, N, 64]",
                "ours_*_layer": "Linear q/k/v (256->256) + sparse_attention, x [1, N, 256]",
                "hf_bigbird": "transformers BigBirdBlockSparseAttention, x [1, N, 256]; "
                "note: transformers 5.x always returns the dense attention_probs "
                "[B, H, N, N] (zeros outside the pattern), so its memory and part of its "
                "time grow as N^2",
                "hf_longformer": "transformers LongformerSelfAttention, x [1, N, 256]",
            },
        },
        "machine": {
            "matmul_gflops": gflops,
            "matmul": "fp32 2048x2048 @ 2048x2048 on 2 threads, best of 5, measured at the "
            "start and the end of the run; matmul_gflops is the higher",
            "matmul_runs": matmul_runs,
            "torch": torch.__version__,
            "transformers": _transformers_version(),
            "cpu_count": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": list(os.getloadavg()),
        },
        "flop_formula": FLOP_FORMULA,
        "equivalence": equivalence(),
        "exactness": exact,
        "results": results,
    }
    report.update(summarize(results, ns, target_n))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")


def _transformers_version() -> str | None:
    try:
        import transformers

        return str(transformers.__version__)
    except ImportError:
        return None


if __name__ == "__main__":
    main()
