from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.data import DataError, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, make_docs) -> Tokenizer:
    return Tokenizer.train(make_docs(150), tmp_path_factory.mktemp("tok") / "t", 512)


@pytest.mark.parametrize(
    "text",
    [
        "In the beginning God created the heaven and the earth.",
        "  leading and trailing spaces  ",
        "two\n\nlines\r\n and\ttabs",
        "digits 3.14159 and 2024-01-01",
        "unseen: Ωμέγα 漢字 🙂 ü",
        "",
    ],
)
def test_roundtrip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_ids_and_files(tok: Tokenizer) -> None:
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    assert Path(tok.path).name == "t.model" and Path(tok.path).with_suffix(".vocab").is_file()
    assert tok.eos_id not in tok.encode("text never encodes to eos")
    # split_digits: no piece holds two digits, however often "12345" was seen in training
    assert all(sum(c.isdigit() for c in tok.decode([i])) <= 1 for i in tok.encode("12345 0123456789"))


def test_training_is_deterministic(tmp_path: Path, make_docs) -> None:
    docs = make_docs(150)
    a = Tokenizer.train(docs, tmp_path / "a", 512)
    b = Tokenizer.train(iter(docs), tmp_path / "b", 512)
    assert a.sha256 == b.sha256


def test_unigram(tmp_path: Path, make_docs) -> None:
    tok = Tokenizer.train(make_docs(150), tmp_path / "u", 512, "unigram")
    text = "And God said, Let there be light."
    assert tok.decode(tok.encode(text)) == text


def test_tiny_vocab_has_no_byte_fallback(tmp_path: Path, make_docs) -> None:
    tok = Tokenizer.train(make_docs(150), tmp_path / "t", 256)
    text = "And God said, Let there be light: and there was light."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("\u6f22")[-1] == 0  # unk: no room for 256 byte pieces


def test_vocab_too_large(tmp_path: Path, make_docs) -> None:
    with pytest.raises(DataError, match=r"data.vocab_size=50000 is too large .*lower data.vocab_size"):
        Tokenizer.train(make_docs(20), tmp_path / "t", 50000)


def test_vocab_too_small(tmp_path: Path, make_docs) -> None:
    with pytest.raises(DataError, match=r"data.vocab_size=20 is too small for this corpus \(at least \d+\)"):
        Tokenizer.train(make_docs(20), tmp_path / "t", 20)


def test_errors_of_the_texts_propagate(tmp_path: Path) -> None:
    def texts():
        yield "some text"
        raise DataError("source broke")

    with pytest.raises(DataError, match="source broke"):
        Tokenizer.train(texts(), tmp_path / "t", 400)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model.*not a sentencepiece model"):
        Tokenizer(junk)
