"""kernels.gla's PyTorch chunkwise path: cost per token flat in the sequence length, and the
blocked pairwise decays (several blocks, a partial last one) against the token-by-token
specification kernels/gla/naive.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.gla import chunk_torch
from kernels.gla.naive import naive_recurrent_gla


def _inputs(b, t, h, dk, dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=dtype)
    q, k, v = torch.randn(b, t, h, dk, **kw), torch.randn(b, t, h, dk, **kw), torch.randn(b, t, h, dv, **kw)
    g_log = F.logsigmoid(torch.randn(b, t, h, dk, **kw) + 1)
    h0 = torch.randn(b, h, dk, dv, **kw)
    return [z.requires_grad_() for z in (q, k, v, g_log, h0)]


def test_blocked_pair_decays_match_naive(monkeypatch):
    """Blocks of 3 sub-chunks over B x H x N = 2 x 2 x 2 chunks of 2 sub-chunks (16 sub-chunks:
    the last block partial), with document starts: outputs, final state and every gradient in
    float64."""
    sub = chunk_torch.SUB_CHUNK
    monkeypatch.setattr(chunk_torch, "_PAIR_BLOCK", 3 * sub * sub * 3)  # 3 sub-chunks at K = 3
    leaves = _inputs(2, 2 * 2 * sub - 5, 2, 3, 5)
    reset = torch.zeros(2, 2 * 2 * sub - 5, dtype=torch.bool)
    reset[0, 13] = reset[1, 0] = True
    o, h = chunk_torch.chunk_gla(*leaves, reset=reset, chunk_size=2 * sub)
    o_ref, h_ref = naive_recurrent_gla(*leaves[:4], initial_state=leaves[4], reset=reset)
    g = torch.Generator().manual_seed(1)
    go, gh = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    grads = torch.autograd.grad((o * go).sum() + (h * gh).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * go).sum() + (h_ref * gh).sum(), leaves)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-9)
    for name, gr, gr_ref in zip("q k v g h0".split(), grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


class _CountElements(TorchDispatchMode):
    """Sums the elements of every tensor each aten op returns: the work and memory traffic of a
    region, independent of the machine's speed."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for z in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(z, torch.Tensor):
                self.elements += z.numel()
        return out


def _elements_per_token(t: int) -> float:
    q, k, v, g_log, _ = _inputs(1, t, 2, 8, 8, dtype=torch.float32)
    with _CountElements() as count:
        o, h = chunk_torch.chunk_gla(q, k, v, g_log, chunk_size=32)
        (o.sum() + h.sum()).backward()
    return count.elements / t


def test_work_per_token_is_flat_in_sequence_length():
    """Forward + backward over 32 chunks does the work per token of 2 chunks (a per-chunk step
    whose backward writes a whole [B, H, N, ...] gradient makes it grow with N)."""
    short, long = _elements_per_token(64), _elements_per_token(1024)
    assert long <= 1.05 * short, (short, long)
