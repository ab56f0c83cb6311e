"""SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from kernels.dispatch import cpu_torch_path
from kernels.swiglu import swiglu
from pretrain.models.layers.decode_weights import decode_linear, decoding
from pretrain.models.registry import register_ffn

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


def ffn_hidden(cfg: ModelConfig) -> int:
    """cfg.ffn_hidden, or 8/3 * d_model rounded up to a multiple of 64 (same parameters as a 4x MLP)."""
    return cfg.ffn_hidden or 64 * -(-8 * cfg.d_model // (3 * 64))  # integer ceil: no float rounding


class SwiGLU(nn.Module):
    """``kernels``: ``model.kernels`` for the gating :func:`kernels.swiglu.swiglu` (the default
    keeps the PyTorch path for callers that do not pass it)."""

    def __init__(self, d_model: int, hidden: int, kernels: str = "torch") -> None:
        super().__init__()
        self.kernels = kernels
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down (an output projection)

    def forward(self, x: Tensor) -> Tensor:
        if decoding(x):  # gate and up from one product (pretrain.models.layers.decode_weights)
            gate, up = decode_linear(x, self, "w13", self.w1, self.w3).chunk(2, dim=-1)
            if cpu_torch_path(self.kernels, x):  # the PyTorch path without the dispatch checks
                h = F.silu(gate) * up
            else:
                h = swiglu(gate, up, backend=self.kernels)
            return decode_linear(h, self, "w2", self.w2)
        return self.w2(swiglu(self.w1(x), self.w3(x), backend=self.kernels))

    def activation_elements(self) -> int:
        """Elements per token kept for backward: input, gate, silu(gate), up, their product."""
        return self.w1.weight.shape[1] + 4 * self.w1.weight.shape[0]

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)


@register_ffn("mlp")
def _mlp(cfg: ModelConfig, layer_idx: int) -> SwiGLU:
    return SwiGLU(cfg.d_model, ffn_hidden(cfg), cfg.kernels)


@register_ffn("none")
def _none(cfg: ModelConfig, layer_idx: int) -> None:
    """A block without FFN (and without its norm)."""
    return None
