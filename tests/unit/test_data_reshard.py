"""Resuming with another dp size / number of workers from the merged states of all ranks:
every document of the interrupted epoch is handed out exactly once, none repeated or skipped.

Documents are synthetic with globally unique token ids, so "exactly once" is checked per token.

Run:  pytest tests/unit/test_data_reshard.py -q
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from data.loader import DataArgs, build_train_stream, merge_rank_states
from tests.unit.test_data_bad import EOS, _doc, _good, _write_prepared

N_SHARDS, DOCS_PER_SHARD, SEQ_LEN = 8, 6, 8


@pytest.fixture
def unique_tokens(tmp_path):
    _write_prepared(tmp_path, [_good(DOCS_PER_SHARD * i, DOCS_PER_SHARD) for i in range(N_SHARDS)])
    return tmp_path


def _shard_docs(shard: int) -> list[np.ndarray]:
    return [_doc(DOCS_PER_SHARD * shard + j) for j in range(DOCS_PER_SHARD)]


def _regular_tokens_handed_out(spec, reader: int, state: dict) -> int:
    """Tokens of the regular schedule a reader handed out (its position after the pending work)."""
    shards = spec.reader_shards(state["epoch"], reader)
    done = sum(len(d) + 1 for s in shards[: state["shard_pos"]] for d in _shard_docs(s))
    if state["shard_pos"] < len(shards):
        current = _shard_docs(shards[state["shard_pos"]])
        done += sum(len(d) + 1 for d in current[: state["doc_index"]])
    return done + state["offset"]


@pytest.mark.parametrize(("old", "new"), [((2, 2), (3, 0)), ((2, 0), (1, 2))])
def test_merged_states_resume_under_another_layout(unique_tokens, old, new):
    args = DataArgs(path=str(unique_tokens), shuffle_buffer=0, seed=5)
    (old_dp, old_workers), (new_dp, new_workers) = old, new
    handed_out, states = [], []
    for rank in range(old_dp):
        stream = build_train_stream(
            DataArgs(**{**args.__dict__, "num_workers": old_workers}), SEQ_LEN, 1, rank, old_dp, 1
        )
        handed_out += [b["tokens"].reshape(-1).numpy() for b in islice(stream, 7 + 2 * rank)]
        assert stream.epoch == 0
        states.append(stream.state_dict())
    merged = merge_rank_states(states)
    assert merged["next_epoch"] == 1
    new_args = DataArgs(**{**args.__dict__, "num_workers": new_workers})
    for rank in range(new_dp):
        stream = build_train_stream(new_args, SEQ_LEN, 1, rank, new_dp, 1)
        stream.load_state_dict(merged)
        per_reader: dict[int, list[np.ndarray]] = {}
        batches = iter(stream)
        for _ in range(200):
            if all(not st["pending"] for st in stream.reader_states):
                break
            reader = stream.next_reader
            per_reader.setdefault(reader, []).append(next(batches)["tokens"].reshape(-1).numpy())
        else:
            pytest.fail("the pending work never ended")
        for reader, tokens in per_reader.items():
            st = stream.reader_states[reader]
            assert st["epoch"] == 1
            flat = np.concatenate(tokens)
            regular = _regular_tokens_handed_out(stream.spec, reader, st)
            handed_out.append(flat[: len(flat) - regular])
    got = np.sort(np.concatenate(handed_out))
    every_doc = [_doc(i) for i in range(N_SHARDS * DOCS_PER_SHARD)]
    expected = np.sort(np.concatenate([np.append(d, EOS) for d in every_doc]).astype(np.int64))
    assert np.array_equal(got, expected)  # each token of the epoch exactly once


def test_merge_refuses_incomplete_or_mixed_states(unique_tokens):
    args = DataArgs(path=str(unique_tokens))
    s0 = build_train_stream(args, SEQ_LEN, 1, 0, 2).state_dict()
    s1 = build_train_stream(args, SEQ_LEN, 1, 1, 2).state_dict()
    with pytest.raises(ValueError, match="one state per dp rank 0..1"):
        merge_rank_states([s0])
    other_seed = build_train_stream(args, SEQ_LEN, 1, 1, 2, seed=3).state_dict()
    with pytest.raises(ValueError, match="disagree on seed"):
        merge_rank_states([s0, other_seed])
    with pytest.raises(ValueError, match="merge_rank_states"):
        build_train_stream(args, SEQ_LEN, 1, 0, 1).load_state_dict(s0)
    merged = merge_rank_states([s0, s1])
    with pytest.raises(ValueError, match="seed was 0"):
        build_train_stream(args, SEQ_LEN, 1, 0, 3, seed=4).load_state_dict(merged)
