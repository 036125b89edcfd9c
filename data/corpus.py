"""Raw text corpus: which documents there are, and which of them are held out for validation.

The default corpus is the running interpreter's standard library source (real, long documents
present on every machine with Python, so the demo needs no download). Instead, ``source`` can be
a directory or a single file:
  - ``.txt`` / ``.md`` / ``.py`` files: every file is one document;
  - ``.jsonl`` / ``.jsonl.gz`` files: every line is a JSON object, one document, whose text is
    its ``text_field`` (lines that are not JSON objects or lack a string text field are skipped
    with a warning);
  - ``.parquet`` files (needs pyarrow): every row is one document, column ``text_field``.

Documents are listed in (relative path, record number) order. The validation hold-out is
decided per document from the SHA-1 of its source name (relative path, plus ``:N`` for record
N of a JSONL/parquet file), so the same document lands in the same split on every machine and
adding or removing other documents never moves it.

Try it:  python -m data.corpus [stdlib|PATH]   (prints document counts per split)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STDLIB = "stdlib"
# Files below this size are mostly package stubs and `__init__.py` one-liners: noise, not text.
STDLIB_MIN_BYTES = 1024
TEXT_SUFFIXES = (".txt", ".md", ".py")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
USER_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
SPLITS = ("train", "val")


@dataclass(frozen=True)
class DocRef:
    """One document of the corpus; the text is read on demand (the stdlib is ~30 MB)."""

    index: int  # position in the full sorted corpus listing: the stable document id
    rel_path: str  # path relative to the corpus root, '/'-separated
    path: Path  # absolute path of the file
    size: int  # file size in bytes (part of the corpus fingerprint)
    split: str  # "train" or "val"
    record: int = -1  # record number within a JSONL / parquet file; -1: the file is the document
    text_field: str = "text"  # JSONL / parquet: the field holding the text

    @property
    def key(self) -> str:
        """The webdataset ``__key__``: no dots allowed, so the relative path cannot be used."""
        return f"doc-{self.index:07d}"

    @property
    def source(self) -> str:
        """Where the document comes from: the relative path, plus ``:N`` for record N."""
        return self.rel_path if self.record < 0 else f"{self.rel_path}:{self.record}"

    def read_text(self) -> str:
        if self.record >= 0:
            return next(read_texts([self]))
        return self.path.read_text(encoding="utf-8", errors="replace")


def split_of(rel_path: str, val_per_mille: int) -> str:
    """'val' iff sha1(rel_path) % 1000 < val_per_mille; stable across machines and runs."""
    digest = int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16)
    return "val" if digest % 1000 < val_per_mille else "train"


def resolve_source(source: str) -> tuple[Path, list[Path], tuple[str, ...], int]:
    """(root, files, suffixes, min_bytes) for ``"stdlib"``, a directory or a single file."""
    suffixes: tuple[str, ...] = (".py",)
    if source == STDLIB:
        root, min_bytes = Path(sysconfig.get_paths()["stdlib"]), STDLIB_MIN_BYTES
    else:
        # User files are taken as they are; only empty documents are skipped.
        root, suffixes, min_bytes = Path(source).expanduser().resolve(), USER_SUFFIXES, 1
        if root.is_file():
            if not root.name.endswith(USER_SUFFIXES):
                raise ValueError(f"data source={source!r} is not one of {'/'.join(USER_SUFFIXES)}")
            return root.parent, [root], suffixes, min_bytes
        if not root.is_dir():
            raise ValueError(
                f"data source={source!r} is neither 'stdlib' nor an existing directory or file"
            )
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned, not filtered: the interpreter's site-packages can be far larger than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
        files += [Path(dirpath, n) for n in filenames if n.endswith(suffixes)]
    return root, [f for f in files if f.is_file()], suffixes, min_bytes


def _require_pyarrow(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path} is a parquet file: reading parquet needs pyarrow, which is not installed "
            "(pip install pyarrow), or convert it to .jsonl"
        ) from None
    return pq


def iter_records(path: Path, text_field: str) -> Iterator[tuple[int, str | None]]:
    """(record number, text or None if the record has no usable text) of a JSONL/parquet file."""
    if path.name.endswith(".parquet"):
        pq = _require_pyarrow(path)
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{path} has no column {text_field!r} (--text-field)")
        i = 0
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                yield i, text if isinstance(text, str) else None
                i += 1
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            text = obj.get(text_field) if isinstance(obj, dict) else None
            yield i, text if isinstance(text, str) else None


def read_texts(docs: Sequence[DocRef]) -> Iterator[str]:
    """The texts of ``docs``, in order. Consecutive records of one file are read in one pass
    (a compressed file cannot be read at an offset), so pass them in listing order."""
    i = 0
    while i < len(docs):
        doc = docs[i]
        if doc.record < 0:
            yield doc.read_text()
            i += 1
            continue
        j = i + 1
        while j < len(docs) and docs[j].path == doc.path and docs[j].record > docs[j - 1].record:
            j += 1
        wanted = iter(d.record for d in docs[i:j])
        target = next(wanted)
        for n, text in iter_records(doc.path, doc.text_field):
            if n == target:
                yield text or ""
                target = next(wanted, -1)
                if target < 0:
                    break
        if target >= 0:
            raise ValueError(f"{doc.path} has no record {target} any more: was it changed?")
        i = j


def _file_documents(
    path: Path, rel: str, min_bytes: int, text_field: str
) -> Iterator[tuple[str, Path, int, int]]:
    """(relative path, path, size in bytes, record) of each document of one file."""
    if not path.name.endswith(RECORD_SUFFIXES):
        size = path.stat().st_size
        if size >= min_bytes:
            yield rel, path, size, -1
        return
    bad = 0
    for n, text in iter_records(path, text_field):
        if text is None:
            bad += 1
        elif text:
            yield rel, path, len(text.encode("utf-8")), n
    if bad:
        logger.warning(
            "%s: skipped %d records that are not JSON objects with a string %r field",
            path,
            bad,
            text_field,
        )


def list_documents(
    source: str = STDLIB,
    val_per_mille: int = 20,
    max_docs: int | None = None,
    text_field: str = "text",
) -> list[DocRef]:
    """All documents of ``source``, in listing order, each assigned to a split.

    ``max_docs`` keeps the first ``max_docs`` documents of the listing (before the split),
    so a capped corpus is a prefix of the full one and its split assignment is unchanged.
    """
    if not 0 <= val_per_mille <= 1000:
        raise ValueError(f"data.val_per_mille={val_per_mille} must be in [0, 1000]")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"data.max_docs={max_docs} must be >= 1 (or None for all documents)")
    root, files, suffixes, min_bytes = resolve_source(source)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    found: list[tuple[str, Path, int, int]] = []
    for path in files:
        found += _file_documents(path, path.relative_to(root).as_posix(), min_bytes, text_field)
        if max_docs is not None and len(found) >= max_docs:
            break
    if max_docs is not None:
        found = found[:max_docs]
    if not found:
        raise ValueError(f"data source={source!r} ({root}) holds no {'/'.join(suffixes)} documents")
    docs = []
    for i, (rel, path, size, record) in enumerate(found):
        name = rel if record < 0 else f"{rel}:{record}"
        split = split_of(name, val_per_mille)
        docs.append(DocRef(i, rel, path, size, split, record, text_field))
    return docs


def corpus_fingerprint(docs: Iterable[DocRef]) -> str:
    """SHA-256 over (relative path, size, split) of every document: changes when the corpus does."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(f"{doc.source}\0{doc.size}\0{doc.split}\n".encode())
    return h.hexdigest()


def training_lines(docs: Iterable[DocRef]) -> Iterable[str]:
    """Non-blank lines (newline kept) of the given documents, for tokenizer training.

    Code has very long files but short lines; feeding lines keeps every sentencepiece
    "sentence" well under its max_sentence_length and lets it sample across the whole corpus.
    """
    for text in read_texts(list(docs)):
        for line in text.splitlines(keepends=True):
            if line.strip():
                yield line


if __name__ == "__main__":
    docs = list_documents(sys.argv[1] if len(sys.argv) > 1 else STDLIB)
    for split in SPLITS:
        part = [d for d in docs if d.split == split]
        print(f"{split}: {len(part)} documents, {sum(d.size for d in part) / 1e6:.1f} MB")
