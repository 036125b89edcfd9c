"""One-GPU check: exactness, sparse-vs-flash kernel throughput and a 350M training step.

    python -m benchmarks.gpu [--out PATH] [--sections exactness throughput training]
                             [--budget 320]
    python -m benchmarks.gpu --smoke --out /tmp/gpu.json     # every section on CPU, tiny sizes

Run on one NVIDIA H100 / H200: under 6 minutes (`--budget` seconds of sections plus start-up;
most of it compiles about 21 FlexAttention graphs, which inductor caches on disk, so a rerun
is faster). Writes benchmarks/results/gpu_<device>.json (<device>: torch.cuda.get_device_name,
lower-cased, other characters as '_') and prints progress to stderr. Needs torch with CUDA
only (no megatron-core, deepspeed, webdataset, wandb or sentencepiece). Each section is timed
and a failure in one is recorded in the JSON ("error") while the others run; a section starts
no new item once its share of --budget (plus what earlier sections left) is spent, and records
the items it skipped.

1. exactness: `sparse_attention(backend="flex")` and one-rank `cp_sparse_attention(group=None,
   backend="flex")` against the dense masked oracle `reference_attention`, computed in fp64 on
   the CPU from the same (dtype-rounded) inputs: out, dq, dk, dv for the BigBird, Longformer-like,
   causal demo and BigBird-with-pool patterns (block 64), fp32 and bf16, B=1, H=4, D=64,
   N=2048. The error of a tensor is max|x - ref| / max|ref| (relative to the reference's scale);
   it passes at <= 1e-4 in fp32 (float32 matmul precision "highest": no TF32) and <= 2e-2 in
   bf16 (5x bf16's unit roundoff 2^-8).
2. throughput: forward+backward of the FlexAttention kernel (BlockMask built once, as the model
   reuses it per (step, layer); `call_fwd_bwd_ms` times the whole `sparse_attention` call, mask
   build included) for the BigBird and Longformer-like patterns against dense
   `scaled_dot_product_attention` on the flash backend (not causal), bf16, B=1, H=16, D=64,
   N in 8192, 32768, 131072; median of 5 CUDA-event-timed reps after 2 warm-up calls (the
   first compiles). Useful FLOPs: forward 4 * D * pairs (pairs = model.sparse.count_pairs for the
   pattern, B*H*N^2 dense); forward+backward 3.5x that (the FlashAttention papers' convention:
   the backward counts 2.5 forwards, its recompute of QK^T included); the sparse/dense ratio
   of useful rates does not depend on the convention.
3. training: a causal model.transformer.Transformer (d_model 1024, 24 layers, 16 heads, SwiGLU,
   vocab 32000, tied embeddings: 336M parameters) on one sequence of 32768 tokens, block 128,
   window 3 blocks, 1 global block, 2 random blocks from a pool of 16; fp32 parameters, bf16
   autocast (`attention_dtype`: the dtype the model hands the attention; TF32 allowed),
   fused AdamW; 2 warm-up steps, then 5 timed: tokens/s, peak memory, and MFU from
   train.flops (sparse-aware: 6 * weights + 12 * D * attended pairs per token) against the
   nominal bf16 peak (989 TFLOP/s for H100 SXM / H200) and a measured 8192^3 bf16 matmul.
   Without activation recompute first; on out-of-memory again with it (`recompute` says which).

`targets`: sparse/flash useful rate >= 0.5 for each pattern at each N, MFU >= 0.40 (against the
nominal peak when the device is known), every exactness entry passing. `--smoke` runs every
section on the CPU at tiny sizes, forward only where CPU FlexAttention has no backward, and
evaluates no timing target. Asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.sparse import SparsityConfig, count_pairs, reference_attention, sparse_attention
from model.sparse_flex import build_block_mask, flex_kernel
from model.transformer import ModelArgs, Transformer, lm_loss
from parallel.context_parallel import cp_sparse_attention
from train.flops import PEAK_FLOPS, flops_per_token, measure_matmul_flops

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("exactness", "throughput", "training")
SHARE = {"exactness": 0.42, "throughput": 0.32, "training": 0.26}
"""Each section's share of --budget, by its count of FlexAttention compilations (exactness
about 14: pattern x dtype x path; throughput 6; training 1), each some seconds; what a section
leaves unused passes to the next."""
PATTERNS: dict[str, dict[str, Any]] = {
    "bigbird": dict(block_size=64, window_blocks=3, global_blocks=2, random_blocks=3),
    "longformer": dict(block_size=64, window_blocks=9, global_blocks=2, random_blocks=0),
    "causal": dict(block_size=64, window_blocks=3, global_blocks=1, random_blocks=2, causal=True),
    "bigbird_pool": dict(
        block_size=64, window_blocks=3, global_blocks=2, random_blocks=3, random_pool_blocks=16
    ),
}
THROUGHPUT_PATTERNS = ("bigbird", "longformer")
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
FWD_FLOPS_PER_PAIR_DIM = 4
FWD_BWD_MULTIPLIER = 3.5
MIN_RATE_RATIO, MIN_MFU = 0.5, 0.40
LAYER, STEP = 1, 2  # exactness: a draw other than the first
NO_CPU_BACKWARD = "skipped: FlexAttention on CPU has no backward"


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the GPU check or the CPU smoke."""

    exact_n: int
    """Sequence length of the exactness checks (the oracle is O(N^2))."""
    exact_heads: int
    throughput_ns: tuple[int, ...]
    throughput_heads: int
    warmup_calls: int
    """Untimed calls before a measurement (the first compiles)."""
    reps: int
    """Timed calls per measurement."""
    model: ModelArgs
    train_attention: SparsityConfig
    train_seq_len: int
    warmup_steps: int
    timed_steps: int
    matmul: int
    """Side of the square matmul whose rate is the measured peak."""


HEAD_DIM = 64
GPU = Sizes(
    exact_n=2048,
    exact_heads=4,
    throughput_ns=(8192, 32768, 131072),
    throughput_heads=16,
    warmup_calls=2,
    reps=5,
    model=ModelArgs(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16),
    train_attention=SparsityConfig(
        **PATTERNS["causal"] | dict(block_size=128, random_pool_blocks=16)
    ),
    train_seq_len=32768,
    warmup_steps=2,
    timed_steps=5,
    matmul=8192,
)
SMOKE = Sizes(
    exact_n=512,
    exact_heads=2,
    throughput_ns=(512,),
    throughput_heads=2,
    warmup_calls=1,
    reps=1,
    model=ModelArgs(vocab_size=256, d_model=64, n_layers=2, n_heads=2),
    train_attention=SparsityConfig(
        **PATTERNS["causal"] | dict(block_size=32, random_pool_blocks=4)
    ),
    train_seq_len=256,
    warmup_steps=1,
    timed_steps=1,
    matmul=256,
)

_START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def attempt(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args), a record, or its error, with the seconds it took (compilation included):
    one failing item does not stop the others."""
    t0 = time.perf_counter()
    try:
        record = fn(*args)
    except Exception as e:  # recorded in the JSON, the run goes on
        say(f"  error: {type(e).__name__}: {e}")
        record = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    record["seconds"] = time.perf_counter() - t0
    return record


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, deadline: float) -> list:
    """Milliseconds of up to `reps` calls of an already warmed-up `fn` (CUDA events on GPU);
    at least one, no more once the deadline has passed."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline:
            break
    return times


def warm(fn: Callable[[], object], device: torch.device, calls: int) -> None:
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 1. exactness ---------------------------------------------------------------------------


def flex_path(q, k, v, cfg):
    return sparse_attention(q, k, v, cfg, layer=LAYER, step=STEP, backend="flex")


def cp_path(q, k, v, cfg):
    return cp_sparse_attention(q, k, v, cfg, group=None, layer=LAYER, step=STEP, backend="flex")


PATHS = {"sparse_attention": flex_path, "cp_sparse_attention": cp_path}


def oracle(cfg, inputs, backward: bool) -> dict[str, torch.Tensor]:
    """out (and dq, dk, dv for the upstream gradient) of the dense masked oracle, fp64, CPU."""
    q, k, v = (t.double().requires_grad_(backward) for t in inputs[:3])
    out = reference_attention(q, k, v, cfg, LAYER, STEP)
    ref = {"out": out.detach()}
    if backward:
        grads = torch.autograd.grad(out, (q, k, v), inputs[3].double())
        ref.update(zip(("dq", "dk", "dv"), grads, strict=True))
    return ref


def compare(attend, cfg, inputs, ref, device, tol: float) -> dict[str, Any]:
    """Errors of `attend`'s out (and dq, dk, dv when `ref` has them) against `ref`."""
    backward = "dq" in ref
    q, k, v, upstream = (t.to(device) for t in inputs)
    q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
    out = attend(q, k, v, cfg)
    got = {"out": out}
    if backward:
        grads = torch.autograd.grad(out, (q, k, v), upstream)
        got.update(zip(("dq", "dk", "dv"), grads, strict=True))
    errors = {}
    for name, want in ref.items():
        err = float((got[name].detach().cpu().double() - want).abs().max())
        scale = float(want.abs().max())
        rel = err / max(scale, 1e-30)
        errors[name] = {"max_abs_err": err, "ref_max_abs": scale, "rel_err": rel}
    worst = max(e["rel_err"] for e in errors.values())
    return {
        "errors": errors,
        "worst_rel_err": worst,
        "passed": worst <= tol,
        "backward": True if backward else NO_CPU_BACKWARD,
    }


def exactness(sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    torch.set_float32_matmul_precision("highest")
    backward = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    shape = (1, sizes.exact_heads, sizes.exact_n, HEAD_DIM)
    results = []
    for pattern, kwargs in PATTERNS.items():
        cfg = SparsityConfig(**kwargs)
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]
            ref = oracle(cfg, inputs, backward)
            dtype_name = str(dtype).removeprefix("torch.")
            tol = TOLERANCE[dtype_name]
            for path, attend in PATHS.items():
                entry: dict[str, Any] = {"path": path, "pattern": pattern, "dtype": dtype_name}
                if time.perf_counter() > deadline:
                    entry["skipped"] = "time budget"
                else:
                    entry["tolerance"] = tol
                    entry.update(attempt(compare, attend, cfg, inputs, ref, device, tol))
                    say(f"  {path} {pattern} {dtype_name}: passed={entry.get('passed')}, "
                        f"worst rel err {entry.get('worst_rel_err')}")  # fmt: skip
                results.append(entry)
    return {
        "settings": {
            "n": sizes.exact_n,
            "batch": 1,
            "heads": sizes.exact_heads,
            "head_dim": HEAD_DIM,
            "layer": LAYER,
            "step": STEP,
            "patterns": PATTERNS,
            "tolerance": TOLERANCE,
            "error": "rel_err = max|x - ref| / max|ref|; ref = reference_attention in fp64 on "
            "the CPU from the same dtype-rounded q, k, v and upstream gradient",
            "float32_matmul_precision": "highest",
        },
        "results": results,
        "all_pass": bool(results) and all(r.get("passed") is True for r in results),
    }


# ---- 2. throughput --------------------------------------------------------------------------


def dense_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention on the flash backend (the CPU smoke: whichever SDPA picks)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def useful_tflops(pairs: int, ms: float, backward: bool) -> float:
    flops = FWD_FLOPS_PER_PAIR_DIM * pairs * HEAD_DIM * (FWD_BWD_MULTIPLIER if backward else 1)
    return flops / (ms / 1e3) / 1e12


def time_attention(attend, qkv, upstream, sizes: Sizes, deadline: float) -> dict[str, Any]:
    """Forward (with autograd on when q requires grad: the training forward) and, then,
    forward+backward: the median and all of the timed reps after the warm-up calls."""

    def forward():
        return attend(*qkv)

    def forward_backward():
        torch.autograd.grad(attend(*qkv), qkv, upstream)

    timed = {"fwd_ms": forward}
    if qkv[0].requires_grad:
        timed["fwd_bwd_ms"] = forward_backward
    rec: dict[str, Any] = {}
    for key, fn in timed.items():
        warm(fn, qkv[0].device, sizes.warmup_calls)
        times = time_ms(fn, qkv[0].device, sizes.reps, deadline)
        rec[key], rec[key + "_all"] = statistics.median(times), times
    return rec


def measure(impl: str, qkv, upstream, sizes: Sizes, deadline: float) -> dict[str, Any]:
    if impl == "dense_flash":
        return time_attention(dense_flash, qkv, upstream, sizes, deadline)
    cfg = SparsityConfig(**PATTERNS[impl])
    batch, heads, n, dim = qkv[0].shape
    device = qkv[0].device
    block_mask, mask_build_ms = timed_block_mask(cfg, batch, heads, n, device)
    kernel = lambda q, k, v: flex_kernel(q, k, v, block_mask, dim**-0.5)
    rec = time_attention(kernel, qkv, upstream, sizes, deadline)
    rec["mask_build_ms"] = mask_build_ms
    if qkv[0].requires_grad:  # the model's call; compiled above, so one warm-up suffices
        q, k, v = qkv

        def call():
            torch.autograd.grad(sparse_attention(q, k, v, cfg, backend="flex"), qkv, upstream)

        warm(call, device, calls=1)
        times = time_ms(call, device, max(1, sizes.reps // 2), deadline)
        rec["call_fwd_bwd_ms"], rec["call_fwd_bwd_ms_all"] = statistics.median(times), times
    return rec


def timed_block_mask(cfg, batch: int, heads: int, n: int, device: torch.device):
    """The model's BlockMask of layer 0, step 0, and the milliseconds it took to build."""
    t0 = time.perf_counter()
    block_mask = build_block_mask(cfg, batch, heads, n, 0, 0, None, None, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return block_mask, (time.perf_counter() - t0) * 1e3


def throughput_at(n: int, sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    """{impl: record} at sequence length n."""
    backward = device.type == "cuda"
    rate_key = "fwd_bwd_ms" if backward else "fwd_ms"
    heads = sizes.throughput_heads
    gen = torch.Generator(device=device).manual_seed(n)
    shape = (1, heads, n, HEAD_DIM)
    qkv = tuple(
        torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
        .requires_grad_(backward)
        for _ in range(3)
    )  # fmt: skip
    upstream = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
    row = {}
    for impl in ("dense_flash", *THROUGHPUT_PATTERNS):
        dense = impl == "dense_flash"
        pairs = heads * n * n if dense else count_pairs(SparsityConfig(**PATTERNS[impl]), n, heads)
        entry: dict[str, Any] = {"n": n, "impl": impl, "pairs": pairs}
        entry["density"] = pairs / (heads * n * n)
        if time.perf_counter() > deadline:
            entry["skipped"] = "time budget"
        else:
            entry.update(attempt(measure, impl, qkv, upstream, sizes, deadline))
        if rate_key in entry:
            entry["useful_tflops"] = useful_tflops(pairs, entry[rate_key], backward)
        say(f"  N={n} {impl}: {rate_key} {entry.get(rate_key)}, "
            f"useful TFLOP/s {entry.get('useful_tflops')}")  # fmt: skip
        row[impl] = entry
        free_memory(device)
    return row


def throughput(sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    rate_key = "fwd_bwd_ms" if device.type == "cuda" else "fwd_ms"
    results: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float | None]] = {p: {} for p in THROUGHPUT_PATTERNS}
    for n in sizes.throughput_ns:
        row = throughput_at(n, sizes, device, deadline)
        results.extend(row.values())
        dense_rate = row["dense_flash"].get("useful_tflops")
        for pattern in THROUGHPUT_PATTERNS:
            rate = row[pattern].get("useful_tflops")
            ratios[pattern][str(n)] = rate / dense_rate if rate and dense_rate else None
        free_memory(device)
    return {
        "settings": {
            "batch": 1,
            "heads": sizes.throughput_heads,
            "head_dim": HEAD_DIM,
            "dtype": "bfloat16",
            "seq_lens": list(sizes.throughput_ns),
            "warmup_calls": sizes.warmup_calls,
            "reps": sizes.reps,
            "patterns": {p: PATTERNS[p] for p in THROUGHPUT_PATTERNS},
            "timing": "median of the timed reps after the warm-up calls (CUDA events on GPU); "
            "fwd_ms is the forward with autograd on (the training forward)",
            "flop_convention": "useful fwd = 4 * D * pairs; fwd+bwd = 3.5 x fwd (the backward "
            "counts 2.5 forwards, its QK^T recompute included, as the FlashAttention papers); "
            "pairs: count_pairs for sparse, B*H*N^2 for dense",
            "dense": "scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION, not causal",
            "sparse": "the model's compiled flex_attention with a BlockMask built once "
            "(mask_build_ms, host time); call_fwd_bwd_ms: the whole "
            "sparse_attention(backend='flex') call, which builds the mask every time",
        },
        "results": results,
        "ratios": ratios,
        "ratio": f"useful TFLOP/s of the sparse kernel / that of dense flash, from {rate_key}",
    }


# ---- 3. training ----------------------------------------------------------------------------


def peak_tflops(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((value for key, value in PEAK_FLOPS if key in name), None)
    side = sizes.matmul
    measured = measure_matmul_flops(str(device), (side, side, side))
    return {
        "measured_tflops": measured / 1e12,
        "measured": f"{side}^3 matmul, {'bf16' if device.type == 'cuda' else 'fp32'}, best of 5",
        "nominal_tflops": None if nominal is None else nominal / 1e12,
        "nominal": "dense bf16 tensor-core peak of the device by name (train.flops.PEAK_FLOPS)",
    }


def timed_steps(train_step, sizes: Sizes, device: torch.device, deadline: float) -> list:
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm(train_step, device, sizes.warmup_steps)
    say(f"  warmed up; timing {sizes.timed_steps} steps")
    return time_ms(train_step, device, sizes.timed_steps, deadline)


def training(sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    peak = peak_tflops(sizes, device)
    say(f"  matmul peak {peak['measured_tflops']:.1f} TFLOP/s; building the model")
    args, cfg, n = replace(sizes.model), sizes.train_attention, sizes.train_seq_len
    attention_dtypes: set[str] = set()

    def attention(q, k, v, *rest, **kwargs):  # sparse_attention, noting the dtype it is given
        attention_dtypes.add(str(q.dtype).removeprefix("torch."))
        return sparse_attention(q, k, v, *rest, **kwargs)

    model = Transformer(args, cfg, attention_fn=attention).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(args.vocab_size, (1, n + 1), generator=gen).to(device)
    loss_mask = torch.ones_like(tokens[:, 1:])
    losses: list[float] = []

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1], step=len(losses))  # a new random draw every step
        loss_sum, count = lm_loss(logits, tokens[:, 1:], loss_mask)
        loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    oom = None
    try:
        times = timed_steps(train_step, sizes, device, deadline)
    except torch.OutOfMemoryError as e:
        oom = str(e)[:400]
    if oom is not None:  # recompute after leaving the except: its traceback holds the tensors
        say("  out of memory; again with activation recompute")
        optimizer.zero_grad(set_to_none=True)
        model.args.recompute = True
        times = timed_steps(train_step, sizes, device, deadline)
    step_s = statistics.median(times) / 1e3
    per_token = flops_per_token(args, cfg, n)
    achieved = per_token.total * n / step_s
    mfu = {
        key: achieved / (peak[f"{key}_tflops"] * 1e12) if peak[f"{key}_tflops"] else None
        for key in ("nominal", "measured")
    }
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    mask_build_ms = timed_block_mask(cfg, 1, args.n_heads, n, device)[1]
    say(f"  {n / step_s:.0f} tokens/s, MFU {mfu}, peak memory {peak_gib} GiB")
    return {
        "settings": {
            "model": asdict(args),
            "attention": {k: v for k, v in asdict(cfg).items() if not k.startswith("_")},
            "seq_len": n,
            "batch": 1,
            "params": model.num_params(),
            "precision": "fp32 parameters, torch.autocast bf16 (the attention in the dtype the "
            "model gives it: attention_dtype); float32 matmul precision 'high' (TF32)",
            "optimizer": f"AdamW (fused={fused}), lr 1e-4, weight decay 0.1",
            "warmup_steps": sizes.warmup_steps,
            "flops": "train.flops.flops_per_token: 6 * linear weights + 12 * head_dim * "
            "attended pairs (all layers) / seq_len; the recompute is not counted",
        },
        "attention_dtype": sorted(attention_dtypes),
        "recompute": args.recompute,
        "out_of_memory_without_recompute": oom,
        "step_ms": step_s * 1e3,
        "step_ms_all": times,
        "loss": losses,
        "tokens_per_s": n / step_s,
        "flops_per_token": {"matmul": per_token.matmul, "attention": per_token.attention},
        "tflops_per_s": achieved / 1e12,
        "peak": peak,
        "mfu_nominal": mfu["nominal"],
        "mfu_measured": mfu["measured"],
        "peak_memory_gib": peak_gib,
        "mask_build_ms_per_layer": mask_build_ms,
        "mask_build": "time to build one layer's BlockMask (sparse_attention builds one per "
        "call: per layer and forward, again in a recompute)",
    }


# ---- the run --------------------------------------------------------------------------------


def verdict(values: list[float | None], minimum: float, evaluate: bool) -> bool | None:
    """None when not evaluated; else whether every value is measured and >= minimum (a
    missing value, or none at all, fails)."""
    if not evaluate:
        return None
    return bool(values) and all(v is not None and v >= minimum for v in values)


def targets(report: dict[str, Any], smoke: bool) -> dict[str, Any]:
    ratios = report.get("throughput", {}).get("ratios", {})
    train = report.get("training", {})
    use_nominal = train.get("mfu_nominal") is not None
    mfu = train.get("mfu_nominal" if use_nominal else "mfu_measured")
    exact = report.get("exactness")
    all_pass = None if exact is None else exact.get("all_pass", False)
    rates = [v for per_n in ratios.values() for v in per_n.values()]
    return {
        "timing_evaluated": not smoke,
        "sparse_vs_flash_useful_rate": {
            "minimum": MIN_RATE_RATIO,
            "values": ratios,
            "met": verdict(rates, MIN_RATE_RATIO, not smoke and "throughput" in report),
        },
        "mfu": {
            "minimum": MIN_MFU,
            "value": mfu,
            "peak": "nominal" if use_nominal else "measured",
            "met": verdict([mfu], MIN_MFU, not smoke and "training" in report),
        },
        "exactness_all_pass": {"value": all_pass, "met": all_pass},
    }


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="default results/gpu_<device>.json")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--budget", type=float, default=320.0, help="seconds for the sections")
    p.add_argument("--smoke", action="store_true", help="every section on CPU at tiny sizes")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU; --smoke runs every section on the CPU at tiny sizes")
    device = torch.device("cpu" if args.smoke else "cuda")
    sizes = SMOKE if args.smoke else GPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or RESULTS / f"gpu_{device_slug(name)}{'_smoke' if args.smoke else ''}.json"
    # Up to ~14 flex graphs in a section (pattern x dtype x path, or x N); past the default
    # limit of 8, dynamo would fall back to eager FlexAttention, which materialises N x N scores.
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_seconds": args.budget,
    }
    say(f"{name}, torch {torch.__version__}; sections {args.sections} -> {out}")
    run = {"exactness": exactness, "throughput": throughput, "training": training}
    shares = sum(SHARE[s] for s in args.sections)
    deadline = time.perf_counter()
    for section in args.sections:
        deadline += args.budget * SHARE[section] / shares
        say(f"{section} (until {deadline - _START:.0f}s)")
        torch._dynamo.reset()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        result = attempt(run[section], sizes, device, deadline)
        result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        report[section] = result
        free_memory(device)
    report["targets"] = targets(report, args.smoke)
    report["wall_seconds"] = time.perf_counter() - _START
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"targets: {json.dumps(report['targets'])}")
    say(f"wrote {out} ({report['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
