"""A sentencepiece tokenizer: trained on the corpus, or loaded from a ``.model`` file.

Trained models round-trip ordinary text exactly (``decode(encode(x)) == x``): identity
normalisation, no whitespace collapsing, byte fallback for characters never seen in training,
and a newline piece so line structure survives. Ids 0, 1, 2 are unk, bos, eos; there is no pad.

Vocabularies below BYTE_FALLBACK_MIN_VOCAB train without byte fallback: its 256 byte pieces
would leave (next to) no room for text pieces. Characters those tiny models did not keep encode
as unk, so they round-trip only text made of the characters they know.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from pretrain.data.errors import DataError

SENTENCE_CHARS = 2000
"""Training texts are cut at line ends into sentences of about this many characters:
sentencepiece drops sentences longer than its max_sentence_length."""
BYTE_FALLBACK_MIN_VOCAB = 512
_MAX_SENTENCE_BYTES = 4 * 4 * SENTENCE_CHARS  # a hard-cut sentence of 4-byte characters still fits


class Tokenizer:
    """A loaded sentencepiece model."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise DataError(f"tokenizer {self.path!r}: no such file")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"tokenizer {self.path!r} is not a sentencepiece model ({_first_line(exc)})") from None
        if self._sp.eos_id() < 0:
            raise DataError(f"tokenizer {self.path!r} has no end-of-sequence piece (eos_id)")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        """Appended after every document."""
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        """-1 when the model has none."""
        return self._sp.bos_id()

    @property
    def sha256(self) -> str:
        """Hash of the model file: prepared datasets record it to detect a tokenizer mismatch."""
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_prefix: str | Path,
        vocab_size: int,
        model_type: str = "bpe",
        *,
        num_threads: int = 1,
        input_sentence_size: int = 200_000,
        seed: int = 0,
    ) -> "Tokenizer":
        """Train on documents and write ``model_prefix.model`` (and ``.vocab``).

        The result is a function of the texts, the arguments and ``num_threads`` (sentencepiece's
        result depends on its thread count). Raises DataError when vocab_size does not fit the
        corpus; exceptions raised by ``texts`` propagate unchanged.
        """
        if model_type not in ("bpe", "unigram"):
            raise DataError(f"tokenizer type {model_type!r} is not 'bpe' or 'unigram'")
        source = _Guarded(_sentences(texts))
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(source),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=vocab_size >= BYTE_FALLBACK_MIN_VOCAB,
                split_digits=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                user_defined_symbols=["\n"],
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                num_threads=num_threads,
                minloglevel=2,  # sentencepiece logs every training step at INFO level
            )
        except RuntimeError as exc:
            if source.error is not None:
                raise source.error from None
            raise _training_error(exc, vocab_size) from None
        if source.error is not None:
            raise source.error
        path = Path(str(model_prefix) + ".model")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.getvalue())
        tok = cls(path)
        sp = tok._sp
        # the .vocab file sentencepiece writes beside a model: for people, not for loading
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
        Path(str(model_prefix) + ".vocab").write_text(vocab, encoding="utf-8")
        return tok


class _Guarded:
    """An iterator whose exception is kept for re-raising: sentencepiece would turn it into an
    opaque RuntimeError."""

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._it
        except Exception as exc:
            self.error = exc


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Pieces of about SENTENCE_CHARS characters, cut after newlines (kept, so the model learns
    line starts), else at spaces, else anywhere."""
    for text in texts:
        start = 0
        while len(text) - start > SENTENCE_CHARS:
            stop = start + SENTENCE_CHARS
            cut = text.rfind("\n", start + 1, stop)
            if cut < 0:
                cut = text.rfind(" ", start + 1, stop)
            cut = stop if cut < 0 else cut + 1
            yield text[start:cut]
            start = cut
        if start < len(text):
            yield text[start:]


def _training_error(exc: RuntimeError, vocab_size: int) -> DataError:
    text = str(exc)
    high = re.search(r"Vocabulary size too high.*<= (\d+)", text)
    if high:
        return DataError(
            f"data.vocab_size={vocab_size} is too large for this corpus (at most {high.group(1)}): "
            "lower data.vocab_size"
        )
    low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", text)
    if low:
        return DataError(f"data.vocab_size={vocab_size} is too small for this corpus (at least {low.group(1)})")
    if "sentences_.empty()" in text:
        return DataError("no text to train the tokenizer on")
    return DataError(f"sentencepiece training failed: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -------------------------------------------------------- worker side of `prepare`

_worker: Tokenizer | None = None


def init_worker(path: str) -> None:
    """Pool initializer: each tokenizer process loads the model once."""
    global _worker
    _worker = Tokenizer(path)


def encode_documents(docs: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of documents, each followed by eos, as one int32 array [sum(lengths)] and the
    per-document lengths [len(docs)] (two arrays pickle far faster than lists of lists)."""
    tok = tokenizer or _worker
    assert tok is not None, "init_worker was not called"
    ids = tok.encode_batch(docs)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    flat[ends - 1] = tok.eos_id
    for x, end, n in zip(ids, ends, lengths):
        flat[end - n : end - 1] = x
    return flat, lengths
