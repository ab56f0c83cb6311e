"""Activation checkpointing of the blocks of a :class:`~pretrain.models.HybridLM` (torchtitan's
``apply_ac``): trade backward-pass recomputation for the memory of the activations that autograd
would otherwise keep from the forward to the backward.

- ``"full"``: each block keeps only its inputs (``h``, the forward context, the carry) and
  reruns its whole forward in the backward pass (Chen et al. 2016, "Training Deep Nets with
  Sublinear Memory Cost").
- ``"selective"``: each block keeps the outputs of its expensive ops (:data:`SAVED_OPS`: matrix
  multiplies, fused attention, the reduce-scatter of sequence parallelism) and recomputes the
  cheap pointwise ops, norms and scans around them (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models"), through torch's selective activation
  checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``). It keeps more
  than ``"full"`` but recomputes far fewer FLOPs: the backward reruns no GEMM.

Both use torch's non-reentrant checkpoint (``use_reentrant=False``): the block's inputs need not
be tensors (the carry is a dict, the context a dataclass) and gradients reach every tensor the
block reads, including ones it only finds in the carry (RMoE's shared GRU weights, SambaY's
shared K/V). The RNG state is restored for the recomputation (``preserve_rng_state``), so
recomputed values equal the first forward's even if a layer ever draws random numbers (none
does today). No mixer differentiates inside its forward (the Titans memory's inner gradients
are analytic), so every family recomputes exactly.

The block is not wrapped in another module: its class is swapped for a subclass whose
``forward`` runs the original one under the checkpoint (as FSDP2's ``fully_shard`` swaps
classes), so parameter names (``blocks.<i>.mixer...``) and state-dict keys stay those of an
unchecked model and a checkpoint loads whatever ``parallel.activation_checkpoint`` says.

Order of application (DESIGN.md): tensor parallel -> activation checkpointing -> compile -> FSDP.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from pretrain.config import AC_MODES
from pretrain.config.errors import require_choice
from pretrain.models.context import ForwardContext

_aten = torch.ops.aten


def _saved_ops() -> frozenset:
    ops = {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        # sequence parallelism's reduce-scatter: saving it spares a collective in the backward
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
    }
    try:  # flash-attn >= 2.6 registers its kernels as torch custom ops
        ops |= {torch.ops.flash_attn._flash_attn_forward.default,
                torch.ops.flash_attn._flash_attn_varlen_forward.default}
    except (AttributeError, RuntimeError):
        pass
    return frozenset(ops)


SAVED_OPS = _saved_ops()
"""Ops whose outputs selective checkpointing keeps: every GEMM (``nn.Linear`` and ``matmul``
dispatch to mm/addmm/bmm, so these cover the projections, the MLPs, the experts and the
Titans memory MLP) and fused attention. Everything else is recomputed in the backward:
pointwise ops, norms, softmax, the recurrent scans (memory-bound, cheap to redo)."""


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    """The ``context_fn`` of ``torch.utils.checkpoint.checkpoint`` for ``"selective"``: keep the
    outputs of :data:`SAVED_OPS`, recompute the rest."""
    return create_selective_checkpoint_contexts(_selective_policy)


class CheckpointedBlock:
    """Mixin put in front of a block's class by :func:`apply_activation_checkpoint`; runs the
    block's own ``forward`` under a non-reentrant checkpoint. ``ac_mode``: 'full' or 'selective'."""

    ac_mode: str

    def forward(self, h: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The block's forward (same shapes and values) under the checkpoint of ``ac_mode``."""
        # decoding (a cache updated in place would be updated twice) and no-grad passes keep
        # nothing for a backward: run the block as is
        if not torch.is_grad_enabled() or ctx.cache is not None:
            return super().forward(h, ctx, carry)
        if self.ac_mode == "selective":
            return checkpoint(super().forward, h, ctx, carry, use_reentrant=False, context_fn=selective_context_fn)
        return checkpoint(super().forward, h, ctx, carry, use_reentrant=False)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (CheckpointedBlock, cls), {})


def apply_activation_checkpoint(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every block of ``model`` (a HybridLM or a pipeline stage's model: anything with
    a ``blocks`` ModuleDict of blocks called as ``block(h, ctx, carry)``) in place and return it.

    ``mode``: 'none' (no change), 'full' or 'selective' (see the module docstring). Parameter
    names, values and the numerics of the forward and backward are unchanged. Apply it after
    tensor parallelism and before ``torch.compile`` and FSDP. Raises ConfigError (naming
    parallel.activation_checkpoint) on another mode, ValueError on a model already checkpointed.
    """
    require_choice(mode, "parallel.activation_checkpoint", AC_MODES)
    if mode == "none":
        return model
    for name, block in model.blocks.items():
        if isinstance(block, CheckpointedBlock):
            raise ValueError(f"block {name} is already activation-checkpointed ({block.ac_mode!r})")
        block.__class__ = _checkpointed_class(type(block))
        block.ac_mode = mode
    return model


def apply_activation_checkpoint_to_stage(stage: nn.Module, mode: str) -> nn.Module:
    """:func:`apply_activation_checkpoint` on the blocks of a pipeline stage
    (:class:`parallel.pipeline.stage.StageModule`), before it is wrapped in torch's PipelineStage.
    Under 'selective' the zero-bubble schedules run the stage's whole backward in their
    input-gradient action (``split_weight_grad = False``): torch's weight action backpropagates
    through the recorded graph a second time, which selective checkpointing refuses (each region
    may be backpropagated once). 'full' recomputes the blocks in both actions: exact, one more
    forward of compute."""
    apply_activation_checkpoint(stage.model, mode)
    if mode == "selective":
        stage.split_weight_grad = False
    return stage
