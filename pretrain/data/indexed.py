"""The only door to megatron-core's indexed dataset (``.bin`` token data + ``.idx`` index).

Importing ``megatron.core`` takes seconds (it pulls in its whole training stack) and warns
about missing Transformer Engine/Apex, so it is imported lazily, once, with its warnings
silenced: ``import pretrain.data`` stays fast and test runs (``filterwarnings=error``) stay
clean.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np


@functools.cache
def _module() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type:
    """Smallest storage dtype for token ids: uint16 halves the files of vocabularies < 65500."""
    return np.uint16 if vocab_size < 65500 else np.int32


def builder(prefix: str, vocab_size: int) -> Any:
    """An ``IndexedDatasetBuilder`` writing ``prefix.bin``; call ``.finalize(prefix + ".idx")``."""
    return _module().IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(vocab_size))


def open_dataset(prefix: str) -> Any:
    """A memory-mapped ``IndexedDataset`` (``.get(doc, offset, length)``, ``.sequence_lengths``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _module().IndexedDataset(prefix)


def exists(prefix: str) -> bool:
    """Both ``prefix.bin`` and ``prefix.idx`` are on disk (checked without importing megatron)."""
    return Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()
