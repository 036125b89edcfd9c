"""Data pipeline throughput: prepare (docs/s) and the train loader (tokens/s per process).

    python -m benchmarks.data [--max-docs 400] [--seq-len 2048] [--batch 8] [--seconds 5]
                              [--workers 2] [--out benchmarks/results/data.json] [--quick]

1. prepare: the demo corpus (the stdlib, first --max-docs documents) into a temporary directory,
   end to end (tokenizer training included), then again with that tokenizer given
   (``--tokenizer``: encoding and shard writing only) with 1 and with --workers processes.
2. loader: the train stream over the prepared shards, for about --seconds each: in the training
   process (num_workers=0: one loader process, the figure to compare with the 1M tokens/s
   target), with DataLoader workers (num_workers=--workers, the aggregate as the training
   process receives it), and in-process with doc_start_at_boundary and with the MLM objective
   (the corpus is prepared with a "<mask>" user symbol for it).

Writes JSON (default benchmarks/results/data.json); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

from data.loader import DataArgs, build_train_stream
from data.prepare import PrepareArgs, prepare

RESULTS = Path(__file__).parent / "results" / "data.json"
TARGET_TOKENS_PER_S = 1_000_000


def time_prepare(out: Path, max_docs: int, vocab: int, **kw: Any) -> dict[str, Any]:
    args = PrepareArgs(
        out=str(out),
        max_docs=max_docs,
        vocab_size=vocab,
        shard_tokens=200_000,
        user_defined_symbols=("<mask>",),
        progress=False,
        **kw,
    )
    t0 = time.perf_counter()
    manifest = prepare(args)
    seconds = time.perf_counter() - t0
    docs, tokens = manifest["totals"]["docs"], manifest["totals"]["tokens"]
    return {
        "docs": docs,
        "tokens": tokens,
        "shards": manifest["totals"]["shards"],
        "workers": args.workers,
        "seconds": round(seconds, 3),
        "docs_per_s": round(docs / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
    }


def time_loader(args: DataArgs, seq_len: int, batch: int, seconds: float) -> dict[str, Any]:
    stream = build_train_stream(args, seq_len, batch, seed=0)
    batches = iter(stream)
    next(batches)  # start-up (worker processes, first shard) is not throughput
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in islice(batches, 16):
            n += 1
    elapsed = time.perf_counter() - t0
    tokens = n * batch * seq_len
    return {
        "num_workers": args.num_workers,
        "doc_start_at_boundary": args.doc_start_at_boundary,
        "objective": args.objective,
        "batches": n,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-docs", type=int, default=None, help="default 400; quick 40")
    p.add_argument("--vocab-size", type=int, default=None, help="default 4096; quick 512")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=None, help="per loader run; default 5")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small corpus, short runs (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    max_docs = a.max_docs or (40 if a.quick else 400)
    vocab = a.vocab_size or (512 if a.quick else 4096)
    seconds = a.seconds or (0.5 if a.quick else 5.0)
    quick_tok: dict[str, Any] = {"model_type": "bpe", "input_sentence_size": 20_000}
    tok_kw = quick_tok if a.quick else {}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prep = {"end_to_end": time_prepare(root / "full", max_docs, vocab, **tok_kw)}
        model = str(root / "full" / "tokenizer.model")
        for workers in sorted({1, a.workers}):
            prep[f"encode_workers{workers}"] = time_prepare(
                root / f"w{workers}", max_docs, vocab, tokenizer=model, workers=workers
            )
        print(json.dumps(prep, indent=1), flush=True)
        path = str(root / "full")
        loader = []
        runs = [
            DataArgs(path=path),
            DataArgs(path=path, num_workers=a.workers),
            DataArgs(path=path, doc_start_at_boundary=True),
            DataArgs(path=path, objective="mlm"),
        ]
        for args in runs:
            loader.append(time_loader(args, a.seq_len, a.batch, seconds))
            print(json.dumps(loader[-1]), flush=True)

    per_process = loader[0]["tokens_per_s"]
    report = {
        "benchmark": "data",
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "settings": {
            "corpus": "stdlib",
            "max_docs": max_docs,
            "vocab_size": vocab,
            "seq_len": a.seq_len,
            "micro_batch_size": a.batch,
            "quick": a.quick,
        },
        "prepare": prep,
        "loader": loader,
        "loader_tokens_per_s_per_process": per_process,
        "target_tokens_per_s_per_process": TARGET_TOKENS_PER_S,
        "meets_target": per_process >= TARGET_TOKENS_PER_S,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}: {per_process:,} tokens/s per loader process")


if __name__ == "__main__":
    main()
