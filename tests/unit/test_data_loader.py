"""Packing and the streaming loader: order, dp and worker split, URLs, exact resume, val batches.

Run:  pytest tests/unit/test_data_loader.py -q
"""

from __future__ import annotations

import io
from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
import torch

from data.loader import DataArgs, build_train_stream, build_val_batches, read_manifest
from data.packing import Packer, make_batch
from data.shards import read_shard

EOS, PAD = 2, 3


def _split_docs(manifest_dir, split: str) -> list[np.ndarray]:
    m = read_manifest(manifest_dir)
    return [
        s.tokens.astype(np.int64)
        for shard in m["splits"][split]["shards"]
        for s in read_shard(manifest_dir / shard["file"], m["token_format"])
    ]


def _stream_of(docs) -> np.ndarray:
    return np.concatenate([np.append(d, EOS) for d in docs])


def _docs_of(stream: np.ndarray) -> list[tuple[int, ...]]:
    """Split a packed stream at EOS; the trailing partial document is dropped."""
    cuts = np.flatnonzero(stream == EOS)
    return [tuple(stream[a + 1 : b]) for a, b in zip(np.r_[-1, cuts[:-1]], cuts, strict=True)]


def _flat_tokens(batches) -> np.ndarray:
    return np.concatenate([b["tokens"].reshape(-1).numpy() for b in batches])


def test_packing_invariants_on_synthetic_docs():
    seq_len, batch = 8, 3
    docs = [np.arange(10, 10 + n) for n in (5, 1, 17, 3, 9)]
    packer = Packer(seq_len, EOS)
    for i, d in enumerate(docs):
        packer.add(d, doc_id=i)
    assert packer.windows_ready() == (sum(len(d) + 1 for d in docs) - 1) // seq_len
    windows, valid = packer.pop(batch)
    assert valid.all()
    b = make_batch(windows, EOS, PAD)
    assert set(b) == {"tokens", "labels", "loss_mask", "doc_ids", "position_ids"}
    for name, t in b.items():
        assert t.shape == (batch, seq_len), name
        assert t.dtype == (torch.float32 if name == "loss_mask" else torch.int64), name
    tokens, labels = b["tokens"].numpy(), b["labels"].numpy()
    stream = _stream_of(docs)
    assert np.array_equal(tokens.reshape(-1), stream[: batch * seq_len])
    assert np.array_equal(labels[:, :-1], tokens[:, 1:])  # next-token labels
    assert np.array_equal(labels[:-1, -1], tokens[1:, 0])  # windows overlap by one token
    assert b["loss_mask"].eq(1).all()
    # Row 0 = [10 11 12 13 14 EOS 10 EOS]: the EOS in front of a document starts its segment.
    assert tokens[0].tolist() == [10, 11, 12, 13, 14, EOS, 10, EOS]
    assert b["doc_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 2]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 0]
    # Row 1 continues the 17-token document: new sequence, positions restart.
    assert b["doc_ids"][1].tolist() == [0] * 8 and b["position_ids"][1].tolist() == list(range(8))
    # The next window starts with the overlap token: the 17-token document's token 16.
    assert packer.position() == (2, 16) and labels[-1, -1] == docs[2][16]


def test_padded_tail_masks_padding():
    packer = Packer(6, EOS, PAD)
    packer.add(np.array([7, 8, 9]))
    windows, valid = packer.pop_padded(2)
    b = make_batch(windows, EOS, PAD, valid=valid)
    assert b["tokens"][0].tolist() == [7, 8, 9, EOS, PAD, PAD]
    assert b["labels"][0].tolist() == [8, 9, EOS, PAD, PAD, PAD]
    assert b["loss_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert b["loss_mask"][1].sum() == 0
    assert b["doc_ids"][0].tolist() == [0, 0, 0, 1, 2, 2]  # padding is its own segment
    assert packer.pop_padded(2) is None


def test_one_epoch_holds_every_train_token_once_in_order(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data), shuffle_shards=False, shuffle_buffer=0)
    docs = _split_docs(tiny_prepared_data, "train")
    expected = _stream_of(docs)
    seq_len, batch = 128, 4
    n_batches = len(expected) // (seq_len * batch)
    stream = build_train_stream(args, seq_len, batch)
    got = _flat_tokens(islice(stream, n_batches))
    assert np.array_equal(got, expected[: len(got)])
    assert stream.epoch == 0
    # Running on into the next epoch, the stream starts over with the first document.
    more = _flat_tokens(islice(stream, 2 * len(docs)))
    assert stream.epoch >= 1
    rest = np.concatenate([got, more])
    assert np.array_equal(rest[len(expected) : len(expected) + 1000], expected[:1000])


def test_shuffled_epoch_is_a_permutation_of_the_train_docs(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data), shuffle_buffer=4, seed=3)
    docs = _split_docs(tiny_prepared_data, "train")
    total = sum(len(d) + 1 for d in docs)
    stream = build_train_stream(args, 256, 2, seed=1)
    got = _flat_tokens(islice(stream, total // 512 + 1))
    seen = _docs_of(got[: total + 1])
    assert sorted(seen) == sorted(tuple(d) for d in docs)
    assert seen != [tuple(d) for d in docs]  # and actually shuffled


def test_dp_ranks_read_disjoint_shards_covering_all(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data))
    all_shards = [s["file"] for s in read_manifest(tiny_prepared_data)["splits"]["train"]["shards"]]
    streams = [build_train_stream(args, 64, 2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for epoch in range(3):
        mine = [s.shards_for_epoch(epoch) for s in streams]
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == sorted(all_shards)
    assert streams[0].shards_for_epoch(0) != streams[0].shards_for_epoch(1)  # reshuffled
    # In epoch 0 each rank reads exactly the documents of its own shards.
    for r, stream in enumerate(streams):
        own = [
            tuple(s.tokens)
            for f in stream.shards_for_epoch(0)
            for s in read_shard(tiny_prepared_data / f, "u16")
        ]
        n_tokens = sum(len(d) + 1 for d in own)
        # One batch short of the epoch's tokens, so that epoch-0 documents are still pending
        # (with exactly n_tokens // 128 batches the epoch can end when 128 divides n_tokens).
        got = _flat_tokens(islice(stream, n_tokens // 128 - 1))
        assert stream.epoch == 0, r
        seen = _docs_of(got)
        assert len(seen) > 3 and set(seen) <= set(own), r


@pytest.mark.parametrize("k", [1, 7, 40])
def test_resume_continues_the_stream_exactly(tiny_prepared_data, k):
    args = DataArgs(path=str(tiny_prepared_data), shuffle_buffer=3)
    make = lambda: build_train_stream(args, 1000, 4, dp_rank=1, dp_size=2, seed=11)  # noqa: E731
    m = 60  # crosses shard boundaries; k=40 + m crosses an epoch of this rank (~80 batches)
    reference = list(islice(make(), k + m))
    first = make()
    head = list(islice(first, k))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # the state survives a checkpoint round trip
    buf.seek(0)
    second = make()
    second.load_state_dict(torch.load(buf, weights_only=True))
    tail = list(islice(second, m))
    for got, want in zip(head + tail, reference, strict=True):
        for key in want:
            assert torch.equal(got[key], want[key]), key
    if k == 40:
        assert second.epoch >= 1


def test_resume_refuses_a_different_layout(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data))
    stream = build_train_stream(args, 64, 2, dp_rank=0, dp_size=2)
    next(iter(stream))
    state = stream.state_dict()
    with pytest.raises(ValueError, match="dp_size was 2"):
        build_train_stream(args, 64, 2, dp_rank=0, dp_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        build_train_stream(args, 64, 2, dp_rank=0, dp_size=2, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        stream.load_state_dict({**state, "version": 99})


def test_bad_data_args_name_the_key(tiny_prepared_data, tmp_path):
    with pytest.raises(ValueError, match="data.shuffle_buffer=-1"):
        DataArgs(path="x", shuffle_buffer=-1)
    with pytest.raises(ValueError, match="data.num_workers='2'"):
        DataArgs(path="x", num_workers="2")
    with pytest.raises(ValueError, match="data.path=''"):
        DataArgs(path="")
    with pytest.raises(ValueError, match="dp_rank=2"):
        build_train_stream(DataArgs(path=str(tiny_prepared_data)), 64, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="fewer than dp_size=64"):
        build_train_stream(DataArgs(path=str(tiny_prepared_data)), 64, 2, dp_rank=0, dp_size=64)
    with pytest.raises(FileNotFoundError, match="data.prepare"):
        build_train_stream(DataArgs(path=str(tmp_path)), 64, 2)


def test_manifest_exposes_vocab_and_tokenizer_hash(tiny_prepared_data):
    stream = build_train_stream(DataArgs(path=str(tiny_prepared_data)), 32, 1)
    manifest = read_manifest(tiny_prepared_data)
    assert stream.vocab_size == manifest["tokenizer"]["vocab_size"] == 512
    assert stream.tokenizer_sha256 == manifest["tokenizer"]["sha256"]
    assert int(next(iter(stream))["tokens"].max()) < 512


def test_val_batches_are_deterministic_and_cover_the_val_split(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data))
    a = build_val_batches(args, 128, 4, max_batches=None)
    b = build_val_batches(args, 128, 4, max_batches=None)
    assert len(a) == len(b) > 1
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    expected = _stream_of(_split_docs(tiny_prepared_data, "val"))
    mask = np.concatenate([x["loss_mask"].reshape(-1).numpy() for x in a]).astype(bool)
    labels = np.concatenate([x["labels"].reshape(-1).numpy() for x in a])
    assert np.array_equal(labels[mask], expected[1:])  # every val token is scored exactly once
    assert a[-1]["loss_mask"].sum() < a[-1]["loss_mask"].numel()  # padded tail
    assert len(build_val_batches(args, 128, 4, max_batches=2)) == 2


def test_workers_interleave_and_resume_exactly(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data), num_workers=2, shuffle_buffer=3)
    make = lambda: build_train_stream(args, 64, 2, dp_rank=1, dp_size=2, seed=4)  # noqa: E731
    k, m = 5, 6
    reference = list(islice(make(), k + m))
    first = make()
    head = list(islice(first, k))
    state = first.state_dict()
    assert state["next_reader"] == k % 2 and [r["reader"] for r in state["readers"]] == [0, 1]
    second = make()
    second.load_state_dict(state)
    tail = list(islice(second, m))
    for got, want in zip(head + tail, reference, strict=True):
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # Two readers over disjoint shards: consecutive batches come from different documents.
    assert not torch.equal(reference[0]["tokens"], reference[1]["tokens"])
    with pytest.raises(ValueError, match="num_workers was 2"):
        build_train_stream(replace(args, num_workers=0), 64, 2, 1, 2, 4).load_state_dict(state)


def test_workers_split_the_rank_shards(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data), num_workers=3)
    stream = build_train_stream(args, 64, 2, dp_rank=0, dp_size=2, seed=8)
    for epoch in range(2):
        rank = stream.spec.rank_shards(epoch)
        readers = [stream.spec.reader_shards(epoch, w) for w in range(3)]
        assert sorted(sum(readers, [])) == sorted(rank)
        assert all(len(r) >= 1 for r in readers)
        assert all(not set(a) & set(b) for a in readers for b in readers if a is not b)


def test_pipe_urls_and_brace_patterns_read_the_same_stream(tiny_prepared_data):
    root = tiny_prepared_data
    n = len(read_manifest(root)["splits"]["train"]["shards"])
    braces = f"{root}/train-{{000000..{n - 1:06d}}}.tar"
    plain = DataArgs(path=str(root), shuffle_buffer=5)
    want = list(islice(build_train_stream(plain, 128, 2, dp_rank=1, dp_size=2, seed=2), 12))
    for pattern in (braces, f"pipe:cat {braces}"):
        args = replace(plain, train_shards=pattern)
        stream = build_train_stream(args, 128, 2, dp_rank=1, dp_size=2, seed=2)
        assert len(stream.shards) == n and stream.shards[0].endswith("train-000000.tar")
        got = list(islice(stream, 12))
        for x, y in zip(got, want, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in y)
    # A pattern naming fewer shards is a different stream (and a state of it will not resume).
    fewer = replace(plain, train_shards=f"{root}/train-{{000000..000007}}.tar")
    assert len(build_train_stream(fewer, 128, 2).shards) == 8


@pytest.mark.parametrize("boundary", [False, True])
def test_resume_may_change_seq_len_and_micro_batch(tiny_prepared_data, boundary):
    """The state is a token position, so the scored label sequence continues exactly."""
    args = DataArgs(path=str(tiny_prepared_data), shuffle_buffer=3, doc_start_at_boundary=boundary)

    def scored(batches) -> np.ndarray:
        return np.concatenate([b["labels"][b["loss_mask"] == 1].numpy() for b in batches])

    first = build_train_stream(args, 96, 2, seed=1)
    head = scored(islice(first, 5))
    second = build_train_stream(args, 64, 3, seed=1)
    second.load_state_dict(first.state_dict())
    tail = scored(islice(second, 8))
    want = scored(islice(build_train_stream(args, 80, 1, seed=1), 40))
    got = np.concatenate([head, tail])
    assert len(want) > len(got) and np.array_equal(got, want[: len(got)])


def test_http_urls_read_the_same_stream(tiny_prepared_data):
    """Shards served over HTTP (a local server on 127.0.0.1) give the same batches."""
    import functools
    import http.server
    import threading

    root = tiny_prepared_data
    n = len(read_manifest(root)["splits"]["train"]["shards"])

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a reader closing early is fine
            pass

    server = Quiet(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/train-{{000000..{n - 1:06d}}}.tar"
        plain = DataArgs(path=str(root), shuffle_buffer=5)
        want = list(islice(build_train_stream(plain, 128, 2, dp_rank=0, dp_size=2, seed=3), 8))
        stream = build_train_stream(
            replace(plain, train_shards=url), 128, 2, dp_rank=0, dp_size=2, seed=3
        )
        got = list(islice(stream, 8))
        for x, y in zip(got, want, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in y)
    finally:
        server.shutdown()
        server.server_close()
