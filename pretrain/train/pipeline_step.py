"""The training loop of one pipeline rank (parallel.pp > 1): the :class:`Trainer` with its model
replaced by this rank's stages and its step by a ``torch.distributed.pipelining`` schedule,
optionally with FSDP2 (parallel.dp_shard) or HSDP (with parallel.dp_replicate) inside every stage.

What changes against one process, and why the numbers stay the same:

- **Model.** The rank builds only its stages (:func:`parallel.pipeline.stage.build_stage`, cut
  where ``parallel.pp_split`` or the cost planner says) and gathers their modules in a
  :class:`LocalModel` whose parameter names are the single-process ones, so the optimizer, the
  DCP checkpoint and the resume checks see the one-process names: one checkpoint whatever the
  layout. A parameter held by several stages (the tied embedding on the last stage, RMoE's GRU)
  is one entry per rank; DCP writes one copy of equal-named replicated tensors, and a load fills
  every copy.
- **Step.** A step runs ``dims.grad_accum(train)`` pipeline rounds of ``dims.pp_microbatches``
  micro-batches; each micro-batch's loss is divided by their total count, as one process's
  accumulation divides by its micro-batch count. Then the shared copies' gradients are summed
  (:class:`~parallel.pipeline.stage.SharedParamSync`), clipped by the global norm across stages,
  and the optimizer steps.
- **Data.** Every rank of one pipeline reads the same slice of the global batch (its
  data-parallel rank's; dp = 1: the whole batch); the first stage uses the input ids, the last
  the labels, all the position ids.
- **FSDP2.** Each block of a stage is its own FSDP unit over 'dp_shard' (HSDP: over the 2-D
  ('dp_replicate', 'dp_shard') submesh), the stage module the root (torch's PipelineStage then
  reduces the gradients once per schedule step); shared copies are summed shard by shard, and
  the clipping norm sums every shard once (over one replica's ranks).
- **Context parallelism** (parallel.cp): every stage of a rank runs on its segments of each
  sequence (the micro-batches are cut before the schedule splits them), and FSDP2 shards and
  averages over dp_shard x cp, as in the :class:`Trainer`.
- **Expert parallelism** (parallel.ep): each stage's MoE experts are sharded over the stage's
  ep group (inner ep ranks of its 'dp_shard'), FSDP2 ignores them and their gradients are
  averaged over the ranks holding the same experts before clipping, as in the
  :class:`Trainer` (parallel/expert.py). An ep group's balance loss uses the load of its ranks'
  current micro-batches.
- **Logs.** The last stages hold the losses and the layers' metrics; rank 0 gets their mean over
  the data-parallel replicas.
- **Validation** runs forward only through the schedule; a 'zbv' run skips it (torch 2.13 cannot
  evaluate through that schedule) and says so once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


from parallel.activation_checkpoint import apply_activation_checkpoint_to_stage
from parallel.context import apply_context_parallel
from parallel.data import apply_fsdp, fsdp_mesh
from parallel.expert import average_expert_grads, parallelize_experts
from parallel.pipeline.schedule import (
    PipelineLoss, build_schedule, evaluate, pipeline_stage, stage_ranks, stages_of_rank, step,
)
from parallel.pipeline.split import plan_split
from parallel.tensor.region import apply_tp
from pretrain.config import ConfigError
from pretrain.data import validation_batches
from pretrain.models import build_model
from pretrain.train import checkpoint as ckpt
from pretrain.train import resume_checks
from pretrain.train.optim import lr_at, set_lr
from pretrain.train.trainer import Trainer, token_loss_sum

_MODULES = ("embed", "norm", "head", "router_gru")


class LocalModel(nn.Module):
    """The modules of this rank's stages under their single-process names (``blocks.<i>``,
    ``embed``, ``norm``, ``head``, ``router_gru``); not callable, the schedule runs the stages.
    When two local stages hold a copy of one shared module, the first is registered and
    :meth:`sync_copies` copies its values into the others. When they hold the two halves of one
    block (a 'zbv' rank's two stages meeting at a cut inside a block), ``blocks.<i>`` is a
    container of both halves' modules."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        blocks: dict[int, nn.Module] = {}
        self.copies: list[tuple[nn.Module, nn.Module]] = []
        for stage in stages:
            model = stage.model
            for k, block in model.blocks.items():
                blocks[int(k)] = _join_halves(blocks[int(k)], block) if int(k) in blocks else block
            for name in _MODULES:
                module = getattr(model, name, None)
                if module is None:
                    continue
                if name in self._modules:
                    self.copies.append((self._modules[name], module))
                else:
                    setattr(self, name, module)
        self.blocks = nn.ModuleDict({str(i): blocks[i] for i in sorted(blocks)})

    @torch.no_grad()
    def sync_copies(self) -> None:
        """Copy the registered modules' parameters into their second local copies."""
        for src, dst in self.copies:
            for p, q in zip(src.parameters(), dst.parameters()):
                q.copy_(p)


def _join_halves(a: nn.Module, b: nn.Module) -> nn.Module:
    """One module holding the submodules of two stages' halves of a block, under their names."""
    joined = nn.Module()
    for name, child in (*a.named_children(), *b.named_children()):
        joined.add_module(name, child)
    return joined


class PipelineTrainer(Trainer):
    """:class:`Trainer` for parallel.pp > 1; see the module docstring."""

    def _check_layout(self, cfg) -> None:
        if cfg.train.compile:
            raise ConfigError("train.compile: not supported with parallel.pp > 1 yet; set train.compile=false")

    def _build_model(self) -> nn.Module:
        from parallel.pipeline.stage import SharedParamSync, build_stage, shared_holders

        cfg, p = self.cfg, self.cfg.parallel
        split = plan_split(cfg.model, p, cfg.data.seq_len, cfg.train.micro_batch_size)
        self.cuts = [0, *split.cuts]
        self.pp_rank = self.rank // (self.dims.dp * self.dims.cp * self.dims.tp)
        n_stages = p.n_stages
        ranks = stage_ranks(p.pp_schedule, p.pp, p.pp_virtual_stages)
        self.stages = [
            build_stage(cfg.model, self.cuts, s, cfg.train.seed, self.device)
            for s in stages_of_rank(p.pp_schedule, self.pp_rank, p.pp, p.pp_virtual_stages)
        ]
        if self.tp_mesh is not None:
            for m in self.stages:
                apply_tp(m.model, self.tp_mesh, self.dims.sequence_parallel, self.dims.ep)
        if self.dims.ep > 1:  # each stage's experts over its ep group, before FSDP, which ignores them
            ep_mesh = self.dims.build_ep_mesh(self.device.type)
            self.expert_params = tuple(p for m in self.stages for p in parallelize_experts(m.model, ep_mesh))
        for m in self.stages:  # after TP, before FSDP, as in one process
            apply_activation_checkpoint_to_stage(m, p.activation_checkpoint)
        # rank = ((pp_rank x dp + dp_rank) x cp + cp_rank) x tp + tp_rank (pp outermost): column j
        # of the grid is pipeline j
        pipelines = self.mesh.mesh.reshape(p.pp, -1).T.tolist()
        pp_group = self.mesh["pp"].get_group()
        if self.dims.dp * self.dims.cp > 1:
            # HSDP: the 2-D (dp_replicate, dp_shard) submesh shards within and replicates across;
            # context-parallel ranks shard too (dp_shard x cp)
            dp_mesh = fsdp_mesh(self.mesh, self.dims)
            for m in self.stages:  # each block its own FSDP unit, the rest with the stage (root)
                apply_fsdp(m, dp_mesh, ignored_params=set(self.expert_params) or None)
        if self.dims.cp > 1:  # one split for the rank's stages: each forward orders its own exchanges
            lb = cfg.parallel.load_balanced(cfg.model.pattern())
            self.cp_split = apply_context_parallel(self.stages[0], self.mesh["cp"].get_group(), lb)
            for m in self.stages[1:]:
                m.model.sequence_split = self.cp_split
        self.is_first = any(m.is_first for m in self.stages)
        self.is_last = any(m.is_last for m in self.stages)
        last = next((m for m in self.stages if m.is_last), None)
        self.n_micro = self.dims.pp_microbatches
        # every micro-batch of the step divides its loss by their total count, as one process does
        self.loss_fn = LabelledLoss(last.out_keys if last is not None else [], self.n_micro * self.grad_accum)
        pipe_stages = [pipeline_stage(m, self.device, group=pp_group) for m in self.stages]
        self.schedule = build_schedule(p.pp_schedule, pipe_stages, self.n_micro, self.loss_fn)
        holders = shared_holders(cfg.model, self.cuts, ranks)
        self.shared_sync = SharedParamSync(self.stages, holders, pp_group, pipelines)
        self._eval_skipped = False
        with torch.device("meta"):
            self._full = build_model(cfg.model)  # names and shapes only, for the resume checks
        self.log(f"pipeline: {p.pp_schedule}, {n_stages} stages starting at layers {self.cuts}")
        return LocalModel(self.stages)

    def num_params(self) -> int:
        return sum(p.numel() for p in self._full.parameters())

    # ---------------------------------------------------------- checkpoints

    def _check_resumable(self, path) -> None:
        resume_checks.check_data_order(path, self.cfg)
        resume_checks.check_prepared_data(path, self.cfg, self.meta)
        resume_checks.check_model_fits(path, self._full, self.cfg)
        self._resumed_from = path

    def _resume(self, mode: str) -> None:
        super()._resume(mode)
        self.model.sync_copies()

    def _init_from(self, path) -> None:
        resume_checks.check_model_fits(ckpt.resolve_checkpoint(path), self._full, self.cfg)
        state = ckpt.load_model_weights(path, self.model, self.meta["tokenizer_sha256"])
        self.model.sync_copies()
        self.log(f"initialised from the model weights of {path} (its step {state['step']})")

    # -------------------------------------------------------------- running

    def _round(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One pipeline round's inputs: ``n_micro`` micro-batches (each cut to this rank's
        segments under context parallelism) concatenated along the batch."""
        batches = [self._local(b) for b in batches]
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}

    def _run(self, fn, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        ids = batch["input_ids"] if self.is_first else None
        labels = batch["labels"] if self.is_last else None
        with self._autocast():
            fn(self.schedule, self.loss_fn, ids, labels, batch["position_ids"])
        # the first round after a switch of mode also runs the loss on shape-inference tensors
        return self.loss_fn.records[-self.n_micro :] if self.is_last else []

    def train_step(self) -> dict[str, Any]:
        micro_batches = self._next_batches()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        set_lr(self.optimizer, lr)
        records: list[dict[str, torch.Tensor]] = []
        for r in range(self.grad_accum):
            records += self._run(step, self._round(micro_batches[r * self.n_micro : (r + 1) * self.n_micro]))
        from parallel.pipeline.stage import clip_grad_norm_

        self.shared_sync.sync()
        average_expert_grads(self.expert_params)  # FSDP2 reduced all the others
        clip = self.cfg.train.grad_clip
        # over every rank: each (stage, shard) counted once, replicas divided out (parallel/grad_norm.py)
        norm = clip_grad_norm_(self.stages, clip if clip > 0 else math.inf)
        # the last stages hold the loss; a skipped step leaves every copy as it was
        loss = sum(r["lm_loss"].detach().float() for r in records) / len(records) if records else None
        if self._agree(loss, norm):
            self.optimizer.step()
            self.model.sync_copies()
        self._zero_grad()
        self.step += 1
        self._account(norm)
        stats: dict[str, Any] = {"grad_norm": norm, "lr": lr, "records": records}
        return stats

    def _zero_grad(self) -> None:
        # the stages', not only the optimizer's: a second local copy of a shared module is not
        # in the optimizer, and its gradient would otherwise add up over the steps
        for m in self.stages:
            m.zero_grad(set_to_none=True)

    def _reduce(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The last stage's mean LM loss, auxiliary loss and metrics over the step's micro-batches
        (and over the data-parallel ranks), as one process averages them; every rank gets them,
        rank 0 logs them."""
        record: dict[str, Any] = {}
        if self.is_last:
            records = stats["records"]
            n = len(records)
            record["loss"] = sum(r["lm_loss"].float() for r in records).item() / n
            for key in records[0]:
                if key == "aux_loss" or key.startswith("metric/"):
                    value = sum(r[key] for r in records) / n
                    record[key.removeprefix("metric/")] = value.item() if value.ndim == 0 else value.tolist()
        record = _mean_of_last_stages(record)
        return {"loss": record.pop("loss"), "grad_norm": stats["grad_norm"].item(), "lr": stats["lr"],
                "skipped_steps": self.health.skipped, **record}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The validation loss through the pipeline (forward only) and its perplexity, as
        :meth:`Trainer.evaluate`: the same tokens as one process (the fixed set in rounds of
        pp_microbatches micro-batches, padded with fully masked rows), each micro-batch's mean
        weighted by its counted tokens, sums reduced over the ranks. {} under 'zbv'."""
        if self.cfg.parallel.pp_schedule == "zbv":
            if not self._eval_skipped:
                self.log("validation skipped: torch 2.13 cannot run forward-only through a 'zbv' schedule")
                self._eval_skipped = True
            return {}
        if self._val_batches is None:
            cfg = self.cfg
            self._val_batches = validation_batches(
                cfg.data.dir, cfg.data.seq_len, cfg.train.eval_samples, cfg.train.micro_batch_size * self.n_micro,
                self.dp_rank, self.dims.dp,
            )
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros_like(nats)
        for batch in self._val_batches:
            for r in self._run(evaluate, self._round([batch])):  # the last stage's records, else none
                s, n = token_loss_sum(r["lm_loss"], r["labels"])
                nats += s
                tokens += n
        loss = self._token_mean(nats, tokens)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


class LabelledLoss(PipelineLoss):
    """:class:`PipelineLoss` whose records also keep each micro-batch's labels (under 'labels'),
    so that validation weights each micro-batch's mean loss by its counted tokens whatever
    order the schedule runs the micro-batches in."""

    def __call__(self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        loss = super().__call__(outputs, labels)
        self.records[-1]["labels"] = labels
        return loss


def _mean_of_last_stages(record: dict[str, Any]) -> dict[str, Any]:
    """The mean of the ranks' ``record`` (numbers or lists of numbers) over the ranks that give
    a non-empty one (the last stage of every data-parallel replica: equal shares of the batch),
    on every rank. Collective; once per logged step, so an object gather is cheap enough."""
    gathered: list[dict[str, Any]] = [{}] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    parts = [r for r in gathered if r]
    out: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, list):
            out[key] = [sum(vals) / len(parts) for vals in zip(*(r[key] for r in parts))]
        else:
            out[key] = sum(r[key] for r in parts) / len(parts)
    return out
