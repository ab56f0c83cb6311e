"""Tiny corpora for the data tests: a few hundred short documents, a 512-piece tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pretrain.config import DataConfig
from pretrain.data import prepare
from pretrain.data.sources import iter_documents

VOCAB = 512


def kjv_verses(n: int) -> list[str]:
    """The first n verses of the builtin Bible: real text without a fixture file."""
    verses: list[str] = []
    for chapter in iter_documents("builtin:kjv"):
        verses.extend(chapter.split("\n"))
        if len(verses) >= n:
            return verses[:n]
    return verses


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """n documents of 1 to 6 verses (some with digits, tabs, repeated spaces, non-ASCII)."""
    rng = random.Random(seed)
    verses = kjv_verses(600)
    extras = ["  two  spaces", "\tTab", "Zahl 12345", "naïve café ☕", "line\nbreak"]
    docs = []
    for _ in range(n):
        parts = rng.sample(verses, rng.randint(1, 6))
        if rng.random() < 0.2:
            parts.append(rng.choice(extras))
        docs.append(" ".join(parts))
    return docs


def write_corpus(root: Path, n_docs: int = 200) -> tuple[Path, list[str]]:
    """A jsonl of n_docs good records plus two empty ones and one with invalid UTF-8; returns
    the path and the documents the source must yield, in order."""
    docs = synthetic_docs(n_docs)
    lines = [json.dumps({"text": d, "id": i}).encode() for i, d in enumerate(docs)]
    lines.insert(3, json.dumps({"text": ""}).encode())
    lines.insert(7, json.dumps({"text": " \n\t "}).encode())
    bad = b'{"text": "caf\xe9 ol\xff\xfe"}'
    lines.insert(11, bad)
    expected = list(docs)
    expected.insert(9, "caf\ufffd ol\ufffd\ufffd")  # after the two empty records were dropped
    path = root / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected


@pytest.fixture(scope="session")
def make_docs():
    """``make_docs(n, seed=0)``: synthetic documents (test modules do not import conftest:
    its module name is not unique across test folders)."""
    return synthetic_docs


@pytest.fixture(scope="session")
def make_corpus():
    """``make_corpus(dir, n_docs=200) -> (jsonl path, expected documents)``."""
    return write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A prepared directory of two sources: a jsonl (with bad records) and two .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    jsonl, jsonl_docs = write_corpus(root)
    txt_dir = root / "txt"
    txt_dir.mkdir()
    txt_docs = synthetic_docs(40, seed=1)[:2]
    for i, doc in enumerate(txt_docs):
        (txt_dir / f"{i}.txt").write_text(doc, encoding="utf-8")
    cfg = DataConfig(
        sources=[str(jsonl), str(txt_dir / "*.txt")],
        dir=str(root / "prepared"),
        vocab_size=VOCAB,
        valid_fraction=0.1,
        num_workers=1,
    )
    logs: list[str] = []
    meta = prepare(cfg, log=logs.append)
    return {"cfg": cfg, "meta": meta, "docs": [jsonl_docs, txt_docs], "logs": logs, "root": root}
