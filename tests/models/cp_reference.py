"""The context-parallel reference: a model run on whole sequences against the same model whose
rows are the segments of a :class:`~pretrain.models.sequence_split.SequenceSplit` (one process
holding all of them, or one rank holding some), compared in loss and every gradient."""

from __future__ import annotations

import torch

from pretrain.models.hybrid import HybridLM
from pretrain.models.sequence_split import SequenceSplit


def packed_positions(batch: int, seq: int, starts: list[int]) -> torch.Tensor:
    """``[batch, seq]`` int64 position ids of packed documents starting at ``starts`` (and 0);
    row b shifts them by b so the rows differ."""
    pos = torch.empty(batch, seq, dtype=torch.long)
    for b in range(batch):
        cuts = sorted({0, *((s + b) % seq for s in starts)})
        for a, e in zip(cuts, [*cuts[1:], seq]):
            pos[b, a:e] = torch.arange(e - a)
    return pos


def loss_and_grads(
    model: HybridLM, ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor | None,
    split: SequenceSplit | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over this process's tokens (with ``split``: its rows of the batch) plus
    the auxiliary losses, and every parameter's gradient of it."""
    model.zero_grad(set_to_none=True)
    model.sequence_split = split
    try:
        if split is not None:
            ids, labels = split.shard(ids), split.shard(labels)
            pos = None if pos is None else split.shard(pos)
        loss, aux = model(ids, position_ids=pos, labels=labels, return_aux=True)
        total = loss + aux.get("aux_loss", 0)
        total.backward()
    finally:
        model.sequence_split = None
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads
