"""A sentencepiece tokenizer: trained on the corpus, or loaded from a ``.model`` file; or a
Hugging Face ``tokenizer.json`` (e.g. the byte-level BPE of GPT-NeoX/Mamba or Llama-3), loaded
with the ``tokenizers`` library behind the same interface.

A folder (a prepared data dir, a checkpoint, an imported run) holds its tokenizer under one
name per format: ``tokenizer.model`` (sentencepiece) or ``tokenizer.json`` with its
``tokenizer_config.json`` (special-token names) beside it; :func:`tokenizer_file` finds it and
:func:`copy_tokenizer` copies it.

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
import json
import re
import shutil
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

SPM_FILE = "tokenizer.model"
"""The name of a sentencepiece model in a folder."""
HF_FILE = "tokenizer.json"
"""The name of a Hugging Face tokenizer in a folder."""
HF_CONFIG_FILE = "tokenizer_config.json"
"""Beside HF_FILE: its special-token names (eos_token, bos_token), as transformers writes them."""
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
"""EOS names looked for among the special tokens when tokenizer_config.json names none."""


def is_hf_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` names a Hugging Face tokenizer (``*.json``) rather than a sentencepiece model."""
    return str(path).endswith(".json")


def tokenizer_file(folder: str | Path) -> Path:
    """The tokenizer of ``folder``: its ``tokenizer.model`` when present, else its
    ``tokenizer.json`` when present, else the (missing) ``tokenizer.model`` path, for messages."""
    folder = Path(folder)
    spm_path, hf_path = folder / SPM_FILE, folder / HF_FILE
    return hf_path if not spm_path.is_file() and hf_path.is_file() else spm_path


def tokenizer_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of the tokenizer at ``path``: the file's bytes, followed for a
    ``tokenizer.json`` by those of the ``tokenizer_config.json`` beside it (it picks the EOS),
    when present. Raises FileNotFoundError when ``path`` is missing."""
    path = Path(path)
    h = hashlib.sha256(path.read_bytes())
    config = path.with_name(HF_CONFIG_FILE)
    if is_hf_tokenizer(path) and config.is_file():
        h.update(config.read_bytes())
    return h.hexdigest()


def copy_tokenizer(path: str | Path, folder: str | Path) -> Path:
    """Copy the tokenizer at ``path`` into ``folder`` under its format's name (with its
    ``tokenizer_config.json`` for a ``tokenizer.json``), removing the files of the other format
    there (and a config the source lacks) so :func:`tokenizer_file` and
    :func:`tokenizer_sha256` see this one; returns the copy's path."""
    path, folder = Path(path), Path(folder)
    hf = is_hf_tokenizer(path)
    target = folder / (HF_FILE if hf else SPM_FILE)
    config = path.with_name(HF_CONFIG_FILE)
    has_config = hf and config.is_file()
    stale = [folder / SPM_FILE] if hf else [folder / HF_FILE]
    if not has_config:
        stale.append(folder / HF_CONFIG_FILE)
    for old in stale:
        if old.is_file() and old.resolve() != path.resolve():
            old.unlink()
    pairs = [(path, target)]
    if has_config:
        pairs.append((config, folder / HF_CONFIG_FILE))
    for src, dst in pairs:
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    return target


class Tokenizer:
    """A loaded sentencepiece model, or a Hugging Face ``tokenizer.json`` (see :class:`HFTokenizer`)."""

    def __new__(cls, *args, **kwargs):
        path = args[0] if args else kwargs.get("path", "")
        if cls is Tokenizer and is_hf_tokenizer(path):
            return super().__new__(HFTokenizer)
        return super().__new__(cls)

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
        """Hash of the model file (:func:`tokenizer_sha256`): prepared datasets record it to
        detect a tokenizer mismatch."""
        return tokenizer_sha256(self.path)

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


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (``tokenizers`` library) with :class:`Tokenizer`'s
    interface: ``encode`` adds no special tokens (documents get their EOS in
    :func:`encode_documents`), ``decode`` keeps them, as transformers' ``decode`` does.

    EOS (and BOS) are the ``eos_token`` (``bos_token``) of the ``tokenizer_config.json`` beside
    the file, else a special token with a usual EOS name (``<|endoftext|>``, ``</s>``, ...).
    Raises DataError for a missing or unreadable file, or one without an EOS."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizers

        self.path = str(path)
        if not Path(self.path).is_file():
            raise DataError(f"tokenizer {self.path!r}: no such file")
        try:
            self._tok = _Tokenizers.from_file(self.path)
        except Exception as exc:  # the Rust side raises a plain Exception
            raise DataError(f"tokenizer {self.path!r} is not a tokenizer.json ({_first_line(exc)})") from None
        config = _read_json(Path(self.path).with_name(HF_CONFIG_FILE))
        added = json.loads(Path(self.path).read_text(encoding="utf-8")).get("added_tokens", [])
        specials = [t["content"] for t in added if t.get("special")]
        eos = _token_name(config.get("eos_token")) or next((n for n in _EOS_NAMES if n in specials), None)
        self._eos = self._tok.token_to_id(eos) if eos else None
        if self._eos is None:
            raise DataError(f"tokenizer {self.path!r} has no end-of-sequence token (eos_token in {HF_CONFIG_FILE})")
        bos = _token_name(config.get("bos_token"))
        bos_id = self._tok.token_to_id(bos) if bos else None
        self._bos = -1 if bos_id is None else bos_id

    @property
    def vocab_size(self) -> int:
        """Ids in use, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def sha256(self) -> str:
        return tokenizer_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


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
