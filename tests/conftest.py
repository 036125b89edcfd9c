"""Shared pytest fixtures. Each block is owned by one component; keep blocks separate."""

from __future__ import annotations

import pytest

# ---- data fixtures (owner: data pipeline) ---------------------------------------------------

# 60 stdlib documents, ~0.7M tokens; bpe trains in well under a second (unigram at vocab 512
# takes ~5 s here and is covered by its own smaller test). A tiny shard size gives ~20 shards,
# enough to split across data-parallel ranks; 10% validation gives a handful of val documents.
TINY_PREPARE = dict(
    max_docs=60,
    vocab_size=512,
    model_type="bpe",
    shard_tokens=20_000,
    val_per_mille=100,
    input_sentence_size=20_000,
    progress=False,
)


@pytest.fixture(scope="session")
def tiny_prepared_data(tmp_path_factory):
    """Path of a prepared directory (data.prepare) built once per test session."""
    from data.prepare import PrepareArgs, prepare

    out = tmp_path_factory.mktemp("tiny_data")
    prepare(PrepareArgs(out=str(out), **TINY_PREPARE))
    return out


@pytest.fixture(scope="session")
def tiny_mlm_data(tmp_path_factory):
    """A smaller prepared directory whose tokenizer has the "<mask>" piece (objective=mlm)."""
    from data.prepare import PrepareArgs, prepare

    out = tmp_path_factory.mktemp("tiny_mlm_data")
    settings = {**TINY_PREPARE, "max_docs": 24, "user_defined_symbols": ("<mask>",)}
    prepare(PrepareArgs(out=str(out), **settings))
    return out


# ---- end of data fixtures -------------------------------------------------------------------
