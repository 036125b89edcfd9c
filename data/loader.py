"""Streaming, resumable training batches from a prepared directory (see data/prepare.py).

    stream = build_train_stream(DataArgs(path="artifacts/data/stdlib"), seq_len=1024,
                                micro_batch_size=4, dp_rank=rank, dp_size=world, seed=run_seed)
    for batch in stream: ...           # forever; dict of [B, L] tensors (see data/packing.py)
    state = stream.state_dict()        # exact in-process resume: load_state_dict(state)

Order of the stream, all of it deterministic from (DataArgs.seed, seed):
  - epoch e: all train shards are permuted with a generator seeded by (data seed, run seed, e);
    data-parallel rank r reads ``order[r::dp_size]`` (ranks agree on the order, so their shards
    are disjoint and together cover every shard once per epoch). Epochs count per rank; ranks
    may hold slightly different numbers of tokens, the stream simply continues.
  - within a shard, documents are shuffled in consecutive blocks of ``shuffle_buffer`` documents,
    each block with a generator seeded by (data seed, run seed, e, shard, block).
  - documents are packed with EOS separators into windows of seq_len + 1 tokens.
The state is (epoch, position in the rank's shard order, documents taken from that shard, the
packer's leftover tokens): resuming re-reads the shard, re-derives the same block order and skips
the documents already taken. Tensor/context/pipeline peers pass the same dp_rank and get the same
batches; nothing here reads torch.distributed.

Try it:  python -m data.loader DIR [SEQ_LEN]   (prints the shape and first tokens of a batch)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.packing import Packer, make_batch
from data.prepare import read_manifest
from data.shards import read_shard

__all__ = ["DataArgs", "TrainStream", "build_train_stream", "build_val_batches", "read_manifest"]

STATE_VERSION = 1


@dataclass
class DataArgs:
    """Where training data comes from and how it is ordered. seq_len is not here: it belongs to
    the model/attention config and is passed to build_train_stream."""

    path: str = "artifacts/data/stdlib"  # prepared directory (`python -m data.prepare --out PATH`)
    seed: int = 0  # data-order seed; combined with the run seed given to build_train_stream
    shuffle_shards: bool = True  # permute the shard order every epoch
    # Documents are shuffled within consecutive blocks of this many documents of a shard,
    # reproducibly (so resume is exact); 0 or 1 keeps file order.
    shuffle_buffer: int = 256
    # DataLoader worker processes for the train stream; 0 reads in the training process.
    # With workers > 0 the stream is not resumable yet (state_dict refuses).
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path={self.path!r} must name a prepared data directory")
        for key in ("seed", "shuffle_buffer", "num_workers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data.{key}={value!r} must be an integer >= 0")
        if not isinstance(self.shuffle_shards, bool):
            raise ValueError(f"data.shuffle_shards={self.shuffle_shards!r} must be true or false")


def _check_shape(seq_len: int, micro_batch_size: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")


class TrainStream:
    """Endless iterable of train batches for one data-parallel rank (see module docstring).

    Use one iterator at a time: iterating advances the stream's own state.
    """

    def __init__(
        self,
        args: DataArgs,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        worker: tuple[int, int] = (0, 1),
    ) -> None:
        _check_shape(seq_len, micro_batch_size)
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.args, self.seq_len, self.micro_batch_size = args, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.worker_id, self.num_workers = worker
        self.root = Path(args.path)
        self.manifest = read_manifest(self.root)
        tok = self.manifest["tokenizer"]
        self.vocab_size, self.tokenizer_sha256 = tok["vocab_size"], tok["sha256"]
        self.eos_id, self.pad_id = tok["eos_id"], tok["pad_id"]
        self.token_format = self.manifest["token_format"]
        self.shards = [s["file"] for s in self.manifest["splits"]["train"]["shards"]]
        per_rank = len(self.shards) // dp_size
        if per_rank < max(1, args.num_workers):
            raise ValueError(
                f"{self.root} has {len(self.shards)} train shards: fewer than dp_size={dp_size} "
                f"x max(1, data.num_workers={args.num_workers}); re-prepare with a smaller "
                "--shard-tokens or lower data.num_workers"
            )
        self.epoch, self.shard_pos, self.docs_in_shard = 0, 0, 0
        self.packer = Packer(seq_len, self.eos_id)

    def shards_for_epoch(self, epoch: int) -> list[str]:
        """This rank's (and worker's) shard files for ``epoch``, in reading order."""
        order = np.arange(len(self.shards))
        if self.args.shuffle_shards:
            order = np.random.default_rng([self.args.seed, self.seed, epoch]).permutation(order)
        mine = order[self.dp_rank :: self.dp_size][self.worker_id :: self.num_workers]
        return [self.shards[i] for i in mine]

    def _shard_docs(self, epoch: int, shard: str) -> Iterator[np.ndarray]:
        block_size = max(1, self.args.shuffle_buffer)
        shard_index = self.shards.index(shard)
        block: list[np.ndarray] = []
        n_blocks = 0

        def flush() -> list[np.ndarray]:
            if block_size == 1:
                return block
            seq = [self.args.seed, self.seed, epoch, shard_index, n_blocks]
            perm = np.random.default_rng(seq).permutation(len(block))
            return [block[i] for i in perm]

        for sample in read_shard(self.root / shard, self.token_format):
            block.append(sample.tokens)
            if len(block) == block_size:
                yield from flush()
                block, n_blocks = [], n_blocks + 1
        if block:
            yield from flush()

    def _docs(self) -> Iterator[np.ndarray]:
        """Documents from the current position on; advances the counters as it hands them out."""
        while True:
            shards = self.shards_for_epoch(self.epoch)
            while self.shard_pos < len(shards):
                docs = self._shard_docs(self.epoch, shards[self.shard_pos])
                for i, doc in enumerate(docs):
                    if i >= self.docs_in_shard:
                        self.docs_in_shard += 1
                        yield doc
                self.shard_pos, self.docs_in_shard = self.shard_pos + 1, 0
            self.epoch, self.shard_pos = self.epoch + 1, 0

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        docs = self._docs()
        while True:
            while self.packer.windows_ready() < self.micro_batch_size:
                self.packer.add(next(docs))
            windows = self.packer.pop(self.micro_batch_size)
            yield make_batch(windows, self.eos_id, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.args.num_workers == 0:
            return self._batches()
        loader = torch.utils.data.DataLoader(
            _WorkerStreams(self), batch_size=None, num_workers=self.args.num_workers
        )
        return iter(loader)

    def _order_key(self) -> dict:
        # Everything that fixes which document comes when; a resume must match all of it.
        return {
            "tokenizer_sha256": self.tokenizer_sha256,
            "shards": len(self.shards),
            "data_seed": self.args.seed,
            "seed": self.seed,
            "shuffle_shards": self.args.shuffle_shards,
            "shuffle_buffer": max(1, self.args.shuffle_buffer),
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
        }

    def state_dict(self) -> dict:
        if self.args.num_workers:
            raise ValueError(
                f"data.num_workers={self.args.num_workers}: the train stream is only resumable "
                "with data.num_workers=0 for now (per-worker state is not collected)"
            )
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "docs_in_shard": self.docs_in_shard,
            "packer": self.packer.state_dict(),
            "order": self._order_key(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        if self.args.num_workers:
            raise ValueError(
                f"data.num_workers={self.args.num_workers}: resuming the train stream needs "
                "data.num_workers=0 for now"
            )
        mine = self._order_key()
        for key, value in state["order"].items():
            if mine.get(key) != value:
                raise ValueError(
                    f"cannot resume the data stream: {key} was {value!r} when saved and is "
                    f"{mine.get(key)!r} now (changing dp_size needs loader-state resharding)"
                )
        self.epoch, self.shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self.docs_in_shard = int(state["docs_in_shard"])
        self.packer.load_state_dict(state["packer"])


class _WorkerStreams(torch.utils.data.IterableDataset):
    """Runs one TrainStream per DataLoader worker, each over its share of the rank's shards."""

    def __init__(self, parent: TrainStream) -> None:
        self.parent = parent

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        p = self.parent
        args = DataArgs(**{**p.args.__dict__, "num_workers": 0})
        sub = TrainStream(args, p.seq_len, p.micro_batch_size, p.dp_rank, p.dp_size, p.seed, worker)
        return sub._batches()


def build_train_stream(
    args: DataArgs,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
) -> TrainStream:
    """The endless train batch stream of data-parallel rank ``dp_rank`` of ``dp_size``."""
    return TrainStream(args, seq_len, micro_batch_size, dp_rank, dp_size, seed)


def build_val_batches(
    args: DataArgs, seq_len: int, micro_batch_size: int, max_batches: int | None
) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_batches`` validation batches (None: all), the same on every rank and call.

    Val documents are packed in file order; the final partial batch is padded (loss_mask 0).
    """
    _check_shape(seq_len, micro_batch_size)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be >= 1 or None")
    root = Path(args.path)
    manifest = read_manifest(root)
    tok = manifest["tokenizer"]
    shards = [s["file"] for s in manifest["splits"]["val"]["shards"]]
    if not shards:
        raise ValueError(
            f"{root} has no validation documents: re-prepare with a larger --val-per-mille"
        )
    packer = Packer(seq_len, tok["eos_id"])
    batches: list[dict[str, torch.Tensor]] = []

    def full() -> bool:
        return max_batches is not None and len(batches) >= max_batches

    for shard in shards:
        for sample in read_shard(root / shard, manifest["token_format"]):
            packer.add(sample.tokens)
            while packer.windows_ready() >= micro_batch_size and not full():
                batches.append(
                    make_batch(packer.pop(micro_batch_size), tok["eos_id"], tok["pad_id"])
                )
            if full():
                return batches
    tail = packer.pop_padded(micro_batch_size, tok["pad_id"])
    if tail is not None:
        batches.append(make_batch(tail[0], tok["eos_id"], tok["pad_id"], valid=tail[1]))
    return batches


if __name__ == "__main__":
    seq_len = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    stream = build_train_stream(DataArgs(path=sys.argv[1]), seq_len, micro_batch_size=2)
    batch = next(iter(stream))
    for name, t in batch.items():
        print(name, tuple(t.shape), t.dtype, t[0, :12].tolist())
