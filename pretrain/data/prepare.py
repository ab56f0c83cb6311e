"""``pretrain prepare``: sources -> tokenizer -> megatron indexed token shards + meta.json.

Layout of ``data.dir``::

    tokenizer.model            trained on the sources, or a copy of data.tokenizer (a
                               tokenizer.json + tokenizer_config.json when that is one)
    NN-<slug>/train.bin|.idx   one folder per source: its documents, each ending with eos
    NN-<slug>/valid.bin|.idx   the held-out documents
    meta.json                  written last and atomically: without it the dir is not prepared

A document is held out when ``frac((i + 1) * golden ratio) < valid_fraction`` (i: its index in
the source). The golden-ratio sequence is evenly spread, so the held-out share is within a
document or so of ``valid_fraction`` at any corpus size, and needs no seed. If that leaves no
validation document, the source's last document is held out instead.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from pretrain.config import DataConfig
from pretrain.data import indexed
from pretrain.data.errors import DataError
from pretrain.data.meta import META_FILE, META_VERSION, read_meta, write_meta
from pretrain.data.sources import SourceStats, iter_documents, parse_source, source_fingerprint, source_slug
from pretrain.data.tokenizer import (
    Tokenizer,
    copy_tokenizer,
    encode_documents,
    init_worker,
    tokenizer_file,
    tokenizer_sha256,
)

TOKENIZER_FILE = "tokenizer.model"
"""The name of a trained (sentencepiece) tokenizer; see :func:`~pretrain.data.tokenizer.tokenizer_file`."""
TOKENIZER_TRAIN_CHARS = 500_000_000
"""Characters read, in all, to train a tokenizer (split evenly over the sources): sentencepiece
samples its sentences from them, and a huge hub dataset need not be streamed twice."""
CHUNK_CHARS = 1 << 18
"""Characters of text per tokenizer task: large enough that pickling costs little."""

_FINGERPRINTED = ("text_field", "tokenizer", "tokenizer_type", "vocab_size", "valid_fraction")
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio


def is_valid_document(i: int, valid_fraction: float) -> bool:
    """Whether document i of a source is held out (before the at-least-one fallback)."""
    return ((i + 1) * _GOLDEN) % (1 << 64) < int(valid_fraction * (1 << 64))


def fingerprint(cfg: DataConfig) -> str:
    """Hash of everything the prepared files depend on (not num_workers: any count gives valid
    shards; the trained tokenizer does depend on it, see Tokenizer.train)."""
    tok = cfg.tokenizer
    key = {
        "version": META_VERSION,
        "sources": [[s, source_fingerprint(s)] for s in cfg.sources],
        "text_field": cfg.text_field,
        "tokenizer": [tok, _sha256(Path(tok))] if tok else [cfg.tokenizer_type, cfg.vocab_size],
        "valid_fraction": cfg.valid_fraction,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data.tokenizer {str(path)!r}: no such file")
    return tokenizer_sha256(path)


def _complete(root: Path, meta: dict) -> bool:
    prefixes = [root / e["prefix"][s] for e in meta["datasets"] for s in ("train", "valid")]
    return tokenizer_file(root).is_file() and all(indexed.exists(str(p)) for p in prefixes)


def prepare(cfg: DataConfig, *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Prepare ``cfg.dir`` and return its meta dict; a no-op when it is already prepared with the
    same sources and tokenizer settings (unless ``force``).

    With ``cfg.num_workers > 1`` tokenizer processes are spawned: a script calling this must
    guard its top level with ``if __name__ == "__main__":`` (the CLI does).
    """
    start = time.perf_counter()
    root = Path(cfg.dir)
    fp = fingerprint(cfg)
    if not force and (root / META_FILE).is_file():
        try:
            meta = read_meta(root)
        except DataError:
            meta = None
        if meta is not None and meta.get("fingerprint") == fp and _complete(root, meta):
            log(f"{root} is already prepared for these sources (--force prepares it again)")
            return meta
    root.mkdir(parents=True, exist_ok=True)
    (root / META_FILE).unlink(missing_ok=True)  # from here on the directory counts as unprepared
    _remove_shards(root)

    tok = _tokenizer(cfg, root, log)
    entries, counts = [], []
    text_specs = [s for s in cfg.sources if parse_source(s).kind != "prepared"]
    with _Encoder(tok, cfg.num_workers if text_specs else 1) as encoder:
        for i, spec in enumerate(cfg.sources):
            name = f"{i:02d}-{source_slug(spec)}"
            (root / name).mkdir(exist_ok=True)
            if parse_source(spec).kind == "prepared":
                entry, count = _merge_prepared(spec, tok, root, name)
            else:
                entry, count = _tokenize_source(spec, cfg, tok, encoder, root, name)
            entry["unigram_entropy"] = unigram_entropy(count["train"], count["valid"])
            entries.append(entry)
            counts.append(count)
            log(_describe(entry))

    train = sum(c["train"] for c in counts)
    valid = sum(c["valid"] for c in counts)
    seconds = time.perf_counter() - start
    meta = {
        "version": META_VERSION,
        "fingerprint": fp,
        "sources": list(cfg.sources),
        "config": {k: getattr(cfg, k) for k in _FINGERPRINTED},
        "tokenizer": Path(tok.path).name,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "dtype": np.dtype(indexed.token_dtype(tok.vocab_size)).name,
        "datasets": entries,
        "documents": {s: sum(e["documents"][s] for e in entries) for s in ("train", "valid")},
        "tokens": {s: sum(e["tokens"][s] for e in entries) for s in ("train", "valid")},
        "skipped_empty": sum(e["skipped_empty"] for e in entries),
        "replaced_utf8": sum(e["replaced_utf8"] for e in entries),
        "unigram_entropy": unigram_entropy(train, valid),
        "seconds": round(seconds, 2),
    }
    write_meta(root, meta)
    n_tokens = meta["tokens"]["train"] + meta["tokens"]["valid"]
    log(
        f"prepared {root}: {len(entries)} dataset(s), {sum(meta['documents'].values()):,} documents, "
        f"{n_tokens:,} tokens ({meta['tokens']['valid']:,} valid), {meta['skipped_empty']:,} empty skipped, "
        f"{meta['replaced_utf8']:,} with invalid UTF-8 replaced; {seconds:.1f} s, {n_tokens / seconds:,.0f} tokens/s; "
        f"unigram entropy {meta['unigram_entropy']:.3f} nats/token"
    )
    return meta


def unigram_entropy(train_counts: np.ndarray, valid_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the add-one-smoothed unigram
    distribution of the training tokens: the loss of a model that ignores context."""
    p = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(-(valid_counts * np.log(p)).sum() / max(valid_counts.sum(), 1))


def _remove_shards(root: Path) -> None:
    """Shard folders of an earlier prepare (NN-slug holding only .bin/.idx files)."""
    for child in root.iterdir():
        if child.is_dir() and re.fullmatch(r"\d\d-.+", child.name):
            if all(f.suffix in (".bin", ".idx") for f in child.iterdir()):
                shutil.rmtree(child)


def _describe(e: dict) -> str:
    d, t = e["documents"], e["tokens"]
    return (
        f"  {e['name']}: {d['train'] + d['valid']:,} documents ({d['valid']:,} valid), "
        f"{t['train'] + t['valid']:,} tokens ({t['valid']:,} valid), "
        f"{e['skipped_empty']:,} empty skipped, {e['replaced_utf8']:,} with invalid UTF-8 replaced"
    )


# ----------------------------------------------------------------------- tokenizer


def _tokenizer(cfg: DataConfig, root: Path, log: Callable[[str], None]) -> Tokenizer:
    target = root / TOKENIZER_FILE
    prepared = [parse_source(s).name for s in cfg.sources if parse_source(s).kind == "prepared"]
    given = cfg.tokenizer or (str(tokenizer_file(prepared[0])) if prepared else "")
    if given:
        Tokenizer(given)  # validates it before it is copied
        copied = copy_tokenizer(given, root)
        log(f"tokenizer: {given}")
        return Tokenizer(copied)
    log(f"training a {cfg.tokenizer_type} tokenizer of {cfg.vocab_size} pieces on {', '.join(cfg.sources)}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(
        _training_texts(cfg),
        root / target.stem,
        cfg.vocab_size,
        cfg.tokenizer_type,
        num_threads=cfg.num_workers,
    )
    log(f"tokenizer trained in {time.perf_counter() - t0:.1f} s")
    return tok


def _training_texts(cfg: DataConfig) -> Iterator[str]:
    """Training documents of every source (validation documents left out), at most an even
    share of TOKENIZER_TRAIN_CHARS from each."""
    budget = TOKENIZER_TRAIN_CHARS // len(cfg.sources)
    for spec in cfg.sources:
        used = 0
        for i, doc in enumerate(iter_documents(spec, cfg.text_field)):
            if used >= budget:
                break
            if not is_valid_document(i, cfg.valid_fraction):
                used += len(doc)
                yield doc


# ---------------------------------------------------------------------- tokenizing


class _Encoder:
    """Encodes chunks of documents in order, in worker processes when num_workers > 1.

    ``apply_async`` with a bounded window rather than ``imap``: imap's feeder thread reads the
    whole input ahead, which would hold a large corpus in memory. Workers are spawned, not
    forked: forking a process that has started threads (tqdm, torch) can deadlock.
    """

    def __init__(self, tok: Tokenizer, num_workers: int):
        self.tok = tok
        self.num_workers = num_workers
        self.pool = None

    def __enter__(self) -> "_Encoder":
        if self.num_workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(self.num_workers, initializer=init_worker, initargs=(self.tok.path,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def map(self, chunks: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.pool is None:
            for chunk in chunks:
                yield encode_documents(chunk, self.tok)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self.pool.apply_async(encode_documents, (chunk,)))
            if len(pending) >= 2 * self.num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS or len(chunk) >= 4096:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _SplitWriter:
    """Routes each document to the train or valid shard and counts tokens per id.

    The latest train document is held back until the next one arrives, so that it can still
    become the validation document of a source whose hash rule held out none."""

    def __init__(self, root: Path, name: str, vocab_size: int, valid_fraction: float):
        self.prefix = {s: str(root / name / s) for s in ("train", "valid")}
        self.builders = {s: indexed.builder(p, vocab_size) for s, p in self.prefix.items()}
        self.counts = {s: np.zeros(vocab_size, dtype=np.int64) for s in self.prefix}
        self.docs = {s: 0 for s in self.prefix}
        self.tokens = {s: 0 for s in self.prefix}
        self._buffer: dict[str, list[np.ndarray]] = {s: [] for s in self.prefix}
        self.valid_fraction = valid_fraction
        self.index = 0
        self.pending: np.ndarray | None = None

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        for doc in np.split(flat, np.cumsum(lengths)[:-1]):
            if is_valid_document(self.index, self.valid_fraction):
                self._write("valid", doc)
            else:
                if self.pending is not None:
                    self._write("train", self.pending)
                self.pending = doc
            self.index += 1

    def _write(self, split: str, doc: np.ndarray) -> None:
        self.builders[split].add_document(doc, [len(doc)])
        self.docs[split] += 1
        self.tokens[split] += len(doc)
        self._buffer[split].append(doc)
        if len(self._buffer[split]) >= 4096:
            self._flush(split)

    def _flush(self, split: str) -> None:
        # one bincount per many documents: a vocab-sized array per document would dominate
        if self._buffer[split]:
            tokens = np.concatenate(self._buffer[split])
            self.counts[split] += np.bincount(tokens, minlength=len(self.counts[split]))
            self._buffer[split] = []

    def close(self, spec: str) -> None:
        if self.pending is not None:
            self._write("valid" if self.docs["valid"] == 0 else "train", self.pending)
        for split, b in self.builders.items():
            self._flush(split)
            b.finalize(self.prefix[split] + ".idx")
        if self.docs["train"] == 0:
            raise DataError(
                f"data source {spec!r} has {self.index} document(s): "
                "at least 2 are needed to hold one out for validation"
            )


def _tokenize_source(
    spec: str, cfg: DataConfig, tok: Tokenizer, encoder: _Encoder, root: Path, name: str
) -> tuple[dict, dict]:
    stats = SourceStats()
    writer = _SplitWriter(root, name, tok.vocab_size, cfg.valid_fraction)
    bar = tqdm(desc=name, unit="doc", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
    try:
        for flat, lengths in encoder.map(_chunks(iter_documents(spec, cfg.text_field, stats))):
            writer.add(flat, lengths)
            bar.update(len(lengths))
    finally:
        bar.close()
    writer.close(spec)
    return _entry(spec, name, writer.docs, writer.tokens, stats.skipped_empty, stats.replaced_utf8), writer.counts


def _entry(spec: str, name: str, docs: dict, tokens: dict, skipped: int, replaced: int) -> dict:
    return {
        "name": name,
        "source": spec,
        "prefix": {s: f"{name}/{s}" for s in ("train", "valid")},
        "documents": dict(docs),
        "tokens": dict(tokens),
        "skipped_empty": skipped,
        "replaced_utf8": replaced,
    }


def _merge_prepared(spec: str, tok: Tokenizer, root: Path, name: str) -> tuple[dict, dict]:
    """Copy every dataset of a prepared directory into one dataset (no re-tokenizing)."""
    other_dir = Path(parse_source(spec).name)
    other = read_meta(other_dir)
    if other["tokenizer_sha256"] != tok.sha256:
        raise DataError(
            f"data source {spec!r} was tokenized with a different tokenizer: "
            f"set data.tokenizer to {tokenizer_file(other_dir)} or prepare it again"
        )
    counts = {}
    for split in ("train", "valid"):
        prefix = str(root / name / split)
        builder = indexed.builder(prefix, tok.vocab_size)
        for e in other["datasets"]:
            builder.add_index(str(other_dir / e["prefix"][split]))
        builder.finalize(prefix + ".idx")
        counts[split] = _bincount_file(prefix + ".bin", tok.vocab_size)
    docs = {s: sum(e["documents"][s] for e in other["datasets"]) for s in ("train", "valid")}
    tokens = {s: int(counts[s].sum()) for s in ("train", "valid")}
    skipped = sum(e["skipped_empty"] for e in other["datasets"])
    replaced = sum(e["replaced_utf8"] for e in other["datasets"])
    return _entry(spec, name, docs, tokens, skipped, replaced), counts


def _bincount_file(bin_path: str, vocab_size: int) -> np.ndarray:
    """Token counts of a ``.bin`` file (headerless token ids), read in blocks."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    if Path(bin_path).stat().st_size == 0:
        return counts  # np.memmap cannot map an empty file
    data = np.memmap(bin_path, dtype=indexed.token_dtype(vocab_size), mode="r")
    block = 1 << 24
    for i in range(0, len(data), block):
        counts += np.bincount(data[i : i + block], minlength=vocab_size)
    return counts
