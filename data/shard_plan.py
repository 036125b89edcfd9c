"""Shards planned before encoding, written in parallel, each skipped when already written.

A split's documents are cut into consecutive runs of about ``shard_bytes`` of text (the target
token count times the tokenizer's bytes per token, measured on the first ~1 MB of text); each run
is a ShardTask whose ``plan`` hash covers everything that determines the shard's bytes. A
finished shard leaves a record in ``.progress/`` (the plan hash, its manifest entry and the
tar's SHA-256); a later run skips tasks whose record, tar size and hash still match. Tasks run in
worker processes (``run_tasks``); the shards do not depend on the number of workers. Used by
data/prepare.py.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.corpus import SPLITS, DocRef, read_texts
from data.shards import shard_name, write_shard
from data.tokenizer import Tokenizer

PROGRESS_DIR = ".progress"
ENCODE_BATCH_DOCS = 64  # documents encoded per call into sentencepiece's thread pool
SIZE_SAMPLE_BYTES = 1 << 20  # text encoded to estimate bytes per token (shard planning)


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def bytes_per_token(tok: Tokenizer, docs: list[DocRef], threads: int) -> float:
    """Text bytes per token on the first ~1 MB of ``docs``: how shards are sized before encoding."""
    sample, size = [], 0
    for doc in docs:
        sample.append(doc)
        size += doc.size
        if size >= SIZE_SAMPLE_BYTES:
            break
    texts = list(read_texts(sample))
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts, threads))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return max(n_bytes, 1) / max(n_tokens, 1)


def plan_shards(docs: list[DocRef], shard_bytes: float) -> list[list[DocRef]]:
    """Consecutive documents per shard; a shard is closed once it holds ``shard_bytes`` of text.

    Decided before anything is encoded, so shards can be written in parallel and each one is
    re-done or skipped on its own."""
    shards: list[list[DocRef]] = [[]]
    size = 0
    for doc in docs:
        shards[-1].append(doc)
        size += doc.size
        if size >= shard_bytes:
            shards.append([])
            size = 0
    return [s for s in shards if s]


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: everything that determines its bytes is in ``plan``."""

    out: str
    split: str
    index: int
    docs: tuple[DocRef, ...]
    token_format: str
    tokenizer_file: str
    tokenizer_sha256: str
    threads: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def plan(self) -> str:
        h = hashlib.sha256(f"{self.tokenizer_sha256}\0{self.token_format}\n".encode())
        for d in self.docs:
            h.update(f"{d.key}\0{d.source}\0{d.size}\0{d.text_field}\n".encode())
        return h.hexdigest()

    def record_path(self) -> Path:
        return Path(self.out) / PROGRESS_DIR / f"{self.name}.json"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finished_entry(task: ShardTask) -> dict | None:
    """The shard's manifest entry if an earlier run wrote exactly this shard; else None."""
    try:
        record = json.loads(task.record_path().read_text())
        tar = Path(task.out) / task.name
        if record["plan"] != task.plan or tar.stat().st_size != record["entry"]["bytes"]:
            return None
        return record["entry"] if file_sha256(tar) == record["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


_TOKENIZERS: dict[str, Tokenizer] = {}


def write_task(task: ShardTask) -> dict:
    """Encode and write one shard (in a worker process or in this one); returns its entry."""
    out = Path(task.out)
    tok = _TOKENIZERS.get(task.tokenizer_sha256)
    if tok is None:
        tok = _TOKENIZERS[task.tokenizer_sha256] = Tokenizer.load(task.tokenizer_file)
    if tok.sha256 != task.tokenizer_sha256:
        raise RuntimeError(f"{task.tokenizer_file} changed while the shards were written")
    samples = []
    docs = list(task.docs)
    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        batch = docs[start : start + ENCODE_BATCH_DOCS]
        encoded = tok.encode_batch(list(read_texts(batch)), task.threads)
        for doc, ids in zip(batch, encoded, strict=True):
            tokens = np.asarray(ids, dtype=np.int64)
            samples.append((doc.key, tokens, {"source": doc.source, "n_tokens": len(ids)}))
    entry = write_shard(out, task.split, task.index, samples, task.token_format)
    record = {"plan": task.plan, "entry": entry, "sha256": file_sha256(out / task.name)}
    write_json_atomic(task.record_path(), record)
    return entry


def remove_stale(out: Path, keep: set[str]) -> None:
    for split in SPLITS:
        for f in out.glob(f"{split}-*.tar*"):
            if f.name not in keep:
                f.unlink()
        for f in (out / PROGRESS_DIR).glob(f"{split}-*.json"):
            if f.name.removesuffix(".json") not in keep:
                f.unlink()


def run_tasks(tasks: list[ShardTask], workers: int, progress: bool) -> dict[str, dict]:
    # disable=None: tqdm turns itself off when stderr is not a terminal.
    bar = tqdm(total=len(tasks), unit="shard", desc="encode", disable=None if progress else True)
    entries = {}
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            entries[task.name] = write_task(task)
            bar.update(1)
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for task, entry in zip(tasks, pool.map(write_task, tasks), strict=True):
                entries[task.name] = entry
                bar.update(1)
    bar.close()
    return entries
