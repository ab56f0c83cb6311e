"""The training loop with DeepSpeed ZeRO data parallelism (parallel.dp_backend = 'deepspeed'):
the :class:`Trainer` with its model and AdamW handed to a DeepSpeed engine
(:mod:`parallel.deepspeed`).

What changes against FSDP, and what does not:

- **Setup.** The model is built whole from the seed on every rank, as for FSDP; a resumed or
  ``--init-from`` checkpoint is loaded into it (and into the plain AdamW) as one process would,
  and only then is the pair wrapped: ZeRO takes its master weights from the loaded model and
  the loaded AdamW moments are scattered into its partitions.
- **Step.** The same micro-batch loop and loss; backward goes through the engine, which reduces
  the gradients at the last micro-batch (stage 1) or as they are produced (stages 2 and 3), and
  the engine clips to train.grad_clip and steps our AdamW, whose lr the schedule has set. A
  non-finite gradient norm skips the step in DeepSpeed, counted as a skipped step here (a
  non-finite step DeepSpeed applied raises DivergenceError).
- **Checkpoints.** The same DCP step folder under the single-process parameter names: the
  whole model (ZeRO-3 gathers it) and the whole AdamW state (step, exp_avg, exp_avg_sq, the
  groups' hyperparameters), so FSDP, a pipeline or one process resume it, and this trainer
  resumes theirs. Every rank holds the whole state while saving or loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from parallel import deepspeed as ds
from pretrain.models import build_model
from pretrain.train.faults import DivergenceError
from pretrain.train.optim import build_optimizer
from pretrain.train.trainer import Trainer, resolve_device


class DeepSpeedTrainer(Trainer):
    """:class:`Trainer` whose data parallelism is a DeepSpeed ZeRO engine (parallel.zero_stage,
    parallel.zero_offload)."""

    def __init__(self, cfg, resume: str = "auto", log=print, init_from: str | None = None):
        # first: a missing package is a one-line config error before any data is prepared
        self._deepspeed = ds.import_deepspeed(resolve_device(cfg))
        super().__init__(cfg, resume=resume, log=log, init_from=init_from)
        self.module = self.model
        loaded = {n: self.optimizer.state.pop(p) for n, p in self.module.named_parameters() if p in self.optimizer.state}
        self.optimizer.state.clear()
        self.engine = ds.initialize(
            self._deepspeed, self.cfg, self.module, self.optimizer, self.dims.dp, self.grad_accum
        )
        ds.load_optimizer_state(self.engine, loaded)
        self.model = self.engine
        self.log(
            f"DeepSpeed ZeRO-{self.cfg.parallel.zero_stage}"
            + (" with the optimizer offloaded to the CPU" if self.cfg.parallel.zero_offload else "")
            + f" over {self.dims.dp} rank(s)"
        )

    def _build_model(self) -> nn.Module:
        model = build_model(self.cfg.model)
        model.to(self.device)
        if self.cfg.train.compile:
            for name, block in model.blocks.items():
                model.blocks[name] = torch.compile(block)
        self.mesh = None  # no FSDP: DeepSpeed reduces over its own (the world) process group
        return model

    def num_params(self) -> int:
        # ZeRO-3 leaves empty tensors in the module; ds_numel is the whole size
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())

    def _backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the count

    def _optimizer_step(self, total: torch.Tensor) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        finite = self._agree(total, norm)
        if not self.engine.was_step_applied():
            return torch.tensor(float("nan"))  # counted as skipped
        if not finite:  # the update is in the weights: skipping is no longer possible
            raise DivergenceError(
                f"step {self.step + 1}: DeepSpeed applied a step with a non-finite loss or gradient; "
                f"resume from the newest checkpoint in {self.ckpt_root}"
            )
        return norm

    def save(self) -> Path:
        """The project's checkpoint (see :mod:`pretrain.train.checkpoint`) of the whole model and
        AdamW state, gathered from the ZeRO partitions. Collective."""
        names = [n for n, _ in self.module.named_parameters()]
        state = ds.full_optimizer_state(self.engine, names)
        with ds.gathered_parameters(self.engine) as module:
            whole = build_optimizer(module, self.cfg.optim, self.device)
            for group, live in zip(whole.param_groups, self.optimizer.param_groups):
                group["lr"] = live["lr"]
            for name, p in module.named_parameters():
                if name in state:
                    whole.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state[name].items()}
            engine_model, engine_optimizer = self.model, self.optimizer
            self.model, self.optimizer = module, whole
            try:
                return super().save()
            finally:
                self.model, self.optimizer = engine_model, engine_optimizer
