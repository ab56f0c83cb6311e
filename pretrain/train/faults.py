"""Surviving failures in the training loop: non-finite steps skipped and counted, loss spikes
logged, preemption signals agreed across ranks at a step boundary, slow ranks named.

One small all-reduce per step (:func:`agree_step`) carries everything the ranks must decide
together before the optimizer steps: the step's loss (for spike detection), whether any rank saw
a non-finite loss, and whether any rank received a preemption signal. The gradient norm is
already global, so a non-finite norm is seen by every rank alike.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM (a scheduler's or torchrun's stop) and SIGUSR1 (slurm's ``--signal=USR1@<seconds>``)."""


class DivergenceError(RuntimeError):
    """Training produced train.max_skipped_steps consecutive non-finite steps (or, under
    DeepSpeed, a non-finite step that was applied); no checkpoint was written from it."""


class Preemption:
    """Context manager that records SIGTERM / SIGUSR1 instead of dying, so the loop can finish
    its step, checkpoint and exit 0 (:attr:`received` is the signal's name, or None). Outside
    the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "Preemption":
        try:
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _collective_device() -> torch.device:
    """Where a small tensor for a collective on the default group must live: NCCL reduces only
    CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_step(loss: torch.Tensor | None, stop_requested: bool) -> tuple[float, bool, bool, float]:
    """The ranks' common view of a step, before its update is applied. Collective when
    torch.distributed is initialised.

    ``loss``: this rank's mean loss of the step (a scalar tensor), or None on a rank that holds
    no loss (a pipeline rank without the last stage). ``stop_requested``: this rank received a
    preemption signal. Returns (mean loss over the ranks holding one (NaN when non-finite),
    whether any rank's loss is non-finite, whether any rank asked to stop, seconds this rank
    waited in the reduction: the time the others took longer to get there)."""
    finite = loss is None or bool(torch.isfinite(loss).item())
    value = torch.tensor(
        [float(loss.item()) if loss is not None and finite else 0.0,
         float(loss is not None), float(not finite), float(stop_requested)],
        dtype=torch.float64,
        device=_collective_device(),
    )
    started = time.perf_counter()
    if dist.is_initialized():
        dist.all_reduce(value)  # SUM; the flags are counts of ranks
    total, holders, nonfinite, stop = value.tolist()  # waits for the reduction
    waited = time.perf_counter() - started
    mean = total / holders if holders and not nonfinite else math.nan
    return mean, nonfinite > 0, stop > 0, waited


class StepHealth:
    """Counts skipped (non-finite) steps and watches for loss spikes.

    ``max_skipped``: consecutive skips that stop the run (train.max_skipped_steps).
    ``spike_factor``: a loss above this many times the running mean of the last ``window``
    applied steps' losses is logged (train.loss_spike_factor; 0 disables), once at least
    min(10, window) losses were seen."""

    def __init__(self, max_skipped: int, spike_factor: float, log: Callable[[str], None], window: int = 100):
        self.max_skipped = max_skipped
        self.spike_factor = spike_factor
        self.log = log
        self.skipped = 0
        """Skipped steps of the whole run (kept in checkpoints)."""
        self.consecutive = 0
        self.recent: deque[float] = deque(maxlen=window)

    def skip(self, step: int, reason: str, where: str) -> None:
        """Record that ``step`` (1-based) was not applied; raises DivergenceError at the
        max_skipped-th consecutive one. ``where``: the checkpoint folder, for the message."""
        self.skipped += 1
        self.consecutive += 1
        self.log(f"step {step}: {reason}; the update was skipped ({self.consecutive} in a row, {self.skipped} in all)")
        if self.consecutive >= self.max_skipped:
            raise DivergenceError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradient "
                f"(train.max_skipped_steps={self.max_skipped}); stopped without writing a checkpoint; "
                f"resume from the newest one in {where} with a lower optim.lr or a smaller train.grad_clip"
            )

    def applied(self, step: int, loss: float) -> None:
        """Record the loss of an applied step; logs it when it spikes above the running mean."""
        self.consecutive = 0
        if self.spike_factor > 0 and len(self.recent) >= min(10, self.recent.maxlen):
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                self.log(
                    f"step {step}: loss spike: {loss:.4g} is {loss / mean:.1f}x the mean {mean:.4g} of the "
                    f"last {len(self.recent)} steps (train.loss_spike_factor={self.spike_factor:g})"
                )
        self.recent.append(loss)


def rank_step_times(seconds: float) -> list[float]:
    """Every rank's ``seconds`` (its mean busy time per step over the log window), in rank order.
    Collective when torch.distributed is initialised."""
    if not dist.is_initialized():
        return [seconds]
    times = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=_collective_device())
    times[dist.get_rank()] = seconds
    dist.all_reduce(times)
    return times.tolist()


def slow_ranks(times: list[float], factor: float) -> list[int]:
    """Ranks whose step time exceeds ``factor`` x the median of ``times`` (none when factor is 0)."""
    if factor <= 0 or len(times) < 2:
        return []
    median = statistics.median(times)
    return [r for r, t in enumerate(times) if t > factor * median]
