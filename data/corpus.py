"""Raw text corpus: which files are documents, and which of them are held out for validation.

The default corpus is the running interpreter's standard library source (real, long documents
present on every machine with Python, so the demo needs no download). A user directory of
``.txt`` / ``.md`` / ``.py`` files can be used instead.

Every file is one document. The validation hold-out is decided per file from the SHA-1 of its
path relative to the corpus root, so the same file lands in the same split on every machine and
adding or removing other files never moves it.

Try it:  python -m data.corpus [stdlib|PATH]   (prints document counts per split)
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STDLIB = "stdlib"
# Files below this size are mostly package stubs and `__init__.py` one-liners: noise, not text.
STDLIB_MIN_BYTES = 1024
USER_SUFFIXES = (".txt", ".md", ".py")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class DocRef:
    """One document of the corpus; the text is read on demand (the stdlib is ~30 MB)."""

    index: int  # position in the full sorted corpus listing: the stable document id
    rel_path: str  # path relative to the corpus root, '/'-separated
    path: Path  # absolute path of the file
    size: int  # file size in bytes (part of the corpus fingerprint)
    split: str  # "train" or "val"

    @property
    def key(self) -> str:
        """The webdataset ``__key__``: no dots allowed, so the relative path cannot be used."""
        return f"doc-{self.index:07d}"

    def read_text(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")


def split_of(rel_path: str, val_per_mille: int) -> str:
    """'val' iff sha1(rel_path) % 1000 < val_per_mille; stable across machines and runs."""
    digest = int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16)
    return "val" if digest % 1000 < val_per_mille else "train"


def resolve_source(source: str) -> tuple[Path, tuple[str, ...], int]:
    """(root, suffixes, min_bytes) for ``"stdlib"`` or a directory path."""
    if source == STDLIB:
        return Path(sysconfig.get_paths()["stdlib"]), (".py",), STDLIB_MIN_BYTES
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ValueError(f"data source={source!r} is neither 'stdlib' nor an existing directory")
    # User files are taken as they are; only empty files are skipped.
    return root.resolve(), USER_SUFFIXES, 1


def list_documents(
    source: str = STDLIB, val_per_mille: int = 20, max_docs: int | None = None
) -> list[DocRef]:
    """All documents of ``source``, sorted by relative path, each assigned to a split.

    ``max_docs`` keeps the first ``max_docs`` documents of the sorted listing (before the split),
    so a capped corpus is a prefix of the full one and its split assignment is unchanged.
    """
    if not 0 <= val_per_mille <= 1000:
        raise ValueError(f"data.val_per_mille={val_per_mille} must be in [0, 1000]")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"data.max_docs={max_docs} must be >= 1 (or None for all documents)")
    root, suffixes, min_bytes = resolve_source(source)
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned, not filtered: the interpreter's site-packages can be far larger than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
        for name in filenames:
            if not name.endswith(suffixes):
                continue
            path = Path(dirpath, name)
            if not path.is_file():
                continue
            size = path.stat().st_size
            if size >= min_bytes:
                found.append((path.relative_to(root).as_posix(), path, size))
    found.sort(key=lambda item: item[0])
    if max_docs is not None:
        found = found[:max_docs]
    if not found:
        raise ValueError(f"data source={source!r} ({root}) holds no {'/'.join(suffixes)} files")
    return [
        DocRef(index=i, rel_path=rel, path=path, size=size, split=split_of(rel, val_per_mille))
        for i, (rel, path, size) in enumerate(found)
    ]


def corpus_fingerprint(docs: Iterable[DocRef]) -> str:
    """SHA-256 over (relative path, size, split) of every document: changes when the corpus does."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(f"{doc.rel_path}\0{doc.size}\0{doc.split}\n".encode())
    return h.hexdigest()


def training_lines(docs: Iterable[DocRef]) -> Iterable[str]:
    """Non-blank lines (newline kept) of the given documents, for tokenizer training.

    Code has very long files but short lines; feeding lines keeps every sentencepiece
    "sentence" well under its max_sentence_length and lets it sample across the whole corpus.
    """
    for doc in docs:
        for line in doc.read_text().splitlines(keepends=True):
            if line.strip():
                yield line


if __name__ == "__main__":
    docs = list_documents(sys.argv[1] if len(sys.argv) > 1 else STDLIB)
    for split in SPLITS:
        part = [d for d in docs if d.split == split]
        print(f"{split}: {len(part)} documents, {sum(d.size for d in part) / 1e6:.1f} MB")
