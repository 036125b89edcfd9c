"""data.prepare beyond the stdlib: JSONL / gzip / parquet sources, a given tokenizer, user
symbols, parallel shard writing and per-shard resume of a crashed run.

Run:  pytest tests/unit/test_data_prepare.py -q
"""

from __future__ import annotations

import gzip
import json
import logging
import sys

import pytest

from data.corpus import list_documents
from data.prepare import PrepareArgs, main, prepare, read_manifest
from data.shards import read_shard
from data.tokenizer import Tokenizer
from tests.conftest import TINY_PREPARE

TEXTS = [f"def f{i}(x):\n    return x * {i}  # {'pad ' * (i * 7 % 50)}\n" for i in range(40)]


def _shard_texts(root) -> dict[str, str]:
    """source -> decoded text of every document in every shard."""
    m = read_manifest(root)
    tok = Tokenizer.load(root / "tokenizer.model")
    return {
        s.meta["source"]: tok.decode(s.tokens)
        for split in m["splits"].values()
        for shard in split["shards"]
        for s in read_shard(root / shard["file"], m["token_format"])
    }


def _args(out, source, tokenizer, **kw) -> PrepareArgs:
    base = dict(shard_tokens=300, val_per_mille=200, progress=False, tokenizer=str(tokenizer))
    return PrepareArgs(out=str(out), source=str(source), **{**base, **kw})


@pytest.fixture
def mixed_source(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(TEXTS[:20])]
    lines[3] = "{not json"
    lines[5] = json.dumps({"other": "no body field"})
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(src / "sub" / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[20:35]))
    (src / "c.md").write_text(TEXTS[35])
    return src


def test_jsonl_gzip_and_text_files_become_documents(mixed_source, tiny_prepared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="data.corpus"):
        docs = list_documents(str(mixed_source), val_per_mille=0, text_field="body")
    assert "skipped 2 records" in caplog.text
    sources = [d.source for d in docs]
    assert sources[:3] == ["a.jsonl:0", "a.jsonl:1", "a.jsonl:2"] and "a.jsonl:3" not in sources
    assert sources[18] == "c.md" and sources[-1] == "sub/b.jsonl.gz:14"  # path order
    assert len(docs) == 18 + 15 + 1
    out = mixed_source.parent / "out"
    tokenizer = tiny_prepared_data / "tokenizer.model"
    manifest = prepare(_args(out, mixed_source, tokenizer, text_field="body"))
    assert manifest["tokenizer"]["sha256"] == Tokenizer.load(tokenizer).sha256  # reused as is
    assert manifest["totals"]["docs"] == len(docs)
    assert len(manifest["splits"]["train"]["shards"]) > 3
    texts = _shard_texts(out)
    assert texts["a.jsonl:4"] == TEXTS[4] and texts["sub/b.jsonl.gz:0"] == TEXTS[20]
    assert texts["c.md"] == TEXTS[35] and len(texts) == len(docs)
    with pytest.raises(ValueError, match="no .* documents"):
        list_documents(str(mixed_source / "a.jsonl"), text_field="missing")


def test_parquet_needs_pyarrow_or_says_so(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": TEXTS[:5], "n": list(range(5))}), path)
    except ImportError:
        path.write_bytes(b"PAR1 not really")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pyarrow", None)
        m.setitem(sys.modules, "pyarrow.parquet", None)
        with pytest.raises(ValueError, match="needs pyarrow.*pip install pyarrow"):
            list_documents(str(path))
    pytest.importorskip("pyarrow")
    docs = list_documents(str(path), val_per_mille=0)
    assert [d.source for d in docs] == [f"d.parquet:{i}" for i in range(5)]
    assert docs[2].read_text() == TEXTS[2]


def test_parallel_workers_write_the_same_shards(mixed_source, tiny_prepared_data):
    tokenizer = tiny_prepared_data / "tokenizer.model"
    one = prepare(_args(mixed_source.parent / "w1", mixed_source, tokenizer, text_field="body"))
    two = prepare(
        _args(mixed_source.parent / "w2", mixed_source, tokenizer, text_field="body", workers=3)
    )
    assert one["splits"] == two["splits"]
    for shard in one["splits"]["train"]["shards"] + one["splits"]["val"]["shards"]:
        a = (mixed_source.parent / "w1" / shard["file"]).read_bytes()
        assert a == (mixed_source.parent / "w2" / shard["file"]).read_bytes()


def test_crashed_run_rewrites_only_missing_or_damaged_shards(tmp_path, tiny_prepared_data, caplog):
    out = tmp_path / "out"
    args = PrepareArgs(
        out=str(out), **{**TINY_PREPARE, "max_docs": 20, "shard_tokens": 5_000, "workers": 2}
    )
    first = prepare(args)
    names = [s["file"] for s in first["splits"]["train"]["shards"]]
    assert len(names) >= 5
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    # A crash: no manifest, one shard missing, one half-written with the right name.
    (out / "manifest.json").unlink()
    (out / names[1]).unlink()
    data = (out / names[3]).read_bytes()
    (out / names[3]).write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    with caplog.at_level(logging.INFO, logger="data.prepare"):
        second = prepare(args)
    assert "writing 2" in caplog.text
    assert second["splits"] == first["splits"]
    for n in names:
        changed = (out / n).stat().st_mtime_ns != mtimes[n]
        assert changed == (n in (names[1], names[3])), n
    assert (out / names[3]).read_bytes() == data


def test_user_symbols_and_cli_flags(tmp_path, tiny_mlm_data, mixed_source, capsys):
    tok = Tokenizer.load(tiny_mlm_data / "tokenizer.model")
    ids = tok.encode("x = <mask> + 1")
    assert tok.piece_to_id("<mask>") in ids and tok.decode(ids) == "x = <mask> + 1"
    argv = ["--out", str(tmp_path / "cli"), "--source", str(mixed_source), "--text-field", "body"]
    argv += ["--tokenizer", str(tiny_mlm_data / "tokenizer.model"), "--workers", "2"]
    argv += ["--shard-tokens", "400", "--val-per-mille", "100", "--no-progress"]
    assert main(argv) == 0
    assert "train:" in capsys.readouterr().out
    assert read_manifest(tmp_path / "cli")["settings"]["text_field"] == "body"
    assert main(argv) == 0
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="prepare.workers=0"):
        PrepareArgs(out="x", workers=0)
    with pytest.raises(ValueError, match="prepare.tokenizer="):
        PrepareArgs(out="x", tokenizer=str(tmp_path / "none.model"))
