"""Packing layouts and objectives: document-boundary packing, MLM masking, their resume.

Run:  pytest tests/unit/test_data_packing.py -q
"""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
import torch

from data.loader import DataArgs, build_train_stream, build_val_batches, read_manifest
from data.masking import IGNORE_INDEX, global_marks, mlm_batch
from data.packing import Packer, make_batch
from data.shards import read_shard
from data.tokenizer import Tokenizer

EOS, PAD = 2, 3


def _train_docs(root) -> set[tuple[int, ...]]:
    m = read_manifest(root)
    return {
        tuple(s.tokens.tolist())
        for shard in m["splits"]["train"]["shards"]
        for s in read_shard(root / shard["file"], m["token_format"])
    }


def test_boundary_packing_starts_every_document_a_sequence():
    seq_len = 8
    docs = [np.arange(10, 10 + n) for n in (5, 1, 17, 8, 3)]
    packer = Packer(seq_len, EOS, PAD, doc_start_at_boundary=True)
    for i, d in enumerate(docs):
        packer.add(d, doc_id=i)
    # ceil(n / L) sequences per document: 1 + 1 + 3 + 1 + 1
    assert packer.windows_ready() == 7
    windows, valid = packer.pop(4)
    assert packer.position() == (2, 16)  # the 17-token document's last sequence is next
    b = make_batch(windows, EOS, PAD, valid)
    tokens, mask = b["tokens"].numpy(), b["loss_mask"].numpy()
    assert tokens[0].tolist() == [10, 11, 12, 13, 14, EOS, PAD, PAD]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # labels 11..14, EOS scored; no padding
    assert b["labels"][0, :5].tolist() == [11, 12, 13, 14, EOS]
    assert tokens[1].tolist() == [10, EOS] + [PAD] * 6 and mask[1].sum() == 1
    # The long document fills consecutive sequences: 10..17, 18..25, 26 EOS.
    assert tokens[2].tolist() == list(range(10, 18)) and mask[2].sum() == 8
    assert tokens[3].tolist() == list(range(18, 26))
    assert b["doc_ids"][0].tolist() == [0] * 5 + [1] + [2, 2]  # EOS, then padding segments
    assert b["position_ids"][2].tolist() == list(range(8))
    windows, valid = packer.pop(3)
    b = make_batch(windows, EOS, PAD, valid)
    assert b["tokens"][0].tolist() == [26, EOS] + [PAD] * 6
    # An exactly L-token document: one sequence, its EOS is the last label.
    assert b["tokens"][1].tolist() == list(range(10, 18)) and b["labels"][1, -1] == EOS
    assert b["tokens"][2, :4].tolist() == [10, 11, 12, EOS]
    assert packer.windows_ready() == 0 and packer.position() is None


def test_boundary_stream_on_real_shards_and_resume(tiny_prepared_data):
    args = DataArgs(path=str(tiny_prepared_data), doc_start_at_boundary=True, shuffle_buffer=2)
    make = lambda: build_train_stream(args, 256, 4, seed=2)  # noqa: E731
    batches = list(islice(make(), 30))
    docs = _train_docs(tiny_prepared_data)
    current: list[int] = []
    n_docs = 0
    for b in batches:
        for row_tokens, row_labels, row_mask in zip(
            b["tokens"].numpy(), b["labels"].numpy(), b["loss_mask"].numpy(), strict=True
        ):
            if not current:  # a new document starts this sequence at position 0
                current = [int(row_tokens[0])]
            scored = row_labels[row_mask == 1].tolist()
            assert (row_mask[: len(scored)] == 1).all() and (row_mask[len(scored) :] == 0).all()
            current += scored
            if current[-1] == EOS:
                assert tuple(current[:-1]) in docs
                current, n_docs = [], n_docs + 1
            else:
                assert len(scored) == 256  # a document only continues from a full sequence
    assert n_docs >= 3
    # Resume mid-document (boundary offsets are multiples of seq_len) is exact.
    first = make()
    head = list(islice(first, 13))
    second = make()
    second.load_state_dict(first.state_dict())
    for got, want in zip(head + list(islice(second, 17)), batches, strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_mlm_masking_statistics():
    rng = np.random.default_rng(0)
    b, n, vocab, mask_id = 64, 1024, 1000, 5
    tokens = rng.integers(4, vocab, size=(b, n + 1))
    tokens[:, ::50] = EOS  # separators are never masked
    valid = np.ones_like(tokens, dtype=bool)
    valid[0, 700:] = False  # nor is padding
    tokens[0, 700:] = PAD
    batch = make_batch(tokens, EOS, PAD, valid)
    out = mlm_batch(batch, valid[:, :-1], mask_id, vocab, 0.15, np.random.default_rng(1))
    original, masked = batch["tokens"].numpy(), out["tokens"].numpy()
    labels, loss_mask = out["labels"].numpy(), out["loss_mask"].numpy()
    chosen = labels != IGNORE_INDEX
    maskable = valid[:, :-1] & (original >= 4)
    assert np.array_equal(loss_mask == 1, chosen)
    assert not (chosen & ~maskable).any()  # EOS / padding never chosen
    assert np.array_equal(labels[chosen], original[chosen])
    assert np.array_equal(masked[~chosen], original[~chosen])  # untouched elsewhere
    rate = chosen.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.01
    n_chosen = chosen.sum()
    to_mask = (masked == mask_id) & chosen
    kept = (masked == original) & chosen
    swapped = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum() / n_chosen - 0.8) < 0.02
    assert abs(kept.sum() / n_chosen - 0.1) < 0.015  # (+ the rare random draw of itself)
    assert abs(swapped.sum() / n_chosen - 0.1) < 0.015
    assert masked[swapped].min() >= 4 and masked[swapped].max() < vocab
    for key in ("doc_ids", "position_ids"):
        assert torch.equal(out[key], batch[key])


def test_mlm_stream_uses_the_mask_piece_and_resumes(tiny_mlm_data, tiny_prepared_data):
    args = DataArgs(path=str(tiny_mlm_data), objective="mlm", shuffle_buffer=3)
    tok = Tokenizer.load(tiny_mlm_data / "tokenizer.model")
    mask_id = tok.piece_to_id("<mask>")
    assert mask_id >= 4
    make = lambda: build_train_stream(args, 128, 4, seed=1)  # noqa: E731
    reference = list(islice(make(), 12))
    tokens = torch.cat([b["tokens"] for b in reference])
    labels = torch.cat([b["labels"] for b in reference])
    chosen = labels != IGNORE_INDEX
    assert 0.1 < chosen.float().mean() < 0.2
    assert (tokens[chosen] == mask_id).float().mean() > 0.6
    assert not (tokens[~chosen] == mask_id).any()
    first = make()
    head = list(islice(first, 5))
    second = make()
    second.load_state_dict(first.state_dict())
    for got, want in zip(head + list(islice(second, 7)), reference, strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)  # the draw resumes too
    val = build_val_batches(args, 128, 4, max_batches=2)
    assert (val[0]["labels"] != IGNORE_INDEX).any() and (val[0]["tokens"] == mask_id).any()
    with pytest.raises(ValueError, match="data.mask_token='<mask>'.*--user-symbols"):
        build_train_stream(replace(args, path=str(tiny_prepared_data)), 128, 4)


def test_global_marks_are_document_starts_and_a_piece_never_masked():
    windows = np.array([[5, 6, EOS, 7, 9, 8, EOS, 9, 10, PAD, PAD]])
    valid = np.array([[True] * 9 + [False] * 2])
    batch = make_batch(windows, EOS, PAD, valid)
    marked = global_marks(batch, valid[:, :-1], doc_starts=True, piece_id=9)
    # segments start at 0 and at each EOS separator (2, 6); token 9 sits at 4 and 7
    assert marked["global_mask"][0].nonzero().flatten().tolist() == [0, 2, 4, 6, 7]
    assert global_marks(batch, valid[:, :-1], doc_starts=False, piece_id=-1) is batch
    rng = np.random.default_rng(0)
    mlm = mlm_batch(marked, valid[:, :-1], mask_id=30, vocab_size=32, probability=0.99, rng=rng)
    chosen = mlm["loss_mask"][0].bool()
    assert chosen.any() and not (chosen & marked["global_mask"][0]).any()


def test_global_marks_in_the_stream_and_a_missing_piece(tiny_mlm_data):
    args = DataArgs(path=str(tiny_mlm_data), objective="mlm", global_doc_starts=True)
    batch = next(iter(build_train_stream(args, 128, 4, seed=1)))
    marks = batch["global_mask"]
    assert marks.dtype == torch.bool and marks.shape == batch["tokens"].shape
    assert torch.equal(marks, (batch["position_ids"] == 0) & (batch["loss_mask"] >= 0))
    val = build_val_batches(args, 128, 4, max_batches=1)
    assert torch.equal(val[0]["global_mask"], val[0]["position_ids"] == 0)
    with pytest.raises(ValueError, match="data.global_piece='<cls>'.*--user-symbols"):
        build_train_stream(replace(args, global_piece="<cls>"), 128, 4)


def test_etc_slots_lead_every_sequence(tiny_mlm_data):
    args = DataArgs(path=str(tiny_mlm_data), objective="mlm", global_doc_starts=True)
    batch = next(iter(build_train_stream(args, 128, 4, seed=1, etc_tokens=2)))
    assert batch["tokens"].shape == (4, 128)
    assert torch.equal(batch["tokens"][:, :2], torch.tensor([[-1, -2]] * 4))
    assert not batch["loss_mask"][:, :2].any() and (batch["labels"][:, :2] == IGNORE_INDEX).all()
    assert torch.equal(batch["position_ids"][:, :2], torch.tensor([[0, 1]] * 4))
    assert not batch["global_mask"][:, :2].any() and (batch["tokens"][:, 2:] >= 0).all()
    val = build_val_batches(args, 128, 4, max_batches=1, etc_tokens=2)
    assert val[0]["tokens"].shape[1] == 128 and (val[0]["tokens"][:, :2] < 0).all()
    with pytest.raises(ValueError, match="attention.etc_tokens=128"):
        build_train_stream(args, 128, 4, etc_tokens=128)


def test_packing_args_are_validated():
    with pytest.raises(ValueError, match="data.objective='bert'"):
        DataArgs(objective="bert")
    with pytest.raises(ValueError, match="data.mlm_probability=1.5"):
        DataArgs(mlm_probability=1.5)
    with pytest.raises(ValueError, match="data.doc_start_at_boundary=1"):
        DataArgs(doc_start_at_boundary=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data.mask_token=''"):
        DataArgs(mask_token="")
