"""One reader's batches: shards -> documents -> packed batches, with a small exact position.

A data-parallel rank reads with ``num_streams`` readers (one per DataLoader worker, or one in the
training process). Reader w of rank r owns, in epoch e, the shards
``permutation_e(all shards)[r::dp_size][w::num_streams]``; the loader interleaves its readers'
batches round-robin (data/loader.py). Each reader's state is a handful of integers:

  epoch, shard_pos, doc_index, offset   where the first token not yet handed out comes from:
                                        document ``doc_index`` (in the shard's shuffled order) of
                                        the reader's shard ``shard_pos`` of ``epoch``, token
                                        ``offset`` of that document's ``doc EOS`` stream;
  pending                               [epoch, shard, doc_index, offset, opened] work items
                                        done before the regular schedule above (given by a
                                        resume under another layout, data/reshard.py; the
                                        first item's doc_index/offset is then the position);
  batches, generation                   batches produced and re-layouts so far (they seed the
                                        MLM draw of the next batch);
  opened                                the last (epoch, shard_pos) opened, so a resume that
                                        re-reads shards does not count their bad samples twice;
  skipped_samples, skipped_shards       bad data met so far (each time it is met, so once per
                                        epoch).

Packing cuts windows at fixed strides from that first token (data/packing.py), and the within-
shard order is re-derived from seeds, so re-opening the shard and skipping ``doc_index``
documents reproduces the stream exactly; no token buffer or generator state is saved.

Bad data (``bad_data="skip"``): a shard whose tar cannot be read to its end (truncated, corrupt,
missing, or holding fewer samples than the manifest lists) is skipped whole; an undecodable
sample (one holding a token id outside the vocabulary included: flipped bytes in its token data)
and an empty document are skipped. Each is logged as a warning and counted. With
``bad_data="fail"`` the first one raises BadDataError. A reader whose whole epoch yields no
document raises instead of spinning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data.masking import global_marks, mlm_batch
from data.packing import Packer, make_batch, reserve_etc_slots
from data.shards import load_shard

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class BadDataError(ValueError):
    """A damaged shard or sample met with ``data.bad_data=fail``."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a reader needs; picklable, so DataLoader workers get it as it is."""

    urls: tuple[str, ...]  # every train shard, in manifest (or pattern) order
    expected_docs: tuple[int | None, ...]  # samples per shard from the manifest, None: unknown
    token_format: str
    seq_len: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    num_streams: int  # readers per rank
    seed: int  # run seed
    data_seed: int
    shuffle_shards: bool
    shuffle_buffer: int
    doc_start_at_boundary: bool
    bad_data: str  # "skip" or "fail"
    eos_id: int
    pad_id: int
    objective: str  # "clm" or "mlm"
    mlm_probability: float
    mask_id: int
    vocab_size: int
    global_doc_starts: bool = False
    global_piece_id: int = -1  # -1: no global piece
    etc_tokens: int = 0  # leading slots for the model's ETC tokens (data.packing)

    def rank_shards(self, epoch: int) -> list[int]:
        """Indices (into ``urls``) of this rank's shards in ``epoch``, in reading order."""
        order = shard_order(len(self.urls), self.shuffle_shards, self.data_seed, self.seed, epoch)
        return order[self.dp_rank :: self.dp_size]

    def reader_shards(self, epoch: int, reader: int) -> list[int]:
        return self.rank_shards(epoch)[reader :: self.num_streams]


def shard_order(n_shards: int, shuffle: bool, data_seed: int, seed: int, epoch: int) -> list[int]:
    """All shard indices in ``epoch``'s order; rank r, reader w of a layout read
    ``order[r::dp_size][w::num_readers]``."""
    order = np.arange(n_shards)
    if shuffle:
        order = np.random.default_rng([data_seed, seed, epoch]).permutation(order)
    return [int(i) for i in order]


def initial_state(reader: int) -> dict:
    return {
        "reader": reader,
        "pending": [],
        "epoch": 0,
        "shard_pos": 0,
        "doc_index": 0,
        "offset": 0,
        "batches": 0,
        "generation": 0,
        "opened": [-1, -1],
        "skipped_samples": 0,
        "skipped_shards": 0,
    }


# A document's place in a reader's schedule: ("p", k, doc) for pending item k, or
# ("n", epoch, shard_pos, doc) for the regular schedule.
Where = tuple


class ReaderStream:
    """Endless (batch, state after it) pairs of reader ``reader`` from ``state`` on."""

    def __init__(self, spec: StreamSpec, reader: int, state: dict | None = None) -> None:
        self.spec, self.reader = spec, reader
        self.state = dict(state if state is not None else initial_state(reader))
        if self.state["reader"] != reader:
            raise ValueError(f"state of reader {self.state['reader']} given to reader {reader}")
        # [epoch, shard, doc_index, offset, opened] work items done before the regular schedule
        self.pending = [list(item) for item in self.state.get("pending", [])]

    def _warn_or_fail(self, message: str) -> None:
        if self.spec.bad_data == "fail":
            raise BadDataError(f"{message} (set data.bad_data=skip to skip bad data)")
        logger.warning("skipping %s", message)

    def _open(self, epoch: int, shard: int, first_time: bool) -> list[np.ndarray]:
        """The documents of one shard, in this epoch's order (bad ones dropped, and counted the
        first time this reader opens it in this epoch)."""
        spec, st = self.spec, self.state
        url = spec.urls[shard]
        contents = load_shard(url, spec.token_format, spec.vocab_size)
        error = contents.error
        expected = spec.expected_docs[shard]
        n_read = len(contents.samples) + len(contents.bad_samples)
        if error is None and expected is not None and n_read != expected:
            error = f"holds {n_read} samples where the manifest lists {expected} (truncated?)"
        if error is not None:
            if first_time or spec.bad_data == "fail":
                st["skipped_shards"] += first_time
                self._warn_or_fail(f"shard {url}: {error}")
            return []
        docs = []
        for key, reason in contents.bad_samples:
            if first_time or spec.bad_data == "fail":
                st["skipped_samples"] += first_time
                self._warn_or_fail(f"sample {key} of {url}: {reason}")
        for sample in contents.samples:
            if len(sample.tokens) == 0:
                if first_time or spec.bad_data == "fail":
                    st["skipped_samples"] += first_time
                    self._warn_or_fail(f"sample {sample.key} of {url}: empty document")
                continue
            docs.append(sample.tokens)
        return self._shuffle(docs, epoch, shard)

    def _shuffle(self, docs: list[np.ndarray], epoch: int, shard: int) -> list[np.ndarray]:
        """Shuffled within consecutive blocks of ``shuffle_buffer`` documents, reproducibly."""
        spec = self.spec
        block = max(1, spec.shuffle_buffer)
        if block == 1:
            return docs
        out: list[np.ndarray] = []
        for b, start in enumerate(range(0, len(docs), block)):
            part = docs[start : start + block]
            seq = [spec.data_seed, spec.seed, epoch, shard, b]
            out += [part[i] for i in np.random.default_rng(seq).permutation(len(part))]
        return out

    def _docs(self, cursor: list) -> Iterator[tuple[Where, np.ndarray, int]]:
        """(where, document, tokens of it already handed out) from the state's position on;
        ``cursor`` is kept at the next document to read."""
        st = self.state
        for k, item in enumerate(self.pending):
            epoch, shard, first, offset, opened = item
            docs = self._open(epoch, shard, first_time=not opened)
            item[4] = 1
            for i in range(first, len(docs)):
                cursor[:] = ["p", k, i + 1]
                yield ("p", k, i), docs[i], offset if i == first else 0
        epoch, shard_pos, doc_index, offset = (st[k] for k in _REGULAR)
        cursor[:] = ["n", epoch, shard_pos, doc_index]
        while True:
            shards = self.spec.reader_shards(epoch, self.reader)
            full_pass, found = shard_pos == 0 and doc_index == 0, False
            while shard_pos < len(shards):
                first_time = [epoch, shard_pos] > st["opened"]
                if first_time:
                    st["opened"] = [epoch, shard_pos]
                docs = self._open(epoch, shards[shard_pos], first_time)
                for i in range(doc_index, len(docs)):
                    cursor[:] = ["n", epoch, shard_pos, i + 1]
                    found = True
                    yield ("n", epoch, shard_pos, i), docs[i], offset if i == doc_index else 0
                shard_pos, doc_index, offset = shard_pos + 1, 0, 0
                cursor[:] = ["n", epoch, shard_pos, 0]
            if full_pass and not found:
                urls = [self.spec.urls[i] for i in shards]
                raise RuntimeError(
                    f"reader {self.reader} of dp rank {self.spec.dp_rank} found no readable "
                    f"document in a whole epoch of its shards {urls}"
                )
            epoch, shard_pos, doc_index, offset = epoch + 1, 0, 0, 0
            cursor[:] = ["n", epoch, 0, 0]

    def _position_state(self, where: Where, offset: int) -> dict:
        """The state whose position is ``offset`` tokens into document ``where``."""
        st = dict(self.state, opened=list(self.state["opened"]))
        if where[0] == "p":
            _, k, doc = where
            first = self.pending[k]
            st["pending"] = [[first[0], first[1], doc, offset, first[4]]]
            st["pending"] += [list(item) for item in self.pending[k + 1 :]]
        else:
            st["pending"] = []
            st["epoch"], st["shard_pos"], st["doc_index"] = where[1:]
            st["offset"] = offset
        return st

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        spec, st = self.spec, self.state
        packer = Packer(
            spec.seq_len - spec.etc_tokens, spec.eos_id, spec.pad_id, spec.doc_start_at_boundary
        )
        cursor: list = []
        docs = self._docs(cursor)
        b = spec.micro_batch_size
        while True:
            while packer.windows_ready() < b:
                where, doc, start = next(docs)
                packer.add(doc, where, start)
            windows, valid = packer.pop(b)
            batch = make_batch(windows, spec.eos_id, spec.pad_id, valid)
            batch = global_marks(batch, valid[:, :-1], spec.global_doc_starts, spec.global_piece_id)
            if spec.objective == "mlm":
                seq = [spec.data_seed, spec.seed, spec.dp_rank, self.reader, st["batches"]]
                rng = np.random.default_rng(seq + [st["generation"]] * (st["generation"] > 0))
                p = spec.mlm_probability
                batch = mlm_batch(batch, valid[:, :-1], spec.mask_id, spec.vocab_size, p, rng)
            batch = reserve_etc_slots(batch, spec.etc_tokens)
            st["batches"] += 1
            position = packer.position()
            if position is None:  # nothing buffered: the next document to read is next
                position = (tuple(cursor), 0)
            yield batch, self._position_state(*position)


_REGULAR = ("epoch", "shard_pos", "doc_index", "offset")
