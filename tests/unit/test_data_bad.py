"""Bad data in real tar files: truncated, corrupt and short shards, undecodable samples, empty
documents. Skipped with a warning and counted (data.bad_data=skip) or raised (fail); never a hang.

Run:  pytest tests/unit/test_data_bad.py -q
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from data.loader import DataArgs, build_train_stream, build_val_batches
from data.shards import read_shard
from data.stream import BadDataError

EOS, PAD = 2, 3
Sample = tuple[str, bytes, bytes]  # key, tokens.u16 bytes, meta.json bytes


def _doc(i: int) -> np.ndarray:
    return (np.arange(5 + i % 4) + 10 * i + 100).astype("<u2")


def _sample(i: int) -> Sample:
    tokens = _doc(i)
    meta = json.dumps({"source": f"doc{i}", "n_tokens": len(tokens)}).encode()
    return f"doc-{i:07d}", tokens.tobytes(), meta


def _tar_bytes(samples: list[Sample]) -> tuple[bytes, list[int]]:
    """The tar and the byte offset where each sample's first member starts."""
    buf, starts = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, tokens, meta in samples:
            starts.append(buf.tell())
            for name, data in ((f"{key}.tokens.u16", tokens), (f"{key}.meta.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), starts


def _write_prepared(root: Path, train: list[tuple[list[Sample], bytes]], val=None) -> None:
    """A prepared directory (manifest + given shard bytes); each shard lists len(samples) docs."""
    splits = {}
    for split, shards in (("train", train), ("val", val or [])):
        entries = []
        for i, (samples, data) in enumerate(shards):
            name = f"{split}-{i:06d}.tar"
            (root / name).write_bytes(data)
            entries.append({"file": name, "docs": len(samples), "tokens": 0, "bytes": len(data)})
        splits[split] = {"docs": 0, "tokens": 0, "shards": entries}
    manifest = {
        "version": 1,
        "tokenizer": {"file": "none", "sha256": "0" * 64, "vocab_size": 1000, "eos_id": EOS,
                      "pad_id": PAD},
        "token_format": "u16",
        "splits": splits,
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))


def _good(first: int, n: int = 3) -> tuple[list[Sample], bytes]:
    samples = [_sample(i) for i in range(first, first + n)]
    return samples, _tar_bytes(samples)[0]


@pytest.fixture
def damaged(tmp_path) -> tuple[Path, list[np.ndarray]]:
    """7 train shards: 3 damaged, 2 holding bad samples; returns the good docs in order."""
    truncated, _ = _good(3)
    data_t, starts_t = _tar_bytes(truncated)
    header_cut, _ = _good(15)
    data_h, starts_h = _tar_bytes(header_cut)
    short, _ = _good(9)
    data_s, starts = _tar_bytes(short)
    odd = ("doc-0000901", b"\x01\x02\x03", b'{"n_tokens": 1}')
    empty = ("doc-0000902", b"", b'{"n_tokens": 0}')
    bad_json = ("doc-0000903", _doc(903).tobytes(), b"{not json")
    mixed = [_sample(6), odd, empty, bad_json, _sample(7)]
    train = [
        _good(0),
        (truncated, data_t[: starts_t[1] + 512 + 3]),  # cut inside doc 4's tokens
        (_good(6)[0], b"\x00garbage" * 300),  # not a tar at all
        (mixed, _tar_bytes(mixed)[0]),
        (short, data_s[: starts[2]]),  # cut at a sample boundary: only the manifest can tell
        _good(12),
        (
            header_cut,
            data_h[: starts_h[2] + 1024 + 100],
        ),  # cut in doc 17's meta header: doc 17 is bad
    ]
    _write_prepared(tmp_path, train, val=[_good(20), (_good(23)[0], b"junk")])
    good = [_doc(i) for i in (0, 1, 2, 6, 7, 12, 13, 14, 15, 16)]
    return tmp_path, good


def _expected_stream(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.append(d.astype(np.int64), EOS) for d in docs])


def _flat(batches) -> np.ndarray:
    return np.concatenate([b["tokens"].reshape(-1).numpy() for b in batches])


def test_bad_data_is_skipped_logged_and_counted(damaged, caplog):
    root, good = damaged
    args = DataArgs(path=str(root), shuffle_shards=False, shuffle_buffer=0)
    expected = _expected_stream(good)
    n = (len(expected) - 1) // 4
    stream = build_train_stream(args, 4, 1)
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        got = _flat(islice(stream, n))
    assert np.array_equal(got, expected[: 4 * n])  # the good documents, nothing else
    assert stream.stats() == {"skipped_samples": 4, "skipped_shards": 3}
    for what in ("unexpected end of data", "train-000002.tar", "manifest lists 3",
                 "doc-0000901", "empty document", "not valid JSON", "no meta.json"):  # fmt: skip
        assert what in caplog.text, what
    # Resuming re-reads the current shards without counting their bad data twice.
    for k in (3, 9):
        first = build_train_stream(args, 4, 1)
        head = list(islice(first, k))
        second = build_train_stream(args, 4, 1)
        second.load_state_dict(first.state_dict())
        tail = list(islice(second, n - k))
        assert np.array_equal(_flat(head + tail), got)
        assert second.stats() == stream.stats()
    # The next epoch meets the bad data again and counts it again.
    list(islice(stream, n))
    assert stream.epoch == 1
    assert stream.stats() == {"skipped_samples": 8, "skipped_shards": 6}


def test_workers_report_bad_data_too(damaged):
    root, _ = damaged
    args = DataArgs(path=str(root), num_workers=2)
    stream = build_train_stream(args, 4, 1, seed=3)
    batches = iter(stream)
    while stream.epoch < 1:
        next(batches)
    stats = stream.stats()
    assert stats["skipped_shards"] >= 3 and stats["skipped_samples"] >= 3


def test_fail_policy_raises_naming_the_shard(damaged):
    root, _ = damaged
    args = DataArgs(path=str(root), shuffle_shards=False, bad_data="fail")
    with pytest.raises(BadDataError, match="train-000001.tar.*bad_data=skip"):
        list(islice(build_train_stream(args, 4, 1), 100))
    with pytest.raises(BadDataError, match="train-00000.*bad_data=skip"):  # through a worker
        list(islice(build_train_stream(replace(args, num_workers=2), 4, 1), 100))
    with pytest.raises(BadDataError, match="val-000001.tar"):
        build_val_batches(args, 4, 2, None)
    with pytest.raises(ValueError, match="data.bad_data='ignore'"):
        DataArgs(bad_data="ignore")


@pytest.mark.timeout(60)
def test_nothing_readable_raises_instead_of_hanging(tmp_path):
    junk = [([_sample(i)], b"junk" * 200) for i in range(4)]
    _write_prepared(tmp_path, junk)
    with pytest.raises(RuntimeError, match="no readable document"):
        next(iter(build_train_stream(DataArgs(path=str(tmp_path)), 4, 1)))
    with pytest.raises(RuntimeError, match="no readable document"):
        next(iter(build_train_stream(DataArgs(path=str(tmp_path), num_workers=2), 4, 1)))


def test_val_batches_skip_a_damaged_shard(damaged, caplog):
    root, _ = damaged
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        batches = build_val_batches(DataArgs(path=str(root)), 4, 2, None)
    mask = np.concatenate([b["loss_mask"].reshape(-1).numpy() for b in batches]).astype(bool)
    labels = np.concatenate([b["labels"].reshape(-1).numpy() for b in batches])
    expected = _expected_stream([_doc(i) for i in (20, 21, 22)])
    assert np.array_equal(labels[mask], expected[1:])
    assert "val-000001.tar" in caplog.text


def test_shard_pattern_that_cannot_exist_is_refused_naming_the_key(damaged):
    root, _ = damaged
    for pattern, says in (
        (f"{root}/gone/train-{{000000..000003}}.tar", f"directory {root}/gone, which does not"),
        (f"{root}/val-{{000007..000009}}.tar", "none of its 3 shards exists"),
    ):
        with pytest.raises(FileNotFoundError, match=r"^data\.train_shards=.*" + re.escape(says)):
            build_train_stream(DataArgs(path=str(root), train_shards=pattern), 4, 1)
    # Some shards there: the missing ones are bad data, skipped and counted by the stream.
    pattern = f"file:{root}/train-{{000005..000008}}.tar"
    args = DataArgs(path=str(root), train_shards=pattern, shuffle_shards=False)
    stream = build_train_stream(args, 4, 1)
    batches = iter(stream)
    while stream.epoch == 0:
        next(batches)
    assert stream.stats()["skipped_shards"] == 2  # train-000007.tar and train-000008.tar


def test_flipped_bytes_in_a_real_shard_never_reach_the_model(tiny_prepared_data, tmp_path, caplog):
    """16 bytes of one document's token data flipped in a prepared shard: the tar still reads,
    so only the vocabulary check can tell. That document is skipped, counted and named."""
    root = tmp_path / "data"
    shutil.copytree(tiny_prepared_data, root)
    manifest = json.loads((root / "manifest.json").read_text())
    tok, shard = manifest["tokenizer"], root / manifest["splits"]["train"]["shards"][0]["file"]
    good = list(read_shard(shard, "u16", tok["vocab_size"]))
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".tokens.u16")][2]
    assert member.name.startswith(good[2].key) and member.size >= 40
    data = bytearray(shard.read_bytes())
    for i in range(member.offset_data + 8, member.offset_data + 24):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))

    args = DataArgs(path=str(root), train_shards=str(shard), shuffle_shards=False, shuffle_buffer=0)
    stream = build_train_stream(args, 64, 2)
    expected = np.concatenate(
        [np.append(s.tokens.astype(np.int64), tok["eos_id"]) for s in good if s is not good[2]]
    )
    n = len(expected) // (64 * 2)
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        got = _flat(islice(stream, n))
    assert np.array_equal(got, expected[: len(got)])  # every other document, in order
    assert got.max() < tok["vocab_size"]
    assert stream.stats() == {"skipped_samples": 1, "skipped_shards": 0}
    assert f"{good[2].key} of {shard}: 8 token ids outside the vocabulary" in caplog.text
