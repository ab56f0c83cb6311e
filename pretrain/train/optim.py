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
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup is linear from lr/warmup to lr. Then:
    - cosine: cosine from lr to lr*min_lr_ratio at max_steps;
    - wsd: constant lr, then a linear decay to lr*min_lr_ratio over the last decay_fraction;
    - linear: linear from lr to 0 at max_steps.
    """
    peak = cfg.lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    floor = peak * cfg.min_lr_ratio
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return peak * (1 - progress)
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return peak
    frac = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return peak + (floor - peak) * frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
