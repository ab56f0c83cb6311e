"""Pipeline schedules from ``torch.distributed.pipelining``, by name, and the loss the last stage
computes.

Schedules (``pp`` ranks, ``v`` stages per rank, ``m`` micro-batches):

- 'gpipe' (Huang et al. 2019): all forwards, then all backwards; ``v = 1``.
- '1f1b' (PipeDream-Flush, Narayanan et al. 2021): one forward, one backward in the steady
  state; ``v = 1``.
- 'interleaved_1f1b' (Megatron-LM, Narayanan et al. 2021): ``v >= 2`` stages per rank in a
  loop, stage s on rank ``s % pp``.
- 'zero_bubble' (interleaved zero-bubble, Qi et al. 2024): as interleaved_1f1b, with the
  weight gradients split from the input gradients to fill the bubbles.
- 'zbv' (Qi et al. 2024, the V schedule): exactly 2 stages per rank in a V: rank r holds
  stages r and ``2 pp - 1 - r``, so rank 0 holds the first and the last stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
"""Schedule name (``parallel.pp_schedule``) -> torch.distributed.pipelining class."""

SINGLE_STAGE = ("gpipe", "1f1b")


def stages_of_rank(schedule: str, rank: int, pp: int, virtual_stages: int = 1) -> list[int]:
    """Stage indices (of ``pp * virtual_stages``) that ``rank`` runs, in increasing order:
    ``[rank]`` for gpipe/1f1b, the loop ``rank + k pp`` for the interleaved schedules and the V
    ``[rank, 2 pp - 1 - rank]`` for zbv. Raises ValueError on an unknown schedule or a stage
    count the schedule cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; known: {sorted(SCHEDULES)}")
    if schedule in SINGLE_STAGE:
        if virtual_stages != 1:
            raise ValueError(f"schedule {schedule!r} runs one stage per rank, got {virtual_stages}")
        return [rank]
    if schedule == "zbv":
        if virtual_stages != 2:
            raise ValueError(f"schedule 'zbv' runs exactly 2 stages per rank, got {virtual_stages}")
        return sorted([rank, 2 * pp - 1 - rank])
    if virtual_stages < 2:
        raise ValueError(f"schedule {schedule!r} needs at least 2 stages per rank, got {virtual_stages}")
    return [rank + k * pp for k in range(virtual_stages)]


def stage_ranks(schedule: str, pp: int, virtual_stages: int = 1) -> list[int]:
    """``out[s]``: the rank that runs stage s (the inverse of :func:`stages_of_rank`)."""
    out = [0] * (pp * virtual_stages)
    for r in range(pp):
        for s in stages_of_rank(schedule, r, pp, virtual_stages):
            out[s] = r
    return out


class PipelineLoss:
    """The last stage's loss of one micro-batch: the mean next-token cross-entropy the stage
    computed with its head (it receives the labels as a keyword, see :func:`step`) plus the
    layers' auxiliary loss, divided by the number of micro-batches ``n`` (the schedules then
    run with ``scale_grads=False``), so the summed gradients equal a single-process step that
    accumulates ``(loss_i / n).backward()`` over the same micro-batches.

    Called by the schedule as ``loss(outputs, labels)``: ``outputs`` the last stage's
    ``(LM loss, *carry)`` with the carry in ``keys`` order (a lone tensor when ``keys`` is
    empty); ``labels`` is not read again. ``records`` collects, per call, the detached LM loss
    under 'lm_loss' and every carry entry (fp32), for logging; :func:`step` clears it and keeps
    one entry per micro-batch.
    """

    def __init__(self, keys: list[str], n_microbatches: int) -> None:
        self.keys, self.n = list(keys), n_microbatches
        self.records: list[dict[str, Tensor]] = []

    def __call__(self, outputs: Tensor | tuple[Tensor, ...], labels: Tensor) -> Tensor:
        outputs = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
        lm, carry = outputs[0], dict(zip(self.keys, outputs[1:]))
        loss = lm + carry["aux_loss"] if "aux_loss" in carry else lm
        self.records.append({"lm_loss": lm.detach(), **{k: v.detach().float() for k, v in carry.items()}})
        return loss / self.n


def pipeline_stage(
    module: Any, device: torch.device, group: Any = None
) -> PipelineStage:
    """torch's PipelineStage of a :class:`parallel.pipeline.stage.StageModule`. Where the module's
    ``split_weight_grad`` is False, the zero-bubble schedules' input-gradient action (B) runs the
    full backward and their weight action (W) nothing: still exact, only without the overlap.
    torch splits W off by backpropagating from the intermediates it recorded in B, which misses
    gradient paths of a model that differentiates its own weights in its forward (Titans) and
    fails on a stage using RMoE's shared GRU twice (see ``build_stage``)."""
    no_split = None if module.split_weight_grad else (lambda: lambda: None)
    return PipelineStage(module, module.stage, module.n_stages, device, group=group, dw_builder=no_split)


def build_schedule(name: str, stages: list[PipelineStage], n_microbatches: int, loss_fn: PipelineLoss) -> Any:
    """The ``torch.distributed.pipelining`` schedule ``name`` over this rank's ``stages`` (in
    increasing stage order, laid out by :func:`stages_of_rank`), with ``scale_grads=False``
    (``loss_fn`` already divides by the micro-batch count). Inputs are split along the batch
    dimension; ``position_ids`` and ``labels`` go to every stage as keywords. Raises ValueError on an
    unknown name or a stage count the schedule cannot run."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    if name in SINGLE_STAGE:
        if len(stages) != 1:
            raise ValueError(f"schedule {name!r} runs one stage per rank, got {len(stages)}")
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)


def step(
    schedule: Any,
    loss_fn: PipelineLoss,
    input_ids: Tensor | None,
    labels: Tensor | None,
    position_ids: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """One forward and backward of the whole batch through ``schedule`` on this rank: the first
    stage's rank passes ``input_ids [B, T]``, the last stage's ``labels [B, T]`` (others None);
    every rank passes ``position_ids [B, T]`` when the batch is packed. Gradients accumulate
    into the stages' parameters. Returns the last stage's per-micro-batch records (see
    :class:`PipelineLoss`, the one given to :func:`build_schedule`; ``[]`` on ranks without
    the last stage)."""
    return _run(schedule.step, loss_fn, input_ids, labels, position_ids)


def _run(
    action: Any, loss_fn: PipelineLoss, input_ids: Tensor | None, labels: Tensor | None, position_ids: Tensor | None
) -> list[dict[str, Tensor]]:
    """``schedule.step`` or ``schedule.eval`` on this rank's share of the batch -> the last
    stage's per-micro-batch records."""
    loss_fn.records.clear()
    args = (input_ids,) if input_ids is not None else ()
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    if labels is not None:  # the last stage fuses its head with the loss (no logits)
        kwargs["labels"] = labels
    action(*args, target=labels, return_outputs=False, **kwargs)
    # The first step (and the first after an eval) also runs the loss once on placeholder
    # tensors to infer shapes: keep the last n records.
    return loss_fn.records[-loss_fn.n :]


def evaluate(
    schedule: Any,
    loss_fn: PipelineLoss,
    input_ids: Tensor | None,
    labels: Tensor | None,
    position_ids: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Forward only (validation) of the whole batch through ``schedule``; arguments and result
    as :func:`step`. No gradient is computed or accumulated. Each switch between training and
    evaluation makes torch infer the stages' tensor shapes again (an extra forward).

    Raises NotImplementedError for 'zbv': torch 2.13's ``eval()`` of ScheduleZBVZeroBubble still
    runs the backward actions, and the V's hand-off between the two stages of one rank fails
    there ("can't steal_bwd_input if this stage doesn't have backward")."""
    if isinstance(schedule, ScheduleZBVZeroBubble):
        raise NotImplementedError("forward-only evaluation through a 'zbv' schedule fails in torch 2.13")
    with torch.no_grad():
        return _run(schedule.eval, loss_fn, input_ids, labels, position_ids)
