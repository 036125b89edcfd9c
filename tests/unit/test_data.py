"""Corpus, tokenizer, shards and prepare: real sentencepiece models and real webdataset tars.

Run:  pytest tests/unit/test_data.py -q
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

from data.corpus import list_documents, split_of
from data.prepare import PrepareArgs, main, prepare, read_manifest
from data.shards import read_shard
from data.tokenizer import EOS_ID, PAD_ID, Tokenizer, TokenizerArgs
from tests.conftest import TINY_PREPARE

RARE_UNICODE = "naïve café — Ωμέγα 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜 中文 \u2028 tab\there\r\n  indented\n"


def _docs_by_key(max_docs: int, val_per_mille: int) -> dict:
    return {d.key: d for d in list_documents("stdlib", val_per_mille, max_docs)}


def test_split_is_a_stable_hash_of_the_path():
    assert split_of("asyncio/base_events.py", 0) == "train"
    assert split_of("asyncio/base_events.py", 1000) == "val"
    digest = int(hashlib.sha1(b"json/decoder.py").hexdigest(), 16) % 1000
    assert split_of("json/decoder.py", digest + 1) == "val"
    assert split_of("json/decoder.py", digest) == "train"
    docs = list_documents("stdlib")
    assert len(docs) > 500
    assert [d.rel_path for d in docs] == sorted(d.rel_path for d in docs)
    assert all(d.size >= 1024 and "site-packages" not in d.rel_path for d in docs)
    val = sum(d.split == "val" for d in docs) / len(docs)
    assert 0.005 < val < 0.05  # ~2% at the default 20 per mille


def test_user_directory_corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# title\n")
    (tmp_path / "sub" / "a.txt").write_text("hello\n")
    (tmp_path / "c.py").write_text("x = 1\n")
    (tmp_path / "skip.json").write_text("{}")
    (tmp_path / "empty.txt").write_text("")
    docs = list_documents(str(tmp_path), val_per_mille=0)
    assert [d.rel_path for d in docs] == ["b.md", "c.py", "sub/a.txt"]
    assert docs[2].read_text() == "hello\n"
    with pytest.raises(ValueError, match="source="):
        list_documents(str(tmp_path / "missing"))


def test_tokenizer_round_trip_on_real_text(tiny_prepared_data):
    manifest = read_manifest(tiny_prepared_data)
    tok = Tokenizer.load(tiny_prepared_data / manifest["tokenizer"]["file"])
    assert tok.vocab_size == 512 == manifest["tokenizer"]["vocab_size"]
    assert (tok.eos_id, tok.pad_id) == (EOS_ID, PAD_ID)
    model_bytes = (tiny_prepared_data / "tokenizer.model").read_bytes()
    assert tok.sha256 == hashlib.sha256(model_bytes).hexdigest() == manifest["tokenizer"]["sha256"]
    for doc in list_documents("stdlib", max_docs=5):
        text = doc.read_text()
        ids = tok.encode(text)
        assert len(ids) < len(text)  # it compresses
        assert tok.decode(ids) == text  # indentation and blank lines survive
    ids = tok.encode(RARE_UNICODE)
    assert tok.decode(ids) == RARE_UNICODE  # byte fallback
    assert tok.unk_id not in ids


def test_unigram_tokenizer_and_quiet_training(tmp_path, capfd):
    manifest = prepare(
        PrepareArgs(out=str(tmp_path), max_docs=8, vocab_size=400, input_sentence_size=5000)
    )
    assert manifest["tokenizer"]["model_type"] == "unigram"
    assert "unigram_model_trainer" not in capfd.readouterr().err  # C++ log silenced
    tok = Tokenizer.load(tmp_path / "tokenizer.model")
    assert tok.vocab_size == 400
    assert tok.decode(tok.encode(RARE_UNICODE)) == RARE_UNICODE


def test_shards_hold_exactly_the_encoded_documents(tiny_prepared_data):
    manifest = read_manifest(tiny_prepared_data)
    tok = Tokenizer.load(tiny_prepared_data / "tokenizer.model")
    docs = _docs_by_key(TINY_PREPARE["max_docs"], TINY_PREPARE["val_per_mille"])
    seen = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            samples = list(read_shard(tiny_prepared_data / shard["file"], manifest["token_format"]))
            assert len(samples) == shard["docs"]
            assert sum(len(s.tokens) for s in samples) == shard["tokens"]
            for s in samples:
                doc = docs[s.key]
                assert doc.split == split and s.meta["source"] == doc.rel_path
                assert s.meta["n_tokens"] == len(s.tokens)
                text = doc.read_text()
                assert s.tokens.tolist() == tok.encode(text)
                assert tok.decode(s.tokens) == text
                seen.append(s.key)
    assert sorted(seen) == sorted(docs)  # every document once, in exactly one split


def test_manifest_totals_equal_the_tars(tiny_prepared_data):
    manifest = read_manifest(tiny_prepared_data)
    assert manifest["token_format"] == "u16"
    splits = manifest["splits"]
    assert len(splits["train"]["shards"]) >= 8 and splits["val"]["docs"] >= 1
    for info in splits.values():
        assert info["docs"] == sum(s["docs"] for s in info["shards"])
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        # Shards are planned by text size before encoding: about shard_tokens each, or one
        # document when that is larger.
        for s in info["shards"][:-1]:
            assert s["tokens"] >= TINY_PREPARE["shard_tokens"] / 2
    totals = manifest["totals"]
    assert totals["docs"] == TINY_PREPARE["max_docs"]
    assert totals["tokens"] == sum(i["tokens"] for i in splits.values())
    assert totals["shards"] == sum(len(i["shards"]) for i in splits.values())
    on_disk = sorted(p.name for p in tiny_prepared_data.glob("*.tar"))
    assert on_disk == sorted(s["file"] for i in splits.values() for s in i["shards"])


def test_rerun_skips_and_cli_says_so(tiny_prepared_data, caplog, capsys):
    files = sorted(tiny_prepared_data.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in files}
    with caplog.at_level(logging.INFO, logger="data.prepare"):
        manifest = prepare(PrepareArgs(out=str(tiny_prepared_data), **TINY_PREPARE))
    assert "up to date" in caplog.text
    assert manifest == read_manifest(tiny_prepared_data)
    argv = ["--out", str(tiny_prepared_data), "--max-docs", "60", "--vocab-size", "512"]
    argv += ["--model-type", "bpe", "--shard-tokens", "20000", "--val-per-mille", "100"]
    argv += ["--input-sentence-size", "20000", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "train:" in out and "val:" in out
    assert {p.name: p.stat().st_mtime_ns for p in files} == before


def test_crashed_prepare_is_redone_and_tokenizer_reused(tmp_path, caplog):
    args = PrepareArgs(out=str(tmp_path), **{**TINY_PREPARE, "max_docs": 12})
    first = prepare(args)
    tok_mtime = (tmp_path / "tokenizer.model").stat().st_mtime_ns
    # A crash leaves shards (maybe half-written) but no manifest.
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "train-000000.tar").write_bytes(b"garbage")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(tmp_path)
    with caplog.at_level(logging.INFO, logger="data.prepare"):
        second = prepare(args)
    assert "reusing" in caplog.text
    assert (tmp_path / "tokenizer.model").stat().st_mtime_ns == tok_mtime
    assert second["splits"] == first["splits"]
    # Different settings: shards are rebuilt, the tokenizer too (vocab changed).
    third = prepare(
        PrepareArgs(out=str(tmp_path), **{**TINY_PREPARE, "max_docs": 12, "vocab_size": 420})
    )
    assert third["tokenizer"]["vocab_size"] == 420
    assert json.loads((tmp_path / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 420


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.model_type='wordpiece'"):
        TokenizerArgs(model_type="wordpiece")
    with pytest.raises(ValueError, match="tokenizer.vocab_size=100"):
        PrepareArgs(out=str(tmp_path), vocab_size=100)
    with pytest.raises(ValueError, match="prepare.shard_tokens=0"):
        PrepareArgs(out=str(tmp_path), shard_tokens=0)
    with pytest.raises(ValueError, match="val_per_mille=1001"):
        PrepareArgs(out=str(tmp_path), val_per_mille=1001)


def test_token_bytes_are_little_endian_u16(tiny_prepared_data):
    import tarfile

    with tarfile.open(tiny_prepared_data / "train-000000.tar") as tar:
        names = tar.getnames()
        assert names[0].startswith("doc-") and names[0].endswith(".tokens.u16")
        assert names[1] == names[0].replace(".tokens.u16", ".meta.json")
        raw = tar.extractfile(names[0]).read()
    first = next(read_shard(tiny_prepared_data / "train-000000.tar", "u16"))
    assert np.array_equal(np.frombuffer(raw, dtype="<u2"), first.tokens)
