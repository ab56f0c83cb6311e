"""``meta.json``: the record of a prepared data directory, written last by ``prepare``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain.data.errors import DataError

META_FILE = "meta.json"
META_VERSION = 1


def read_meta(data_dir: str | Path) -> dict:
    """The meta dict of a prepared directory; DataError when it was never (fully) prepared."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"data dir {str(data_dir)!r} is not prepared: run `pretrain prepare CONFIG`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is corrupt ({exc}): run `pretrain prepare CONFIG --force`") from None
    if meta.get("version") != META_VERSION:
        raise DataError(f"{path} has version {meta.get('version')}, expected {META_VERSION}: prepare it again")
    return meta


def write_meta(data_dir: str | Path, meta: dict) -> None:
    """Atomically (temporary file + rename): a reader sees no meta or a complete one."""
    path = Path(data_dir) / META_FILE
    tmp = path.with_name(META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepared_datasets(data_dir: str | Path, split: str, weights: list[float] | None = None) -> list[tuple[str, float]]:
    """``(path prefix, weight)`` of each dataset's ``split`` ('train' or 'valid').

    Weights default to each dataset's share of the split's tokens; given weights (data.weights)
    are normalised. Prefixes are absolute, resolved against ``data_dir`` (the directory may move).
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    meta = read_meta(data_dir)
    entries = meta["datasets"]
    if weights:
        if len(weights) != len(entries):
            raise DataError(f"data.weights has {len(weights)} entries but {data_dir} holds {len(entries)} datasets")
        raw = [float(w) for w in weights]
    else:
        raw = [float(e["tokens"][split]) for e in entries]
    total = sum(raw)
    if total <= 0:
        raise DataError(f"data dir {str(data_dir)!r}: the {split} split has no tokens to weight")
    root = Path(data_dir).resolve()
    return [(str(root / e["prefix"][split]), w / total) for e, w in zip(entries, raw)]
