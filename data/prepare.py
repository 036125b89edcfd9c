"""Prepare a corpus for training: tokenizer + pre-tokenized webdataset shards + manifest.

    python -m data.prepare --out artifacts/data/stdlib [--source stdlib|DIR|FILE]
        [--text-field text] [--vocab-size 4096] [--model-type unigram] [--tokenizer MODEL]
        [--user-symbols "<mask>" ...] [--shard-tokens 1000000] [--max-docs N]
        [--val-per-mille 20] [--workers 4]

Sources (data/corpus.py): the stdlib, or a directory / file of .txt/.md/.py documents,
.jsonl/.jsonl.gz records (text in --text-field) or .parquet rows (needs pyarrow).

Output directory:
  tokenizer.model         sentencepiece model: trained (and reused by a later run if
                          tokenizer.json says the settings match), or a copy of --tokenizer
  tokenizer.json          the settings and corpus fingerprint the model was trained from
  train-000000.tar ...    pre-tokenized shards (format: data/shards.py)
  val-000000.tar ...
  .progress/*.json        one record per finished shard (what it holds, its SHA-256)
  manifest.json           written LAST and atomically: its presence means the directory is
                          complete. A run whose manifest matches the requested settings is
                          skipped; otherwise only the shards without a matching record are
                          (re)written, so a crashed run continues where it stopped.

Shards are planned before encoding (consecutive documents, about --shard-tokens tokens each,
estimated from the text size and the tokenizer's bytes per token on the first ~1 MB) and
written by --workers processes; the result does not depend on the number of workers.

``prepare(PrepareArgs(...))`` does the same from Python and returns the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data.corpus import (
    SPLITS,
    DocRef,
    corpus_fingerprint,
    list_documents,
    training_lines,
)
from data.shard_plan import (
    PROGRESS_DIR,
    ShardTask,
    bytes_per_token,
    file_sha256,
    finished_entry,
    plan_shards,
    remove_stale,
    run_tasks,
    write_json_atomic,
)
from data.shards import token_format_for
from data.tokenizer import MODEL_TYPES, Tokenizer, TokenizerArgs, train_tokenizer

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_INFO = "tokenizer.json"


@dataclass
class PrepareArgs:
    """What to prepare and where. Every field except the last five determines the output."""

    out: str  # output directory (created if missing)
    # "stdlib" (this interpreter's standard library), or a directory or file (data/corpus.py)
    source: str = "stdlib"
    vocab_size: int = 4096  # tokenizer vocabulary size
    model_type: str = "unigram"  # sentencepiece model type: "unigram" or "bpe"
    # Tokens per shard, roughly: shards are planned by text size before encoding, and a longer
    # document gets a shard of its own.
    shard_tokens: int = 1_000_000
    max_docs: int | None = None  # keep only the first N documents of the sorted corpus
    val_per_mille: int = 20  # documents held out for validation, per thousand (by path hash)
    user_defined_symbols: tuple[str, ...] = ()  # extra unsplittable tokenizer pieces
    input_sentence_size: int = 100_000  # lines sampled to train the tokenizer
    text_field: str = "text"  # .jsonl / .parquet sources: the field holding the text
    tokenizer: str = ""  # an existing sentencepiece model file to use instead of training one
    num_threads: int = 0  # tokenizer training/encoding threads; 0 = all cores
    workers: int = 1  # processes writing shards in parallel
    progress: bool = True  # tqdm progress bar over shards
    verbose: bool = False  # let sentencepiece's C++ trainer log to stderr
    force: bool = False  # redo everything even if the output is up to date

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("prepare.out must name an output directory")
        if self.shard_tokens < 1:
            raise ValueError(f"prepare.shard_tokens={self.shard_tokens} must be >= 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"prepare.max_docs={self.max_docs} must be >= 1 or None")
        if not 0 <= self.val_per_mille <= 1000:
            raise ValueError(f"prepare.val_per_mille={self.val_per_mille} must be in [0, 1000]")
        if self.num_threads < 0:
            raise ValueError(f"prepare.num_threads={self.num_threads} must be >= 0")
        if self.workers < 1:
            raise ValueError(f"prepare.workers={self.workers} must be >= 1")
        if not self.text_field:
            raise ValueError("prepare.text_field must name the field holding the text")
        if self.tokenizer and not Path(self.tokenizer).is_file():
            raise ValueError(f"prepare.tokenizer={self.tokenizer!r} is not a file")
        self.user_defined_symbols = tuple(self.user_defined_symbols)
        self.tokenizer_args()  # validates vocab_size, model_type, ...

    def threads(self) -> int:
        return self.num_threads or os.cpu_count() or 1

    def tokenizer_args(self) -> TokenizerArgs:
        return TokenizerArgs(
            vocab_size=self.vocab_size,
            model_type=self.model_type,
            user_defined_symbols=self.user_defined_symbols,
            input_sentence_size=self.input_sentence_size,
            num_threads=self.threads(),
        )


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared directory (or of the manifest file itself).

    Useful keys: ``manifest["tokenizer"]["vocab_size"]`` and ``["sha256"]`` (compare with the
    model's vocab size / checkpoint), ``manifest["splits"][split]["shards"]`` and ``["tokens"]``.
    """
    path = Path(path)
    file = path / MANIFEST if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: the data directory was never prepared or its preparation "
            f"did not finish; run `python -m data.prepare --out {file.parent}`"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{file} has manifest version {manifest.get('version')!r}; this code reads "
            f"version {MANIFEST_VERSION}: re-run `python -m data.prepare --out {file.parent}`"
        )
    return manifest


def _settings(args: PrepareArgs, docs: list[DocRef]) -> dict:
    if args.tokenizer:
        tok: dict = {"file_sha256": file_sha256(Path(args.tokenizer))}
    else:
        tok = args.tokenizer_args().to_dict()
        tok.pop("num_threads")  # does not change the model, so must not force a retrain
    return {
        "source": args.source,
        "text_field": args.text_field,
        "max_docs": args.max_docs,
        "val_per_mille": args.val_per_mille,
        "shard_tokens": args.shard_tokens,
        "corpus_sha256": corpus_fingerprint(docs),
        "tokenizer": tok,
    }


def _up_to_date(out: Path, settings: dict) -> dict | None:
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return None
    if manifest.get("settings") != settings:
        return None
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            f = out / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["bytes"]:
                return None
    tok_file = out / manifest["tokenizer"]["file"]
    if not tok_file.is_file() or Tokenizer.load(tok_file).sha256 != manifest["tokenizer"]["sha256"]:
        return None
    return manifest


def up_to_date(args: PrepareArgs) -> dict | None:
    """The existing manifest if ``args.out`` already holds exactly what ``args`` asks for."""
    docs = list_documents(args.source, args.val_per_mille, args.max_docs, args.text_field)
    return _up_to_date(Path(args.out), _settings(args, docs))


def _get_tokenizer(args: PrepareArgs, out: Path, settings: dict, train_docs: list[DocRef]):
    model, info = out / TOKENIZER_MODEL, out / TOKENIZER_INFO
    if args.tokenizer:
        src = Path(args.tokenizer)
        if not model.is_file() or file_sha256(model) != file_sha256(src):
            shutil.copyfile(src, model.with_name(model.name + ".tmp"))
            os.replace(model.with_name(model.name + ".tmp"), model)
        write_json_atomic(info, {"settings": {"copied_from": str(src)}, "sha256": None})
        tok = Tokenizer.load(model)
        logger.info("using the given tokenizer %s", tok)
        return tok
    # The model depends on the tokenizer settings and on the training documents only.
    wanted = {
        "tokenizer": settings["tokenizer"],
        "train_docs_sha256": corpus_fingerprint(train_docs),
    }
    if model.is_file() and info.is_file():
        recorded = json.loads(info.read_text())
        tok = Tokenizer.load(model)
        if recorded.get("settings") == wanted and recorded.get("sha256") == tok.sha256:
            logger.info("reusing %s", tok)
            return tok
    t0 = time.perf_counter()
    tok = train_tokenizer(training_lines(train_docs), model, args.tokenizer_args(), args.verbose)
    write_json_atomic(info, {"settings": wanted, "sha256": tok.sha256})
    logger.info("tokenizer trained in %.1f s", time.perf_counter() - t0)
    return tok


def prepare(args: PrepareArgs) -> dict:
    """Make ``args.out`` a complete prepared directory and return its manifest (see module doc)."""
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = list_documents(args.source, args.val_per_mille, args.max_docs, args.text_field)
    settings = _settings(args, docs)
    if not args.force and (manifest := _up_to_date(out, settings)) is not None:
        logger.info("%s is up to date with these settings; nothing to do", out)
        return manifest

    # From here until the new manifest is written, the directory is invalid.
    (out / MANIFEST).unlink(missing_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    by_split = {split: [d for d in docs if d.split == split] for split in SPLITS}
    if not by_split["train"]:
        raise ValueError(f"no training documents (val_per_mille={args.val_per_mille})")
    if not by_split["val"]:
        logger.warning("no validation documents: raise --val-per-mille or --max-docs")
    tok = _get_tokenizer(args, out, settings, by_split["train"])
    token_format = token_format_for(tok.vocab_size)
    per_token = bytes_per_token(tok, by_split["train"], args.threads())
    shard_bytes = args.shard_tokens * per_token
    threads = args.threads() if args.workers <= 1 else max(1, args.threads() // args.workers)
    model = str(out / TOKENIZER_MODEL)
    tasks = [
        ShardTask(str(out), split, i, tuple(part), token_format, model, tok.sha256, threads)
        for split, split_docs in by_split.items()
        for i, part in enumerate(plan_shards(split_docs, shard_bytes))
    ]
    remove_stale(out, {t.name for t in tasks})
    entries = {}
    pending = []
    for task in tasks:
        entry = None if args.force else finished_entry(task)
        if entry is None:
            pending.append(task)
        else:
            entries[task.name] = entry
    if entries:
        done, total = len(entries), len(tasks)
        logger.info("%d of %d shards already written; writing %d", done, total, len(pending))
    entries.update(run_tasks(pending, args.workers, args.progress))

    splits = {}
    for split in SPLITS:
        shards = [entries[t.name] for t in tasks if t.split == split]
        splits[split] = {
            "docs": sum(s["docs"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings,
        "tokenizer": {
            "file": TOKENIZER_MODEL,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "model_type": args.model_type if not args.tokenizer else "external",
            "unk_id": tok.unk_id,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "token_format": token_format,
        "bytes_per_token": round(per_token, 4),
        "splits": splits,
        "totals": {
            key: sum(splits[s][key] if key != "shards" else len(splits[s][key]) for s in splits)
            for key in ("docs", "tokens", "shards")
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json_atomic(out / MANIFEST, manifest)
    logger.info("wrote %s", out / MANIFEST)
    return manifest


def summary(manifest: dict, out: str) -> str:
    parts = [
        f"{name}: {s['docs']} docs, {s['tokens']:,} tokens, {len(s['shards'])} shards"
        for name, s in manifest["splits"].items()
    ]
    return f"{out}: " + " | ".join(parts) + f" | {manifest['seconds']:.1f} s to prepare"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", default="stdlib", help="'stdlib', a directory or a file")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet")
    p.add_argument("--tokenizer", default="", help="use this sentencepiece model, do not train")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--model-type", default="unigram", choices=MODEL_TYPES)
    p.add_argument("--shard-tokens", type=int, default=1_000_000)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--val-per-mille", type=int, default=20)
    p.add_argument("--user-symbols", nargs="*", default=[], help="extra unsplittable pieces")
    p.add_argument("--input-sentence-size", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    p.add_argument("--force", action="store_true", help="redo even if up to date")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = PrepareArgs(
        out=a.out,
        source=a.source,
        vocab_size=a.vocab_size,
        model_type=a.model_type,
        shard_tokens=a.shard_tokens,
        max_docs=a.max_docs,
        val_per_mille=a.val_per_mille,
        user_defined_symbols=tuple(a.user_symbols),
        input_sentence_size=a.input_sentence_size,
        text_field=a.text_field,
        tokenizer=a.tokenizer,
        num_threads=a.threads,
        workers=a.workers,
        progress=not a.no_progress,
        verbose=a.verbose,
        force=a.force,
    )
    if not args.force and up_to_date(args) is not None:
        print(f"{args.out} is up to date with these settings: skipped (use --force to redo)")
    manifest = prepare(args)
    print(summary(manifest, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
