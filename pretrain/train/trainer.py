"""The training loop: one process, or one rank of a torchrun/slurm job (FSDP2 over dp); with
parallel.pp > 1 the PipelineTrainer of pretrain/train/pipeline_step.py runs instead."""

from __future__ import annotations

import math
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.activation_checkpoint import apply_activation_checkpoint
from parallel.context import apply_context_parallel
from parallel.data import apply_fsdp, fsdp_mesh
from parallel.expert import average_expert_grads, parallelize_experts
from parallel.grad_norm import clip_grad_norm_
from parallel.meta_init import materialise_sharded
from parallel.tensor.region import apply_tp
from parallel.dims import ParallelDims, destroy_distributed, init_distributed
from pretrain.config import Config, ConfigError
from pretrain.data import PackedLoader, prepare, prepared_datasets, read_meta, validation_batches
from pretrain.data.tokenizer import tokenizer_file
from pretrain.models import build_model, flops_per_token
from pretrain.train import checkpoint as ckpt
from pretrain.train import resume_checks
from pretrain.train.faults import DivergenceError, Preemption, StepHealth, agree_step, rank_step_times, slow_ranks
from pretrain.train.metrics import MetricsLogger
from pretrain.train.mfu import MFU, peak_flops
from pretrain.train.optim import build_optimizer, lr_at, set_lr


__all__ = ["DivergenceError", "Trainer", "train"]


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but CUDA is not available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of materialised logits [B, T, V] against labels [B, T]: the
    reference the tests hold the model's fused loss (``model(..., labels=)``) against."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def token_loss_sum(mean_loss: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed token losses and the counted tokens (fp64 scalars) of a micro-batch, from its
    ``mean_loss`` (scalar, mean over the labels [B, T] != -100, as the model returns it). A batch
    of only -100 labels (validation padding) gives 0 and 0, not 0 * NaN."""
    count = (labels != -100).sum().to(torch.float64)
    return torch.where(count > 0, mean_loss.detach().to(torch.float64) * count, 0.0), count


class Trainer:
    """Owns model, optimizer, data and checkpoints of one rank (without pipeline parallelism;
    :class:`~pretrain.train.pipeline_step.PipelineTrainer` runs parallel.pp > 1)."""

    expert_params: tuple[nn.Parameter, ...] = ()
    """The expert weights that parallel.ep > 1 shards (:meth:`_apply_ep`); FSDP2 ignores them."""

    def __init__(self, cfg: Config, resume: str = "auto", log=print, init_from: str | None = None):
        """``resume``: 'auto' (the run's newest usable checkpoint, if any), 'none' or a step
        folder. ``init_from``: a checkpoint whose model weights start the run when it has none of
        its own to resume (see :func:`~pretrain.train.checkpoint.load_model_weights`)."""
        self.device = resolve_device(cfg)
        t = cfg.train
        self.rank, local_rank, world = init_distributed(self.device.type, t.collective_timeout_s)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        self.dims = ParallelDims.from_config(cfg.parallel, world, t)
        self._check_layout(cfg)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.dp_rank = self.dims.dp_rank(self.rank)
        self.tp_mesh = self.mesh["tp"] if self.dims.tp > 1 else None
        # FSDP2 wraps the whole model here (the pipeline trainer shards its stages itself)
        self.fsdp = self.dims.dp * self.dims.cp > 1 and cfg.parallel.dp_backend == "fsdp" and self.dims.pp == 1
        self.cp_split = None  # context parallelism's split of each batch (set in _build_model)
        self.main = self.rank == 0
        self.log = log if self.main else (lambda *_: None)
        dp = self.dims.dp
        self.grad_accum = self.dims.grad_accum(t)
        self.log(self.dims.describe_batch(t))

        self.ckpt_root = cfg.checkpoint_dir
        self.run_dir = Path(cfg.run.dir)
        if init_from is not None and resume not in ("auto", "none"):
            raise ConfigError(f"--init-from: starts a new run; it cannot be combined with --resume {resume}")
        self._check_resume_config(cfg, resume)  # before prepare, which may rewrite data.dir
        self.meta = self._prepare_data(cfg)
        self.tokenizer_path = tokenizer_file(cfg.data.dir)
        if cfg.model.vocab_size and cfg.model.vocab_size < self.meta["vocab_size"]:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {self.meta['vocab_size']}"
            )
        self.cfg = cfg = cfg.with_vocab(self.meta["vocab_size"])

        torch.manual_seed(t.seed)
        self.dtype = compute_dtype(cfg, self.device)
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.loader = PackedLoader(
            prepared_datasets(cfg.data.dir, "train", cfg.data.weights or None),
            seq_len=cfg.data.seq_len,
            seed=t.seed,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=dp,
        )
        self._val_batches: list[dict[str, torch.Tensor]] | None = None
        self.step = 0
        self.health = StepHealth(t.max_skipped_steps, t.loss_spike_factor, self.log)
        self.preemption = Preemption()
        self._stop = False  # a rank received a preemption signal (agreed at the last step boundary)
        self._waited = 0.0  # seconds this rank waited for the others at the last step boundary
        self._data_seconds = 0.0  # seconds spent reading batches since the last logged step
        self._step_loss = math.nan
        self._checkpointer = ckpt.Checkpointer(cfg.checkpoint.async_save)
        self._resume(resume)
        if self.step == 0 and init_from is not None:
            self._init_from(Path(init_from))
        if self.main:  # only now: a refused resume leaves the run folder as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(cfg.to_toml())
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
        self.mfu = MFU(*peak_flops(self.device, t.peak_flops), fpt, self.dims.world_size, self.log)

    # ------------------------------------------------------------------ setup

    def _check_layout(self, cfg: Config) -> None:
        if self.dims.pp > 1:
            raise ConfigError("parallel.pp: this Trainer runs no pipeline stages; use pretrain.train.trainer.train()")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _prepare_data(self, cfg: Config) -> dict[str, Any]:
        """Rank 0 prepares the data when it is missing; the others wait and read meta.json."""
        if self.main:
            prepare(cfg.data, log=self.log)
        if dist.is_initialized():
            dist.barrier()
        return read_meta(cfg.data.dir)

    def _build_model(self) -> nn.Module:
        # Built on the meta device, the plans applied in torchtitan's order (TP -> activation
        # checkpointing -> compile -> FSDP), then materialised one init unit at a time: a rank
        # holds its shards plus one whole unit, and every layout starts from the weights of a
        # single process of the same seed (drawn on the CPU, as a CPU build: on any device).
        # Expert parallelism's experts are DTensors of the global shape: they fill like the rest.
        with torch.device("meta"):
            model = build_model(self.cfg.model)
        if self.tp_mesh is not None:
            apply_tp(model, self.tp_mesh, self.dims.sequence_parallel, self.dims.ep)
        self.expert_params = self._apply_ep(model)  # expert parallelism: before FSDP, which ignores them
        apply_activation_checkpoint(model, self.cfg.parallel.activation_checkpoint)  # before compile, FSDP
        if self.cfg.train.compile:
            for name, block in model.blocks.items():
                model.blocks[name] = torch.compile(block)
        if self.fsdp:
            apply_fsdp(model, fsdp_mesh(self.mesh, self.dims), ignored_params=set(self.expert_params) or None)
        model = materialise_sharded(model, self.cfg.model, self.cfg.train.seed, self.device, torch.device("cpu"))
        if self.dims.cp > 1:
            lb = self.cfg.parallel.load_balanced(self.cfg.model.pattern())
            attention = self.cfg.parallel.cp_attention
            self.cp_split = apply_context_parallel(model, self.mesh["cp"].get_group(), lb, attention)
        return model

    def _apply_ep(self, model: nn.Module) -> tuple[nn.Parameter, ...]:
        """With parallel.ep > 1, shard the MoE experts over the 'ep' ranks as DTensors
        (parallel/expert.py); returns their Parameters (none without ep), whose gradients
        :meth:`_optimizer_step` averages over the ranks holding the same experts."""
        if self.dims.ep == 1:
            return ()
        return tuple(parallelize_experts(model, self.dims.build_ep_mesh(self.device.type)))

    def _check_resume_config(self, cfg: Config, mode: str) -> None:
        """Refuse, before anything is written, a resume whose config changes the data order the
        checkpoint's position counts in (see :func:`~pretrain.train.resume_checks.check_data_order`)."""
        if mode == "none":
            if ckpt.complete_steps(self.ckpt_root):
                raise ConfigError(
                    f"checkpoint.dir: {self.ckpt_root} already holds checkpoints; "
                    "resume with --resume auto or choose another run.dir"
                )
            return
        for path in (ckpt.complete_steps(self.ckpt_root) if mode == "auto" else [Path(mode)]):
            try:
                resume_checks.check_data_order(path, cfg)
            except ckpt.CheckpointError:
                continue  # damaged: skipped with a report (auto) or refused (a given folder) on loading
            return

    def _check_resumable(self, path: Path) -> None:
        """The full check of a checkpoint about to be loaded: the config fields again (an older
        step may be loaded when the newest is damaged), then the prepared data and the blend."""
        resume_checks.check_data_order(path, self.cfg)
        resume_checks.check_prepared_data(path, self.cfg, self.meta)
        resume_checks.check_model_fits(path, self.model, self.cfg)
        self._resumed_from = path

    def _resume(self, mode: str) -> None:
        """Load the checkpoint ``mode`` names ('auto': the newest usable one, 'none': none).

        The data position carries over exactly when only the global batch size, micro-batch size,
        parallel layout or non-data settings changed; other data changes raise ConfigError."""
        if mode == "none":
            return
        if mode == "auto":
            state = ckpt.resume_latest(
                self.ckpt_root, self.model, self.optimizer, report=self.log, check=self._check_resumable
            )
            if state is None:
                return
        else:
            self._check_resumable(Path(mode))
            state = ckpt.load_checkpoint(Path(mode), self.model, self.optimizer)
        self.step = state["step"]
        self.health.skipped = state.get("skipped_steps", 0)
        self.loader.load_state_dict(state["data"])
        self.log(
            f"resumed from step {self.step} ({self.ckpt_root}) at sample {self.loader.consumed_samples:,} "
            "of the data order"
        )
        note = resume_checks.schedule_change(self._resumed_from, self.cfg, self.step)
        if note:
            self.log(note)

    def _init_from(self, path: Path) -> None:
        resume_checks.check_model_fits(ckpt.resolve_checkpoint(path), self.model, self.cfg)
        state = ckpt.load_model_weights(path, self.model, self.meta["tokenizer_sha256"])
        self.log(
            f"initialised from the model weights of {path} (its step {state['step']}); the optimizer, "
            "schedule and data order start fresh"
        )

    # ---------------------------------------------------------------- running

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _all_reduce_mean_tensor(self, value: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value /= dist.get_world_size()
        return value

    def _all_reduce_mean(self, value: torch.Tensor) -> float:
        return self._all_reduce_mean_tensor(value).item()

    def _next_batches(self) -> list:
        """This rank's micro-batches of the next step; the seconds spent reading them add to
        ``self._data_seconds`` (logged as ``data_pct``, the share of step time spent on data)."""
        start = time.perf_counter()
        batches = self.loader.next_step()
        self._data_seconds += time.perf_counter() - start
        return batches

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch ``[B, T]`` on the device, cut to this rank's segments under context
        parallelism (``[B x segments per rank, T / segments]``)."""
        if self.cp_split is not None:
            batch = {k: self.cp_split.shard(v) for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its statistics as tensors (see :meth:`_reduce`)."""
        micro_batches = self._next_batches()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        set_lr(self.optimizer, lr)
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        aux_metrics: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            if self.fsdp:
                self.model.set_requires_gradient_sync(i == n - 1)
            batch = self._local(batch)
            with self._autocast():
                loss, aux = self.model(
                    batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], return_aux=True
                )
            total += loss.detach() / n
            if "aux_loss" in aux:
                loss = loss + aux["aux_loss"]
            self._backward(loss / n, boundary=i == n - 1)
            for key, value in aux.items():  # aux_loss and the layers' metric/... tensors
                aux_metrics[key] = aux_metrics.get(key, 0) + value.detach().float() / n
        norm = self._optimizer_step(total)
        self.step += 1
        self._account(norm)
        return {"loss": total, "grad_norm": norm, "lr": lr, **aux_metrics}

    def _backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Backward of one micro-batch's share of the step loss; ``boundary``: the step's last
        micro-batch (for engines that reduce gradients in backward, e.g. DeepSpeed ZeRO)."""
        loss.backward()

    def _optimizer_step(self, total: torch.Tensor) -> torch.Tensor:
        """Clip the accumulated gradients to train.grad_clip, step (unless the step is skipped,
        see :meth:`_agree`) and zero them; returns the global gradient norm before clipping.
        ``total``: this rank's mean loss of the step."""
        clip = self.cfg.train.grad_clip
        average_expert_grads(self.expert_params)  # FSDP2 reduced all the others
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = clip_grad_norm_(grads, clip if clip > 0 else math.inf)
        if self._agree(total, norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _agree(self, loss: torch.Tensor | None, norm: torch.Tensor) -> bool:
        """The step boundary every rank passes together (:func:`~pretrain.train.faults.agree_step`):
        whether the update may be applied (every loss and the global gradient norm finite), and
        whether a rank was asked to stop. ``loss``: this rank's mean loss (None: it holds none)."""
        self._step_loss, loss_bad, self._stop, self._waited = agree_step(loss, self.preemption.received is not None)
        self._skip_reason = "non-finite loss" if loss_bad else "non-finite gradient norm"
        return not loss_bad and bool(torch.isfinite(norm))  # the norm is global: the same everywhere

    def _account(self, norm: torch.Tensor) -> None:
        """Count the step just taken (self.step) as applied or skipped; raises DivergenceError
        at train.max_skipped_steps consecutive skips."""
        if math.isfinite(self._step_loss) and bool(torch.isfinite(norm)):
            self.health.applied(self.step, self._step_loss)
        else:
            self.health.skip(self.step, self._skip_reason, str(self.ckpt_root))

    def _reduce(self, stats: dict[str, Any]) -> dict[str, Any]:
        """A step's statistics as numbers, averaged over ranks. Only on logged steps: each
        reduction is a collective and each ``.item()`` waits for the device."""
        record: dict[str, Any] = {"loss": self._all_reduce_mean(stats["loss"])}
        record["grad_norm"] = stats["grad_norm"].item()  # already global
        record["lr"] = stats["lr"]
        record["skipped_steps"] = self.health.skipped
        for key, value in stats.items():
            if key == "aux_loss" or key.startswith("metric/"):
                value = self._all_reduce_mean_tensor(value)
                record[key.removeprefix("metric/")] = value.item() if value.ndim == 0 else value.tolist()
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The validation loss, mean next-token cross-entropy in nats over every counted token
        (label != -100) of the fixed validation set (:func:`~pretrain.data.validation_batches`),
        and its perplexity. The same tokens whatever the layout and micro-batch size: each rank
        sums its micro-batches' token losses and counts, and the sums are reduced across ranks
        (Megatron/torchtitan style), never a mean of means."""
        if self._val_batches is None:  # the same fixed set every time: read it once
            cfg = self.cfg
            self._val_batches = validation_batches(
                cfg.data.dir, cfg.data.seq_len, cfg.train.eval_samples, cfg.train.micro_batch_size,
                self.dp_rank, self.dims.dp,
            )
        self.model.eval()
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros_like(nats)
        for batch in self._val_batches:
            batch = self._local(batch)
            with self._autocast():
                loss = self.model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
            s, n = token_loss_sum(loss, batch["labels"])
            nats += s
            tokens += n
        self.model.train()
        loss = self._token_mean(nats, tokens)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def _token_mean(self, nats: torch.Tensor, tokens: torch.Tensor) -> float:
        """``sum(nats) / sum(tokens)`` over every rank (NaN for no token). Summing over all ranks,
        not only data parallelism's, is exact: data- and context-parallel ranks hold disjoint
        tokens, tensor-parallel ranks each add the same copy to both sums (the ratio cancels it)
        and ranks without the pipeline's last stage add zeros."""
        sums = torch.stack([nats, tokens])
        if dist.is_initialized():
            dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def save(self) -> Path:
        """Checkpoint the current step (collective); CheckpointWriteError when it cannot be
        written, the older checkpoints and the training state untouched."""
        return self._checkpointer.save(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            {
                "data": self.loader.state_dict(),
                "prepared_data": resume_checks.prepared_data_record(self.meta),
                "world_size": self.dims.world_size,
                "skipped_steps": self.health.skipped,
            },
            self.cfg.to_toml(),
            self.tokenizer_path,
            self.cfg.checkpoint.keep_last,
        )

    def _rank_step_times(self, step: int, seconds: float) -> list[float]:
        """Every rank's mean step time over the log window (collective), naming a slow one."""
        times = rank_step_times(seconds)
        slow = slow_ranks(times, self.cfg.train.slow_rank_factor)
        if slow:
            median = statistics.median(times)
            named = ", ".join(f"rank {r} ({times[r]:.3g} s)" for r in slow)
            self.log(
                f"step {step}: slow rank(s): {named} per step against the median {median:.3g} s "
                f"(train.slow_rank_factor={self.cfg.train.slow_rank_factor:g})"
            )
        return times

    def _peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        if self.step >= t.max_steps:
            self.log(f"{cfg.run.dir} is already at step {self.step}: raise train.max_steps to train further")
            return {"steps": self.step, "seconds": 0.0, "unigram_entropy": self.meta.get("unigram_entropy")}
        metrics = MetricsLogger(cfg, self.run_dir, self.main, self.step, t.max_steps)
        metrics.baseline = self.meta.get("unigram_entropy")
        tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.log(
            f"training {cfg.run.name}: {self.num_params():,} parameters, "
            f"{self.dims.world_size} rank(s), {self.grad_accum} accumulation step(s), "
            f"{tokens_per_step:,} tokens per step, device {self.device}"
        )
        started = time.perf_counter()
        window_seconds, window_busy, window_steps = 0.0, 0.0, 0
        last_eval: dict[str, float] = {}
        try:
            with self.preemption:
                while self.step < t.max_steps:
                    step_start = time.perf_counter()
                    stats = self.train_step()
                    step = self.step
                    done = step == t.max_steps
                    log_now = step % t.log_interval == 0 or done or self._stop
                    eval_now = bool(t.eval_interval and step % t.eval_interval == 0) or done
                    record = self._reduce(stats) if log_now or eval_now else {}
                    elapsed = time.perf_counter() - step_start  # excludes eval and saving
                    window_seconds += elapsed
                    window_busy += elapsed - self._waited
                    window_steps += 1
                    if log_now:
                        tps = window_steps * tokens_per_step / max(window_seconds, 1e-9)
                        record.update(
                            tokens_per_s=tps,
                            mfu=self.mfu(tps),
                            peak_mem_gb=self._peak_memory_gb(),
                            rank_step_s=self._rank_step_times(step, window_busy / window_steps),
                            data_pct=100 * self._data_seconds / max(window_seconds, 1e-9),
                        )
                        window_seconds, window_busy, window_steps = 0.0, 0.0, 0
                        self._data_seconds = 0.0
                    if eval_now:
                        last_eval = self.evaluate()
                        record.update(last_eval)
                    if record:
                        metrics.log({"step": step, **record})
                    if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or done or self._stop:
                        self.save()
                    if self._stop:
                        break
            self._checkpointer.finish()
        except DivergenceError:  # raised on every rank alike: the pending write can complete
            self._checkpointer.finish()
            raise
        finally:
            metrics.close()
        summary = {
            "steps": self.step,
            "seconds": time.perf_counter() - started,
            "unigram_entropy": self.meta.get("unigram_entropy"),
            "preempted": self._stop,
            **last_eval,
        }
        if self._stop:
            signal = self.preemption.received or "a preemption signal on another rank"
            self.log(
                f"preempted ({signal}) at step {self.step}: checkpoint written to "
                f"{ckpt.step_dir(self.ckpt_root, self.step)}; requeue with --resume auto to continue"
            )
            return summary
        if last_eval and summary["unigram_entropy"] is not None:
            self.log(
                f"validation loss {last_eval['val_loss']:.4f} nats/token vs unigram baseline "
                f"{summary['unigram_entropy']:.4f} (perplexity {last_eval['val_ppl']:.1f} vs "
                f"{math.exp(summary['unigram_entropy']):.1f})"
            )
        return summary


def train(cfg: Config, resume: str = "auto", log=print, init_from: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` to train.max_steps; returns a summary (steps, seconds, final val loss, and
    with eval.at_end the evaluation record of :func:`pretrain.eval.at_end.evaluate`, which rank 0
    runs after the ranks have finished). ``resume`` and ``init_from`` as in :class:`Trainer`."""
    from pretrain.eval import at_end

    manager = at_end.check(cfg)  # an unknown eval.tasks name fails before any training
    clean = False
    try:
        if cfg.parallel.pp > 1:
            from pretrain.train.pipeline_step import PipelineTrainer as cls
        elif cfg.parallel.dp_backend == "deepspeed":
            from pretrain.train.deepspeed_step import DeepSpeedTrainer as cls
        else:
            cls = Trainer
        trainer = cls(cfg, resume=resume, log=log, init_from=init_from)
        summary = trainer.fit()
        clean = True
    finally:
        destroy_distributed(clean)
    if cfg.eval.at_end and trainer.main and not summary.get("preempted"):
        summary["eval"] = at_end.evaluate(trainer.cfg, str(trainer.device), log, manager)
    return summary
