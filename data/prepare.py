"""Prepare a corpus for training: tokenizer + pre-tokenized webdataset shards + manifest.

    python -m data.prepare --out artifacts/data/stdlib [--source stdlib|PATH] [--vocab-size 4096]
        [--model-type unigram] [--shard-tokens 1000000] [--max-docs N] [--val-per-mille 20]

Output directory:
  tokenizer.model         sentencepiece model (reused if tokenizer.json says the settings match)
  tokenizer.json          the settings and corpus fingerprint the model was trained from
  train-000000.tar ...    pre-tokenized shards (format: data/shards.py)
  val-000000.tar ...
  manifest.json           written LAST and atomically: its presence means the directory is
                          complete. A crashed run leaves no manifest and is redone next time;
                          a run whose manifest matches the requested settings is skipped.

``prepare(PrepareArgs(...))`` does the same from Python and returns the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.corpus import SPLITS, DocRef, corpus_fingerprint, list_documents, training_lines
from data.shards import ShardWriter, token_format_for
from data.tokenizer import MODEL_TYPES, Tokenizer, TokenizerArgs, train_tokenizer

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_INFO = "tokenizer.json"
ENCODE_BATCH_DOCS = 64  # documents encoded per call into sentencepiece's thread pool


@dataclass
class PrepareArgs:
    """What to prepare and where. Every field except the last three determines the output."""

    out: str  # output directory (created if missing)
    source: str = "stdlib"  # "stdlib" (this interpreter's standard library) or a directory
    vocab_size: int = 4096  # tokenizer vocabulary size
    model_type: str = "unigram"  # sentencepiece model type: "unigram" or "bpe"
    shard_tokens: int = 1_000_000  # a shard is closed once it holds at least this many tokens
    max_docs: int | None = None  # keep only the first N documents of the sorted corpus
    val_per_mille: int = 20  # documents held out for validation, per thousand (by path hash)
    user_defined_symbols: tuple[str, ...] = ()  # extra unsplittable tokenizer pieces
    input_sentence_size: int = 100_000  # lines sampled to train the tokenizer
    num_threads: int = 0  # tokenizer training/encoding threads; 0 = all cores
    progress: bool = True  # tqdm progress bar over documents
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


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
    tok = args.tokenizer_args().to_dict()
    tok.pop("num_threads")  # does not change the model, so must not force a retrain
    return {
        "source": args.source,
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
    docs = list_documents(args.source, args.val_per_mille, args.max_docs)
    return _up_to_date(Path(args.out), _settings(args, docs))


def _get_tokenizer(args: PrepareArgs, out: Path, settings: dict, train_docs: list[DocRef]):
    model, info = out / TOKENIZER_MODEL, out / TOKENIZER_INFO
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
    _write_json_atomic(info, {"settings": wanted, "sha256": tok.sha256})
    logger.info("tokenizer trained in %.1f s", time.perf_counter() - t0)
    return tok


def _clear_outputs(out: Path) -> None:
    # The manifest goes first: from here until the new one is written, the directory is invalid.
    (out / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for f in list(out.glob(f"{split}-*.tar")) + list(out.glob(f"{split}-*.tar.tmp")):
            f.unlink()


def prepare(args: PrepareArgs) -> dict:
    """Make ``args.out`` a complete prepared directory and return its manifest (see module doc)."""
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = list_documents(args.source, args.val_per_mille, args.max_docs)
    settings = _settings(args, docs)
    if not args.force and (manifest := _up_to_date(out, settings)) is not None:
        logger.info("%s is up to date with these settings; nothing to do", out)
        return manifest

    _clear_outputs(out)
    by_split = {split: [d for d in docs if d.split == split] for split in SPLITS}
    if not by_split["train"]:
        raise ValueError(f"no training documents (val_per_mille={args.val_per_mille})")
    if not by_split["val"]:
        logger.warning("no validation documents: raise --val-per-mille or --max-docs")
    tok = _get_tokenizer(args, out, settings, by_split["train"])
    token_format = token_format_for(tok.vocab_size)

    splits = {}
    # disable=None: tqdm turns itself off when stderr is not a terminal.
    bar = tqdm(
        total=len(docs), unit="doc", desc="tokenize", disable=True if not args.progress else None
    )
    for split, split_docs in by_split.items():
        with ShardWriter(out, split, args.shard_tokens, token_format) as writer:
            for start in range(0, len(split_docs), ENCODE_BATCH_DOCS):
                batch = split_docs[start : start + ENCODE_BATCH_DOCS]
                encoded = tok.encode_batch([d.read_text() for d in batch], args.threads())
                for doc, ids in zip(batch, encoded, strict=True):
                    tokens = np.asarray(ids, dtype=np.int64)
                    writer.write(doc.key, tokens, {"source": doc.rel_path, "n_tokens": len(ids)})
                bar.update(len(batch))
        shards = writer.shards
        splits[split] = {
            "docs": sum(s["docs"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
    bar.close()

    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings,
        "tokenizer": {
            "file": TOKENIZER_MODEL,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "model_type": args.model_type,
            "unk_id": tok.unk_id,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "token_format": token_format,
        "splits": splits,
        "totals": {
            key: sum(splits[s][key] if key != "shards" else len(splits[s][key]) for s in splits)
            for key in ("docs", "tokens", "shards")
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_json_atomic(out / MANIFEST, manifest)
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
    p.add_argument("--source", default="stdlib", help="'stdlib' or a directory of .txt/.md/.py")
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
        num_threads=a.threads,
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
