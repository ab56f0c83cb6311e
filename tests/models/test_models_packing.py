"""A packed sample gives the same logits as each of its documents alone (doc masking)."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import build_model

ROWS = [[5, 11], [3, 6, 7]]  # document lengths of the two packed rows (T = 16)


def _packed_batch(vocab):
    g = torch.Generator().manual_seed(0)
    docs = [[torch.randint(0, vocab, (n,), generator=g) for n in row] for row in ROWS]
    ids = torch.stack([torch.cat(row) for row in docs])  # [2, 16]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    return docs, ids, positions


@pytest.mark.parametrize("pattern", ["attn", "swa", "mamba", "mamba swa attn"])
def test_packed_equals_separate(make_cfg, pattern):
    cfg = make_cfg(pattern, n_layers=3, init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    docs, ids, positions = _packed_batch(cfg.vocab_size)
    with torch.no_grad():
        packed = model(ids, positions)  # [2, 16, V]
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = model(doc[None])[0]
                got = packed[b, start : start + len(doc)]
                assert (got - alone).abs().max() <= 1e-5 * max(1.0, alone.abs().max().item())
                start += len(doc)
        # sanity: without doc masking the later documents do see their predecessors
        cfg.doc_masking = False
        leaky = model(ids, positions)
        assert (leaky[1, 3:] - packed[1, 3:]).abs().max() > 1e-3


def test_position_ids_ignored_without_doc_masking(make_cfg):
    cfg = make_cfg(doc_masking=False)
    model = build_model(cfg)
    _, ids, positions = _packed_batch(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, positions), model(ids))
