"""Pre-tokenized webdataset tar shards: writing (plain tarfile, byte-reproducible) and reading.

A shard ``{split}-{n:06d}.tar`` holds one sample per document, as two tar members:
  ``doc-0000123.tokens.u16``  token ids as raw little-endian uint16 (vocab <= 65536), or
  ``doc-0000123.tokens.i32``  raw little-endian int32 for larger vocabularies;
  ``doc-0000123.meta.json``   {"source": relative path, "n_tokens": int}.
Raw bytes instead of .npy: half the size of int32, no header to parse, and trivially read by any
language. The format is recorded in the manifest ("token_format").

Reading goes through ``webdataset`` (the same reader a cluster run would use with remote URLs).

Try it:  python -m data.shards SHARD.tar   (prints the first samples)
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

TOKEN_DTYPES: dict[str, np.dtype] = {"u16": np.dtype("<u2"), "i32": np.dtype("<i4")}


def token_format_for(vocab_size: int) -> str:
    return "u16" if vocab_size <= 2**16 else "i32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass
class ShardSample:
    key: str  # the document id, e.g. "doc-0000123"
    tokens: np.ndarray  # [n_tokens], dtype of the token format (uint16 or int32)
    meta: dict  # {"source": relative path, "n_tokens": int}


class ShardWriter:
    """Writes documents to ``{split}-000000.tar``, ``{split}-000001.tar``, ...

    A document is never split across shards; a shard is closed as soon as it holds at least
    ``shard_tokens`` tokens. Each shard is written to ``.tmp`` and renamed when complete.
    """

    def __init__(
        self, out_dir: Path, split: str, shard_tokens: int, token_format: str, first_index: int = 0
    ) -> None:
        self.out_dir = Path(out_dir)
        self.first_index = first_index
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = TOKEN_DTYPES[token_format]
        self.ext = f"tokens.{token_format}"
        self.shards: list[dict] = []  # {"file", "docs", "tokens", "bytes"} per finished shard
        self._tar: tarfile.TarFile | None = None
        self._docs = 0
        self._tokens = 0

    def _path(self) -> Path:
        return self.out_dir / shard_name(self.split, self.first_index + len(self.shards))

    def _add_member(self, name: str, data: bytes) -> None:
        # Fixed metadata so the same input gives byte-identical shards.
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, tokens: np.ndarray, meta: dict) -> None:
        if self._tar is None:
            tmp = self._path().with_suffix(".tar.tmp")
            self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        self._add_member(f"{key}.{self.ext}", np.asarray(tokens).astype(self.dtype).tobytes())
        self._add_member(f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode())
        self._docs += 1
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        path = self._path()
        os.replace(path.with_suffix(".tar.tmp"), path)
        self.shards.append(
            {
                "file": path.name,
                "docs": self._docs,
                "tokens": self._tokens,
                "bytes": path.stat().st_size,
            }
        )
        self._tar, self._docs, self._tokens = None, 0, 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()  # leave only the .tmp behind; no manifest will list it


def write_shard(
    out_dir: Path, split: str, index: int, samples: list[tuple[str, np.ndarray, dict]], fmt: str
) -> dict:
    """Write exactly these (key, tokens, meta) samples as shard ``index`` of ``split`` (through a
    ``.tmp`` file); returns its manifest entry {"file", "docs", "tokens", "bytes"}."""
    if not samples:
        raise ValueError(f"shard {shard_name(split, index)} needs at least one sample")
    with ShardWriter(out_dir, split, 2**62, fmt, first_index=index) as writer:
        for key, tokens, meta in samples:
            writer.write(key, tokens, meta)
    return writer.shards[0]


def read_shard(
    path: str | os.PathLike, token_format: str, vocab_size: int | None = None
) -> Iterator[ShardSample]:
    """Samples of one shard, in file order, read with webdataset; damaged data (with
    `vocab_size`: a token id outside the vocabulary too) raises.

    Splitting by node/worker and shard shuffling are the loader's job (it needs them to be
    deterministic and resumable), so webdataset's own splitters are switched off here.
    """
    contents = load_shard(str(path), token_format, vocab_size)
    if contents.error is not None:
        raise ValueError(f"{path}: {contents.error}")
    if contents.bad_samples:
        key, reason = contents.bad_samples[0]
        raise ValueError(f"{path}: sample {key}: {reason}")
    yield from contents.samples


@dataclass
class ShardContents:
    """Everything readable in one shard, plus what was not."""

    samples: list[ShardSample]  # the good samples, in file order (empty documents included)
    bad_samples: list[tuple[str, str]]  # (key, reason) of samples that could not be decoded
    error: str | None  # why the tar could not be read to its end (None: it could)


def expand_shard_urls(pattern: str) -> list[str]:
    """webdataset's URL expansion: ``{000000..000009}`` brace ranges, ``::``-separated lists."""
    return list(wds.shardlists.expand_urls(pattern))


def decode_sample(sample: dict, token_format: str, vocab_size: int | None = None) -> ShardSample:
    """One webdataset sample dict -> ShardSample; ValueError says what is wrong with it. With
    `vocab_size`, a token id outside [0, vocab_size) is wrong too: flipped bytes in the token
    data pass the tar reader, and would otherwise index past the embedding."""
    ext = f"tokens.{token_format}"
    if ext not in sample:
        other = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no {ext} member (has {other})")
    raw = sample[ext]
    dtype = TOKEN_DTYPES[token_format]
    if len(raw) % dtype.itemsize:
        raise ValueError(f"{ext} holds {len(raw)} bytes, not a multiple of {dtype.itemsize}")
    tokens = np.frombuffer(raw, dtype=dtype)
    if "meta.json" not in sample:
        raise ValueError("no meta.json member")
    try:
        meta = json.loads(sample["meta.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"meta.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not a JSON object")
    if meta.get("n_tokens", len(tokens)) != len(tokens):
        raise ValueError(f"meta.json says {meta['n_tokens']} tokens, {ext} holds {len(tokens)}")
    if vocab_size is not None:
        outside = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
        if len(outside):
            raise ValueError(
                f"{len(outside)} token ids outside the vocabulary of {vocab_size} (the first, "
                f"{int(tokens[outside[0]])}, at position {int(outside[0])}): corrupt bytes"
            )
    return ShardSample(key=sample["__key__"], tokens=tokens, meta=meta)


def load_shard(url: str, token_format: str, vocab_size: int | None = None) -> ShardContents:
    """Read one whole shard (a path or any webdataset URL, e.g. ``pipe:cat x.tar``), never raising
    for damaged data: a truncated or corrupt tar ends the read and is reported in ``error``, an
    undecodable sample (with `vocab_size`: one holding an id outside the vocabulary) in
    ``bad_samples``."""
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False  # webdataset's handler protocol: False stops reading this source

    samples, bad = [], []
    raw_samples = wds.tariterators.tarfile_samples(iter([{"url": url}]), handler=stop)
    try:
        for raw in raw_samples:
            try:
                samples.append(decode_sample(raw, token_format, vocab_size))
            except ValueError as e:
                bad.append((str(raw.get("__key__")), str(e)))
    except Exception as e:  # noqa: BLE001 - any failure of the tar reader is a damaged shard
        errors.append(e)
    error = None
    if errors:
        first = errors[0]
        # webdataset appends the stream and URL to the exception's args: keep the message.
        text = first.args[0] if first.args and isinstance(first.args[0], str) else str(first)
        error = f"{type(first).__name__}: {text}"
    return ShardContents(samples=samples, bad_samples=bad, error=error)


if __name__ == "__main__":
    shard = Path(sys.argv[1])
    fmt = "i32" if any(".tokens.i32" in n for n in tarfile.open(shard).getnames()) else "u16"
    for i, s in enumerate(read_shard(shard, fmt)):
        print(s.key, s.meta, s.tokens[:16])
        if i >= 4:
            break
