"""The data pipeline: corpus -> tokenizer -> indexed token shards -> packed, resumable batches.

``import pretrain.data`` stays light (no torch, megatron or datasets): tokenizer worker
processes import this package. The loader (torch) loads on first use of its names, megatron
on first use of a shard, datasets on first use of a parquet or hub source.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pretrain.data.errors import DataError
from pretrain.data.meta import prepared_datasets, read_meta
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pretrain.data.loader import PackedLoader, cu_seqlens_from_position_ids, validation_batches

_LAZY = {
    "PackedLoader": "pretrain.data.loader",
    "validation_batches": "pretrain.data.loader",
    "cu_seqlens_from_position_ids": "pretrain.data.loader",
}

__all__ = [
    "DataError",
    "Tokenizer",
    "prepare",
    "read_meta",
    "PackedLoader",
    "prepared_datasets",
    "validation_batches",
    "cu_seqlens_from_position_ids",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pretrain.data' has no attribute {name!r}")
