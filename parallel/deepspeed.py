"""Data parallelism with DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models"): stage 1 shards the optimizer state over the
data-parallel ranks, stage 2 also the gradients, stage 3 also the parameters; ZeRO-Offload
(Ren et al. 2021) keeps the optimizer state and step on the CPU.

The engine wraps our model and our AdamW (pretrain.train.optim); the learning-rate schedule
stays ours (the trainer sets each group's lr before every step), and so do the loss, the
micro-batch loop and the data order. Parameters and master weights stay fp32 (the compute dtype
comes from the trainer's autocast, as under FSDP), so a ZeRO run equals one process up to the
order of float additions.

Checkpoints keep the project's layout: the full (unsharded) model and AdamW state under the
parameter names of a single process, so any layout loads them; see :func:`full_optimizer_state`
and :func:`load_optimizer_state`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from pretrain.config import Config, ConfigError

ADAM_STATE = ("exp_avg", "exp_avg_sq")
"""AdamW's per-element state, sharded by ZeRO; ``step`` is one scalar per flat partition."""


def import_deepspeed(device: torch.device):
    """The ``deepspeed`` module, with its accelerator matching ``device`` (DeepSpeed picks one at
    import: on a CPU run it must not pick a visible GPU). Raises a one-line ConfigError naming
    parallel.dp_backend when DeepSpeed is not installed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else device.type)
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            f"parallel.dp_backend: 'deepspeed' needs the DeepSpeed package ({exc}); "
            "install it with pip install 'pretrain[deepspeed]' or use dp_backend = 'fsdp'"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown ours
    # DeepSpeed 0.19's ZeRO gathers with a collective torch 2.13 deprecates: its warning, not ours
    warnings.filterwarnings(
        "ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated", category=FutureWarning
    )
    return deepspeed


def deepspeed_config(cfg: Config, dp: int, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config dict of ``cfg`` on ``dp`` data-parallel ranks.

    The batch relation is the trainer's (``global = dp x micro x grad_accum``, see
    parallel.dims.ParallelDims.grad_accum); clipping is train.grad_clip (0: none), applied to the
    global norm as torch.nn.utils.clip_grad_norm_ does. No fp16/bf16 section: weights, gradients
    and their reduction stay fp32."""
    t, p = cfg.train, cfg.parallel
    if t.global_batch_size != dp * t.micro_batch_size * grad_accum:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} != {dp} ranks x train.micro_batch_size="
            f"{t.micro_batch_size} x {grad_accum} accumulation steps"
        )
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # our torch AdamW steps the (offloaded) partitions, not DeepSpeedCPUAdam (a compiled op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _flat_partitions(zero_optimizer) -> list[torch.Tensor]:
    """The fp32 flat partitions the wrapped AdamW steps (its ``state`` keys) on this rank."""
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # stage 1 and 2
        return list(zero_optimizer.single_partition_of_fp32_groups)
    return list(zero_optimizer.fp32_partitioned_groups_flat)  # stage 3


def _link_state(zero_optimizer) -> None:
    """Stage 1/2: (re)point every parameter's view into the flat AdamW state. DeepSpeed 0.19
    links after the first param group's first step only, so the views of later groups (ours:
    the no-decay group) stay empty; relinking once all states exist fixes that."""
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _has_state(engine) -> bool:
    state = engine.optimizer.optimizer.state
    return all(len(state.get(flat, {})) > 0 for flat in _flat_partitions(engine.optimizer))


@contextmanager
def gathered_parameters(engine) -> Iterator[nn.Module]:
    """The engine's module with every parameter whole (ZeRO-3 gathers them on all ranks for the
    duration; stages 1 and 2 keep whole parameters anyway). Collective under stage 3."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else nullcontext()
    with ctx:
        yield module


def full_optimizer_state(engine, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Whole AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``) of each named parameter of the
    engine's module, gathered from the ZeRO partitions; {} before the first step. Collective:
    every rank calls it and gets the same tensors (fp32, the parameter's shape, on the CPU)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if not _has_state(engine):
        return {}
    _link_state(engine.optimizer)
    inner = engine.optimizer.optimizer
    step = inner.state[_flat_partitions(engine.optimizer)[0]]["step"]
    params = dict(engine.module.named_parameters())
    out = {}
    for name in names:
        p = params[name]
        out[name] = {"step": step.detach().clone().cpu()}
        for key in ADAM_STATE:
            out[name][key] = safe_get_full_optimizer_state(p, key).detach().float().cpu()
    return out


def load_optimizer_state(engine, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Scatter whole per-parameter AdamW ``state`` (as :func:`full_optimizer_state` returns,
    keyed by the module's parameter names) into the engine's ZeRO partitions; every rank passes
    the same ``state``. Raises KeyError when a parameter has none."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if not state:
        return
    inner = engine.optimizer.optimizer
    step = next(iter(state.values()))["step"]
    for flat in _flat_partitions(engine.optimizer):
        # torch's AdamW creates its state only in its first step: create it here, so that the
        # loaded moments and step count are what that step continues from
        inner.state[flat] = {"step": step.detach().clone(), **{key: torch.zeros_like(flat) for key in ADAM_STATE}}
    _link_state(engine.optimizer)
    for name, p in engine.module.named_parameters():
        for key in ADAM_STATE:  # each rank copies its own slice (on the CPU when offloaded)
            safe_set_full_optimizer_state(p, state[name][key], key)


def initialize(deepspeed, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, dp: int, grad_accum: int):
    """``deepspeed.initialize`` of ``model`` and our ``optimizer`` on the process group the
    trainer already joined (gloo on CPU, NCCL on CUDA); returns the engine. The optimizer object
    stays the one that steps: setting its groups' lr sets the learning rate."""
    import torch.distributed as dist

    if not dist.is_initialized():  # one process: a group of one, in memory
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed asserts a launcher's variables
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    with contextlib.redirect_stdout(io.StringIO()):  # its CPU backend prints a line per rank
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, dp, grad_accum)
    )
    return engine
