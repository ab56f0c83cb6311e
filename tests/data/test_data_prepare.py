from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from pretrain.config import DataConfig
from pretrain.data import DataError, prepare, prepared_datasets, read_meta
from pretrain.data import indexed
from pretrain.data.meta import META_FILE

GOLDEN_FRACTION = (5**0.5 - 1) / 2


def expected_split(n_docs: int, fraction: float) -> list[bool]:
    """Held-out flags written independently of prepare's integer hash."""
    valid = [((i + 1) * GOLDEN_FRACTION) % 1.0 < fraction for i in range(n_docs)]
    if not any(valid):
        valid[-1] = True
    return valid


def read_documents(prefix: str) -> list[list[int]]:
    data = indexed.open_dataset(prefix)
    return [data[i].tolist() for i in range(len(data))]


def test_counts_and_meta(corpus: dict) -> None:
    meta = corpus["meta"]
    jsonl, txt = meta["datasets"]
    assert (jsonl["name"], txt["name"]) == ("00-corpus", "01-txt")
    assert jsonl["documents"]["train"] + jsonl["documents"]["valid"] == 201
    assert (jsonl["skipped_empty"], jsonl["replaced_utf8"]) == (2, 1)
    assert txt["documents"] == {"train": 1, "valid": 1}  # no hash pick among 2: the last is held out
    assert meta["vocab_size"] == 512 and meta["eos_id"] == 2 and meta["dtype"] == "uint16"
    assert meta["tokens"]["train"] == jsonl["tokens"]["train"] + txt["tokens"]["train"]
    assert any("201 documents" in line for line in corpus["logs"])
    assert "tokens/s" in corpus["logs"][-1] and "unigram entropy" in corpus["logs"][-1]


def test_shards_equal_an_independent_encoding(corpus: dict) -> None:
    """Every document, in order, in its split, is sentencepiece's encoding followed by eos."""
    root = Path(corpus["cfg"].dir)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    for entry, docs in zip(corpus["meta"]["datasets"], corpus["docs"]):
        flags = expected_split(len(docs), corpus["cfg"].valid_fraction)
        for split, held_out in (("train", False), ("valid", True)):
            want = [sp.encode(d) + [sp.eos_id()] for d, v in zip(docs, flags) if v == held_out]
            got = read_documents(str(root / entry["prefix"][split]))
            assert got == want
            assert entry["tokens"][split] == sum(map(len, want))
            raw = np.fromfile(root / (entry["prefix"][split] + ".bin"), dtype=np.uint16)
            assert raw.tolist() == [t for d in want for t in d]
            assert (raw == sp.eos_id()).sum() == len(want)  # eos ends every document, nowhere else


def test_unigram_entropy(corpus: dict) -> None:
    root = Path(corpus["cfg"].dir)
    entries = corpus["meta"]["datasets"]
    tokens = {
        s: np.concatenate([np.fromfile(root / (e["prefix"][s] + ".bin"), np.uint16) for e in entries])
        for s in ("train", "valid")
    }
    counts = np.bincount(tokens["train"], minlength=512)
    logp = np.log((counts + 1) / (len(tokens["train"]) + 512))
    want = -np.mean(logp[tokens["valid"]])
    assert corpus["meta"]["unigram_entropy"] == pytest.approx(want, rel=1e-9)
    assert 0 < want < np.log(512)


def test_prepared_datasets(corpus: dict) -> None:
    root = corpus["cfg"].dir
    meta = corpus["meta"]
    train = prepared_datasets(root, "train")
    tokens = [e["tokens"]["train"] for e in meta["datasets"]]
    assert [w for _, w in train] == pytest.approx([t / sum(tokens) for t in tokens])
    assert all(indexed.exists(p) for p, _ in train)
    assert [w for _, w in prepared_datasets(root, "valid", [3, 1])] == [0.75, 0.25]
    with pytest.raises(DataError, match="data.weights has 1 entries"):
        prepared_datasets(root, "train", [1.0])


def test_second_prepare_is_a_no_op(corpus: dict) -> None:
    cfg = corpus["cfg"]
    shard = Path(cfg.dir) / corpus["meta"]["datasets"][0]["prefix"]["train"]
    before = (shard.with_suffix(".bin").stat().st_mtime_ns, (Path(cfg.dir) / META_FILE).stat().st_mtime_ns)
    logs: list[str] = []
    assert prepare(cfg, log=logs.append) == corpus["meta"]
    assert "already prepared" in logs[0]
    assert before == (shard.with_suffix(".bin").stat().st_mtime_ns, (Path(cfg.dir) / META_FILE).stat().st_mtime_ns)


def test_force_reproduces_the_same_files(corpus: dict, tmp_path: Path) -> None:
    cfg = dataclasses.replace(corpus["cfg"], dir=str(tmp_path / "again"))
    meta = prepare(cfg, force=True, log=lambda s: None)
    assert meta["tokenizer_sha256"] == corpus["meta"]["tokenizer_sha256"]
    for a, b in zip(meta["datasets"], corpus["meta"]["datasets"]):
        for split in ("train", "valid"):
            mine = (tmp_path / "again" / (a["prefix"][split] + ".bin")).read_bytes()
            theirs = (Path(corpus["cfg"].dir) / (b["prefix"][split] + ".bin")).read_bytes()
            assert mine == theirs


def test_workers_give_identical_shards(corpus: dict, tmp_path: Path) -> None:
    """Two tokenizer processes write exactly what one process writes (same given tokenizer)."""
    tokenizer = str(Path(corpus["cfg"].dir) / "tokenizer.model")
    cfg = dataclasses.replace(corpus["cfg"], dir=str(tmp_path / "w2"), tokenizer=tokenizer, num_workers=2)
    meta = prepare(cfg, log=lambda s: None)
    assert meta["tokens"] == corpus["meta"]["tokens"]
    for e in meta["datasets"]:
        for split in ("train", "valid"):
            a = (tmp_path / "w2" / (e["prefix"][split] + ".bin")).read_bytes()
            b = (Path(corpus["cfg"].dir) / (e["prefix"][split] + ".bin")).read_bytes()
            assert a == b


def test_interrupted_prepare_is_not_prepared(corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("pretrain.data.prepare")  # the package attribute is the function

    cfg = dataclasses.replace(corpus["cfg"], dir=str(tmp_path / "cut"))
    prepare(cfg, log=lambda s: None)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_meta", interrupted)
    changed = dataclasses.replace(cfg, valid_fraction=0.2)  # a new fingerprint: work starts again
    with pytest.raises(KeyboardInterrupt):
        prepare(changed, log=lambda s: None)
    assert not (tmp_path / "cut" / META_FILE).exists()  # shards are all there, but no meta
    with pytest.raises(DataError, match=r"is not prepared: run `pretrain prepare CONFIG`"):
        read_meta(cfg.dir)
    with pytest.raises(DataError, match="is not prepared"):
        prepared_datasets(cfg.dir, "train")
    monkeypatch.undo()
    logs: list[str] = []
    prepare(changed, log=logs.append)
    assert "already prepared" not in logs[0]
    assert json.loads((tmp_path / "cut" / META_FILE).read_text())["datasets"]


def test_blend_in_a_prepared_dir(corpus: dict, tmp_path: Path, make_docs) -> None:
    first = corpus["cfg"].dir
    extra = tmp_path / "extra.txt"
    extra.write_text("one more document\n\nof two paragraphs")
    cfg = DataConfig(sources=[f"prepared:{first}", str(tmp_path / "*.txt")], dir=str(tmp_path / "blend"), num_workers=1)
    with pytest.raises(DataError, match="has 1 document"):
        prepare(cfg, log=lambda s: None)
    (tmp_path / "extra2.txt").write_text("and another")
    meta = prepare(cfg, log=lambda s: None)  # takes the prepared dir's tokenizer
    assert meta["tokenizer_sha256"] == corpus["meta"]["tokenizer_sha256"]
    merged = meta["datasets"][0]
    assert merged["tokens"] == corpus["meta"]["tokens"] and merged["documents"] == corpus["meta"]["documents"]
    old = [d for e in corpus["meta"]["datasets"] for d in read_documents(str(Path(first) / e["prefix"]["train"]))]
    assert read_documents(str(tmp_path / "blend" / merged["prefix"]["train"])) == old

    other_tok = tmp_path / "other"
    from pretrain.data import Tokenizer

    Tokenizer.train(make_docs(50, seed=5), other_tok, 300)
    mismatch = dataclasses.replace(cfg, dir=str(tmp_path / "bad"), tokenizer=str(other_tok) + ".model")
    with pytest.raises(DataError, match="different tokenizer"):
        prepare(mismatch, log=lambda s: None)


def test_errors(tmp_path: Path) -> None:
    missing = DataConfig(sources=[str(tmp_path / "nothing.jsonl")], dir=str(tmp_path / "out"))
    with pytest.raises(DataError, match="nothing.jsonl"):
        prepare(missing, log=lambda s: None)
    (tmp_path / "empty.jsonl").write_text("")
    empty = dataclasses.replace(missing, sources=[str(tmp_path / "empty.jsonl")])
    with pytest.raises(DataError, match="empty.jsonl' has no non-empty document"):
        prepare(empty, log=lambda s: None)
    (tmp_path / "small.txt").write_text("tiny text. " * 30)
    (tmp_path / "small2.txt").write_text("more tiny text.")
    big_vocab = dataclasses.replace(missing, sources=[str(tmp_path / "*.txt")], vocab_size=4096)
    with pytest.raises(DataError, match="lower data.vocab_size"):
        prepare(big_vocab, log=lambda s: None)
    assert not (tmp_path / "out" / META_FILE).exists()


def test_builtin_kjv(tmp_path: Path) -> None:
    cfg = DataConfig(sources=["builtin:kjv"], dir=str(tmp_path / "kjv"), vocab_size=512, num_workers=1)
    meta = prepare(cfg, log=lambda s: None)
    docs = meta["documents"]
    assert docs["train"] + docs["valid"] == 1189 and 5 <= docs["valid"] <= 20
    from pretrain.data import Tokenizer

    tok = Tokenizer(tmp_path / "kjv" / "tokenizer.model")
    genesis_1 = read_documents(str(tmp_path / "kjv" / meta["datasets"][0]["prefix"]["train"]))[0]
    text = tok.decode(genesis_1[:-1])
    assert text.startswith("In the beginning God created the heaven and the earth.\n") and text.count("\n") == 30
