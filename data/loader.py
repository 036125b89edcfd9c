"""Streaming, resumable training batches from a prepared directory (see data/prepare.py).

    stream = build_train_stream(DataArgs(path="artifacts/data/stdlib"), seq_len=1024,
                                micro_batch_size=4, dp_rank=rank, dp_size=world, seed=run_seed)
    for batch in stream: ...           # forever; dict of [B, L] tensors (see data/packing.py)
    state = stream.state_dict()        # exact resume: a new stream's load_state_dict(state)

Order of the stream, all of it deterministic from (DataArgs.seed, seed):
  - epoch e: all train shards are permuted with a generator seeded by (data seed, run seed, e);
    data-parallel rank r reads ``order[r::dp_size]`` (ranks agree on the order, so their shards
    are disjoint and together cover every shard once per epoch), and with W = max(1,
    num_workers) readers, reader w reads ``order[r::dp_size][w::W]``. Epochs count per reader.
  - within a shard, documents are shuffled in consecutive blocks of ``shuffle_buffer`` documents,
    each block with a generator seeded by (data seed, run seed, e, shard, block).
  - each reader packs its documents (data/packing.py); the stream takes one batch from each
    reader in turn, 0, 1, ..., W-1, 0, ... (each DataLoader worker runs one reader).
The state is each reader's position (data/stream.py: a few integers, no token buffer) plus the
reader due next; resuming re-reads the shards and skips what was handed out, so the stream after
a resume (in any process) is the uninterrupted one. A rank's state resumes under the same
dp_size and num_workers; the merge of all ranks' states resumes under any (data/reshard.py);
seq_len and micro_batch_size may change either way. Tensor/context/pipeline peers pass the same
dp_rank and get the same batches; nothing here reads torch.distributed. ``stream.stats()``
counts the bad data skipped (see data/stream.py).

Try it:  python -m data.loader DIR [SEQ_LEN]   (prints the shape and first tokens of a batch)
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.masking import global_marks, mlm_batch
from data.packing import Packer, make_batch, reserve_etc_slots
from data.prepare import read_manifest
from data.reshard import MERGED_KIND, merge_rank_states, reader_states_from_merged
from data.shards import expand_shard_urls, load_shard
from data.stream import BadDataError, Batch, ReaderStream, StreamSpec, initial_state
from data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "DataArgs",
    "TrainStream",
    "build_train_stream",
    "build_val_batches",
    "check_train_shards",
    "merge_rank_states",
    "read_manifest",
]

STATE_VERSION = 2
OBJECTIVES = ("clm", "mlm")
BAD_DATA_POLICIES = ("skip", "fail")


@dataclass
class DataArgs:
    """Where training data comes from and how it is ordered. seq_len is not here: it belongs to
    the model/attention config and is passed to build_train_stream."""

    path: str = "artifacts/data/stdlib"  # prepared directory (`python -m data.prepare --out PATH`)
    # Train shards as a webdataset URL pattern instead of the manifest's list, e.g.
    # "pipe:cat /data/train-{000000..000099}.tar" or "/mnt/x/train-{000000..000009}.tar";
    # "" reads the shards the manifest lists. The tokenizer always comes from `path`.
    train_shards: str = ""
    seed: int = 0  # data-order seed; combined with the run seed given to build_train_stream
    shuffle_shards: bool = True  # permute the shard order every epoch
    # Documents are shuffled within consecutive blocks of this many documents of a shard,
    # reproducibly (so resume is exact); 0 or 1 keeps file order.
    shuffle_buffer: int = 256
    # DataLoader worker processes for the train stream; 0 reads in the training process. Each
    # worker reads its own share of the rank's shards. Resumable either way; a rank's state
    # resumes under the same num_workers and dp_size (else merge all ranks' states first).
    num_workers: int = 0
    # Start every document at the beginning of a sequence (the rest of its last sequence is
    # padding, loss_mask 0) instead of concatenating documents across sequence boundaries.
    doc_start_at_boundary: bool = False
    objective: str = "clm"  # "clm": next-token labels; "mlm": BERT-style masked tokens
    mlm_probability: float = 0.15  # mlm: fraction of ordinary tokens chosen for prediction
    mask_token: str = "<mask>"  # mlm: tokenizer piece used as mask (prepare --user-symbols)
    # Per-sample global tokens of the attention (a `global_mask` in every batch): the first
    # token of every packed document, and/or every occurrence of the tokenizer piece
    # `global_piece` (a CLS or question marker; "" for none; prepare --user-symbols).
    global_doc_starts: bool = False
    global_piece: str = ""
    # Damaged shards, undecodable samples and empty documents: "skip" (logged and counted in
    # stream.stats()) or "fail" (raise at the first one).
    bad_data: str = "skip"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path={self.path!r} must name a prepared data directory")
        if not isinstance(self.train_shards, str):
            raise ValueError(f"data.train_shards={self.train_shards!r} must be a string")
        for key in ("seed", "shuffle_buffer", "num_workers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data.{key}={value!r} must be an integer >= 0")
        for key in ("shuffle_shards", "doc_start_at_boundary", "global_doc_starts"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"data.{key}={getattr(self, key)!r} must be true or false")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"data.objective={self.objective!r} must be one of {OBJECTIVES}")
        p = self.mlm_probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            raise ValueError(f"data.mlm_probability={p!r} must be a number in (0, 1)")
        if not isinstance(self.mask_token, str) or not self.mask_token:
            raise ValueError(f"data.mask_token={self.mask_token!r} must be a tokenizer piece")
        if not isinstance(self.global_piece, str):
            raise ValueError(f"data.global_piece={self.global_piece!r} must be a tokenizer piece")
        if self.bad_data not in BAD_DATA_POLICIES:
            raise ValueError(f"data.bad_data={self.bad_data!r} must be one of {BAD_DATA_POLICIES}")


def _check_shape(seq_len: int, micro_batch_size: int, etc_tokens: int = 0) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if not 0 <= etc_tokens < seq_len:
        raise ValueError(f"attention.etc_tokens={etc_tokens} must be in [0, seq_len={seq_len})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")


def check_train_shards(args: DataArgs) -> None:
    """FileNotFoundError naming data.train_shards when its local shards cannot exist: their
    directory is missing, or not one of them is there (a few missing ones are bad data, skipped
    and counted by the stream). Remote URLs and pipes are not checked."""
    if not args.train_shards:
        return
    urls = expand_shard_urls(args.train_shards)
    paths = [u.removeprefix("file:") for u in urls]
    local = [Path(p) for p in paths if "://" not in p and not p.startswith("pipe:")]
    for path in local:
        if not path.parent.is_dir():
            raise FileNotFoundError(
                f"data.train_shards={args.train_shards!r} names the directory {path.parent}, "
                "which does not exist"
            )
    if local and len(local) == len(urls) and not any(path.is_file() for path in local):
        raise FileNotFoundError(
            f"data.train_shards={args.train_shards!r}: none of its {len(urls)} shards exists "
            f"(the first would be {local[0]})"
        )


def _piece_id(root: Path, manifest: dict, piece: str) -> int | None:
    """The id of tokenizer piece ``piece`` in the prepared directory, None when it has none."""
    tok = Tokenizer.load(root / manifest["tokenizer"]["file"])
    token_id = tok.piece_to_id(piece)
    if token_id == tok.unk_id and piece != tok.id_to_piece(tok.unk_id):
        return None
    return token_id


def mask_token_id(args: DataArgs, root: Path, manifest: dict) -> int:
    """The id of ``args.mask_token`` in the prepared tokenizer (mlm only); -1 for clm."""
    if args.objective != "mlm":
        return -1
    token_id = _piece_id(root, manifest, args.mask_token)
    if token_id is None:
        raise ValueError(
            f"data.objective=mlm needs data.mask_token={args.mask_token!r} in the tokenizer, "
            f"and {root} has no such piece: re-prepare with --user-symbols '{args.mask_token}'"
        )
    return token_id


def global_piece_id(args: DataArgs, root: Path, manifest: dict) -> int:
    """The id of ``args.global_piece`` in the prepared tokenizer; -1 when none is set."""
    if not args.global_piece:
        return -1
    token_id = _piece_id(root, manifest, args.global_piece)
    if token_id is None:
        raise ValueError(
            f"data.global_piece={args.global_piece!r} is not a piece of the tokenizer in "
            f"{root}: re-prepare with --user-symbols '{args.global_piece}'"
        )
    return token_id


class TrainStream:
    """Endless iterable of train batches for one data-parallel rank (see module docstring).

    Use one iterator at a time: iterating advances the stream's own state, which always
    describes the batches handed out so far (batches prefetched by workers do not count).
    """

    def __init__(
        self,
        args: DataArgs,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        etc_tokens: int = 0,
    ) -> None:
        _check_shape(seq_len, micro_batch_size, etc_tokens)
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.args, self.seq_len, self.micro_batch_size = args, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.root = Path(args.path)
        self.manifest = read_manifest(self.root)
        tok = self.manifest["tokenizer"]
        self.vocab_size, self.tokenizer_sha256 = tok["vocab_size"], tok["sha256"]
        self.eos_id, self.pad_id = tok["eos_id"], tok["pad_id"]
        self.token_format = self.manifest["token_format"]
        listed = self.manifest["splits"]["train"]["shards"]
        if args.train_shards:
            check_train_shards(args)
            urls = expand_shard_urls(args.train_shards)
            by_name = {s["file"]: s["docs"] for s in listed}
            expected = [by_name.get(u.rsplit("/", 1)[-1]) for u in urls]
            self.shards = urls
        else:
            urls = [str(self.root / s["file"]) for s in listed]
            expected = [s["docs"] for s in listed]
            self.shards = [s["file"] for s in listed]
        self.num_streams = max(1, args.num_workers)
        per_rank = len(urls) // dp_size
        if per_rank < self.num_streams:
            raise ValueError(
                f"{self.root} has {len(urls)} train shards: fewer than dp_size={dp_size} "
                f"x max(1, data.num_workers={args.num_workers}); re-prepare with a smaller "
                "--shard-tokens or lower data.num_workers"
            )
        self.spec = StreamSpec(
            urls=tuple(urls),
            expected_docs=tuple(expected),
            token_format=self.token_format,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            num_streams=self.num_streams,
            seed=seed,
            data_seed=args.seed,
            shuffle_shards=args.shuffle_shards,
            shuffle_buffer=max(1, args.shuffle_buffer),
            doc_start_at_boundary=args.doc_start_at_boundary,
            bad_data=args.bad_data,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            objective=args.objective,
            mlm_probability=float(args.mlm_probability),
            mask_id=mask_token_id(args, self.root, self.manifest),
            vocab_size=self.vocab_size,
            global_doc_starts=args.global_doc_starts,
            global_piece_id=global_piece_id(args, self.root, self.manifest),
            etc_tokens=etc_tokens,
        )
        self.reader_states = [initial_state(w) for w in range(self.num_streams)]
        self.next_reader = 0

    @property
    def epoch(self) -> int:
        """The epoch of the earliest reader (where the stream is, as far as the model saw)."""
        return min(s["pending"][0][0] if s["pending"] else s["epoch"] for s in self.reader_states)

    def shards_for_epoch(self, epoch: int) -> list[str]:
        """This rank's shard files (or URLs) for ``epoch``, in reading order."""
        return [self.shards[i] for i in self.spec.rank_shards(epoch)]

    def stats(self) -> dict[str, int]:
        """Bad data met so far by the batches handed out: {"skipped_samples", "skipped_shards"}."""
        keys = ("skipped_samples", "skipped_shards")
        return {k: sum(s[k] for s in self.reader_states) for k in keys}

    def __iter__(self) -> Iterator[Batch]:
        if self.args.num_workers == 0:
            return self._iter_in_process()
        return self._iter_workers()

    def _iter_in_process(self) -> Iterator[Batch]:
        for batch, state in ReaderStream(self.spec, 0, self.reader_states[0]):
            self.reader_states[0] = state
            yield batch

    def _iter_workers(self) -> Iterator[Batch]:
        # DataLoader asks its workers round-robin and returns their outputs in that order, so
        # the j-th batch comes from worker j % n. Worker p runs reader (first + p) % n, which
        # makes the reader sequence first, first + 1, ... whatever reader was due next.
        n, first = self.num_streams, self.next_reader
        dataset = _ReaderDataset(self.spec, list(self.reader_states), first)
        # Fork where the platform has it: a process that was itself spawned (torch.multiprocessing
        # ranks) would otherwise spawn its workers too, re-importing everything in each.
        context = "fork" if "fork" in mp.get_all_start_methods() else None
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=n, multiprocessing_context=context
        )
        for j, (batch, state) in enumerate(loader):
            reader = (first + j) % n
            if state["reader"] != reader:
                raise RuntimeError(
                    f"data loader worker order broke: expected reader {reader}, "
                    f"got {state['reader']}"
                )
            self.reader_states[reader] = state
            self.next_reader = (reader + 1) % n
            yield batch

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
            "num_workers": self.args.num_workers,
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "order": self._order_key(),
            "next_reader": self.next_reader,
            "readers": [dict(s) for s in self.reader_states],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from this rank's own state (same layout), or from the merge of all ranks'
        states (data/reshard.py: any dp_size and num_workers)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        mine = self._order_key()
        for key, value in state["order"].items():
            if mine.get(key) != value:
                raise ValueError(
                    f"cannot resume the data stream: {key} was {value!r} when saved and is "
                    f"{mine.get(key)!r} now (a rank's state resumes only under the same "
                    "dp_size and data.num_workers; to change those, load the merge of all "
                    "ranks' states, data.reshard.merge_rank_states)"
                )
        if state.get("kind") == MERGED_KIND:
            self.reader_states = reader_states_from_merged(
                state, self.dp_rank, self.dp_size, self.num_streams
            )
            self.next_reader = 0
            return
        readers = state["readers"]
        if len(readers) != self.num_streams:
            raise ValueError(
                f"data loader state holds {len(readers)} readers, this stream {self.num_streams}"
            )
        self.reader_states = [dict(s) for s in readers]
        self.next_reader = int(state["next_reader"])


class _ReaderDataset(torch.utils.data.IterableDataset):
    """In DataLoader worker p: reader (first + p) % n, from its saved state."""

    def __init__(self, spec: StreamSpec, states: list[dict], first: int) -> None:
        self.spec, self.states, self.first = spec, states, first

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.spec.num_streams:
            raise RuntimeError(f"{n} DataLoader workers for {self.spec.num_streams} readers")
        reader = (self.first + worker) % n
        return iter(ReaderStream(self.spec, reader, self.states[reader]))


def build_train_stream(
    args: DataArgs,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    etc_tokens: int = 0,
) -> TrainStream:
    """The endless train batch stream of data-parallel rank ``dp_rank`` of ``dp_size``;
    ``etc_tokens`` leading slots of every sequence are kept for the model's ETC tokens."""
    return TrainStream(args, seq_len, micro_batch_size, dp_rank, dp_size, seed, etc_tokens)


def build_val_batches(
    args: DataArgs,
    seq_len: int,
    micro_batch_size: int,
    max_batches: int | None,
    etc_tokens: int = 0,
) -> list[Batch]:
    """Up to ``max_batches`` validation batches (None: all), the same on every rank and call.

    Val documents are packed in file order (with the train stream's packing layout and
    objective; the MLM draw is seeded by the batch index); the final partial batch is padded
    (loss_mask 0). Bad data follows ``args.bad_data``; ``etc_tokens`` as for the train stream.
    """
    _check_shape(seq_len, micro_batch_size, etc_tokens)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be >= 1 or None")
    root = Path(args.path)
    manifest = read_manifest(root)
    tok = manifest["tokenizer"]
    shards = manifest["splits"]["val"]["shards"]
    if not shards:
        raise ValueError(
            f"{root} has no validation documents: re-prepare with a larger --val-per-mille"
        )
    eos, pad = tok["eos_id"], tok["pad_id"]
    mask_id = mask_token_id(args, root, manifest)
    piece_id = global_piece_id(args, root, manifest)
    packer = Packer(seq_len - etc_tokens, eos, pad, args.doc_start_at_boundary)
    batches: list[Batch] = []

    def add(windows: np.ndarray, valid: np.ndarray) -> None:
        batch = make_batch(windows, eos, pad, valid)
        batch = global_marks(batch, valid[:, :-1], args.global_doc_starts, piece_id)
        if args.objective == "mlm":
            rng = np.random.default_rng([args.seed, len(batches), 1])
            p = args.mlm_probability
            batch = mlm_batch(batch, valid[:, :-1], mask_id, tok["vocab_size"], p, rng)
        batches.append(reserve_etc_slots(batch, etc_tokens))

    def full() -> bool:
        return max_batches is not None and len(batches) >= max_batches

    for shard in shards:
        url = str(root / shard["file"])
        contents = load_shard(url, manifest["token_format"], tok["vocab_size"])
        problems = [f"sample {k}: {why}" for k, why in contents.bad_samples]
        n_read = len(contents.samples) + len(contents.bad_samples)
        error = contents.error
        if error is None and n_read != shard["docs"]:
            error = f"holds {n_read} samples where the manifest lists {shard['docs']}"
        if error is not None:
            problems = [error]
        if problems and args.bad_data == "fail":
            raise BadDataError(f"val shard {url}: {problems[0]} (set data.bad_data=skip)")
        for problem in problems:
            logger.warning("skipping in val shard %s: %s", url, problem)
        if error is not None:
            continue
        for sample in contents.samples:
            if len(sample.tokens) == 0:
                continue
            packer.add(sample.tokens)
            while packer.windows_ready() >= micro_batch_size and not full():
                add(*packer.pop(micro_batch_size))
            if full():
                return batches
    tail = packer.pop_padded(micro_batch_size)
    while tail is not None and not full():
        add(*tail)
        tail = packer.pop_padded(micro_batch_size)
    return batches


if __name__ == "__main__":
    seq_len = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    stream = build_train_stream(DataArgs(path=sys.argv[1]), seq_len, micro_batch_size=2)
    batch = next(iter(stream))
    for name, t in batch.items():
        print(name, tuple(t.shape), t.dtype, t[0, :12].tolist())
