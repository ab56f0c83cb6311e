"""AdamW with decay only on matrices, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices; none on norms, biases, embeddings
    and the parameters a module lists in its ``no_weight_decay`` attribute (e.g. Mamba's
    A_log). A module attribute, not a parameter one, so it survives FSDP's re-wrapping."""
    exempt = set()
    for module in model.modules():
        names = getattr(module, "no_weight_decay", ())
        exempt |= {id(p) for n, p in module.named_parameters(recurse=False) if n in names}
        if isinstance(module, nn.Embedding):
            exempt.add(id(module.weight))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in exempt else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch offers it (CUDA) unless optim.fused says otherwise."""
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step ``step``; a run takes steps ``0 .. max_steps - 1``.

    End points (W = ``cfg.warmup_steps``, floor = ``cfg.lr * cfg.min_lr_ratio``):

    - warmup: steps ``0 .. W-1`` rise linearly, ``lr * (step + 1) / W``: step 0 trains at
      ``lr / W`` and step ``W - 1`` at the peak (no warmup when W = 0);
    - cosine: half a cosine from the peak at step W down to the floor at the last step;
    - wsd (warmup-stable-decay): the peak until the last ``n = round(decay_fraction * max_steps)``
      steps (at least 1, at most all post-warmup steps), which step down linearly, each one
      ``(peak - floor) / n`` lower, the last at the floor;
    - linear: a straight line from the peak at step W to 0 at the last step (decay to zero).

    So the last step, ``max_steps - 1``, always trains at the schedule's final value, as in
    torchtitan and Megatron; a step past the end (a resumed run with a smaller max_steps) keeps
    it. A single post-warmup step is the last step. Raises ``ValueError`` when
    ``warmup_steps >= max_steps`` (the config check names the field first).
    """
    if cfg.warmup_steps >= max_steps:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be < max_steps={max_steps}")
    peak = cfg.lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    floor = 0.0 if cfg.schedule == "linear" else peak * cfg.min_lr_ratio
    last = max_steps - 1
    if cfg.schedule == "wsd":
        start = max(cfg.warmup_steps, max_steps - max(1, round(cfg.decay_fraction * max_steps)))
        if step < start:
            return peak
        # every decay step is below the peak: step start at 1/n of the way, the last at the floor
        return peak + (floor - peak) * min(1.0, (step - start + 1) / (max_steps - start))
    progress = 1.0 if step >= last else (step - cfg.warmup_steps) / (last - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
