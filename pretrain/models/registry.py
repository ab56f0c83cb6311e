"""Name -> constructor of every mixer and FFN a layer pattern may use.

A constructor takes ``(cfg: ModelConfig, layer_idx: int)``. Adding a layer type is one file
under ``layers/`` with a ``@register_mixer("name")`` (or ``@register_ffn``) function, plus its
module in the import list of ``_import_layers`` at the bottom of this file.

A mixer is an ``nn.Module`` with
    ``forward(x [B, T, d_model], ctx: ForwardContext, state=None) -> [B, T, d_model]``
        (``state``: its entry of the decoding cache, updated in place; T >= 1 new tokens),
        or, when the class sets ``uses_carry = True``,
    ``forward(x, ctx, state, carry) -> (y, carry)``: ``carry`` is the dict of tensors that
        cross layers (SambaY's memory and shared K/V, the GRU router's hidden state, the
        running ``aux_loss``); such a layer reads and returns it instead of hiding state in
        module attributes, and never modifies an entry in place (it may be a view that
        FSDP2 or a pipeline stage hands on),
    ``new_state(batch_size)`` -> that entry (or None for a stateless mixer),
    ``init_weights(init_std, out_std)`` (out_std for projections into the residual stream).
An FFN has ``forward(x) -> x`` (or ``forward(x, ctx, carry) -> (y, carry)`` with
``uses_carry = True``) and the same ``init_weights``; its constructor may return None
(FFN 'none': the block then has no FFN and no second norm).

Carry keys with special meaning: ``aux_loss`` (a scalar tensor a layer adds its weighted
auxiliary loss to; the trainer adds it to the LM loss) and keys starting with ``metric/``
(detached tensors the trainer logs, e.g. ``metric/moe_load.3`` for block 3's expert load).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

Factory = Callable[["ModelConfig", int], Any]

MIXERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {}
FFNS: dict[str, Callable[[ModelConfig, int], nn.Module | None]] = {}


def _register(table: dict, kind: str, name: str) -> Callable[[Factory], Factory]:
    def deco(fn: Factory) -> Factory:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = fn
        return fn

    return deco


def register_mixer(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make a mixer constructor available to layer patterns as ``name``."""
    return _register(MIXERS, "mixer", name)


def register_ffn(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make an FFN constructor available to layer patterns as ``name``."""
    return _register(FFNS, "ffn", name)


def _import_layers() -> None:
    """Import every layer module that registers a mixer or an FFN, so that
    `from pretrain.models.registry import MIXERS` is complete (config validation relies on it).
    An explicit list, not a scan of the package: the remote-code export
    (pretrain/convert/remote.py) bundles exactly the modules named by import statements.
    tests/models/test_registry_list.py checks that no registering module is missing."""
    from pretrain.models.layers import attention, diff_attention, gla, gmu, mamba, mamba2, mlp, moe, titans  # noqa: F401


_import_layers()
