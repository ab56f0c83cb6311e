"""Titans neural long-term memory: the chunked test-time-training scan in pure PyTorch.

The memory of one head is an MLP ``M`` over vectors of the head width D: linear (``M(x) = x W``)
when its depth is 1, else ``M(x) = x + W_L silu(... silu(x W_1))`` (residual, SiLU). Each token
t writes with the associative loss ``l_t = ||M(k_t) - v_t||^2`` and the data-dependent learning
rate theta_t, momentum eta_t and forgetting alpha_t:

    S_t = eta_t S_{t-1} - theta_t grad l_t(W0)          (momentum, the "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                   (weights)

Mini-batch gradient descent: every gradient of a chunk is taken at ``W0``, the weights at the
chunk's start, and a query of the chunk reads ``W0`` too (``y_t = M_{W0}(q_t)``). Chunks are
aligned to positions: a chunk ends after a token with ``position % chunk_size == chunk_size - 1``
(so a packed document chunks as it would alone, and a decoding cache completes chunks exactly
where one forward does); at a document start (``reset``) the memory restarts from its learned
initial weights and zero momentum. The running weights ``M`` of an unfinished chunk already hold
its updates: the state after any prefix is the same whatever pieces it was fed in.

The gradients are analytic (outer products of each layer's input and output gradient), so the
outer training loop differentiates through them with plain autograd; the momentum and forgetting
scans over a chunk are closed forms with log-space cumulative gates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_FLOOR = 1e-30  # gates of exactly 0 (eta, 1 - alpha) stay finite in log space


@dataclass
class MemoryState:
    """Per layer of the memory MLP, ``[B, H, d_in, d_out]`` fp32 tensors."""

    w0: list[Tensor]
    """Weights at the start of the current chunk: what its queries read and its gradients use."""
    m: list[Tensor]
    """Running weights, including the updates of the current (possibly unfinished) chunk."""
    s: list[Tensor]
    """Momentum."""

    @classmethod
    def fresh(cls, init: list[Tensor], batch_size: int) -> MemoryState:
        """The initial memory ``init`` (``[H, d_in, d_out]`` per layer) for a batch, zero momentum."""
        w = [p.float().unsqueeze(0).expand(batch_size, *p.shape) for p in init]
        return cls(list(w), list(w), [torch.zeros_like(x) for x in w])


def mlp_forward(ws: list[Tensor], x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Memory MLP of weights ``ws`` on ``x [B, H, L, D]`` -> (output, inputs of each layer,
    pre-activations of the hidden layers)."""
    inputs, zs, h = [], [], x
    for i, w in enumerate(ws):
        inputs.append(h)
        z = h @ w  # [B, H, L, d_out]
        if i < len(ws) - 1:
            zs.append(z)
            h = F.silu(z)
        else:
            h = z
    return (h if len(ws) == 1 else x + h), inputs, zs


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _output_grads(ws: list[Tensor], k: Tensor, v: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """d l / d (each layer's output) and each layer's input for ``l = ||M(k) - v||^2`` per token:
    the per-token weight gradient of layer i is ``inputs[i]^T deltas[i]``."""
    out, inputs, zs = mlp_forward(ws, k)
    delta = 2 * (out - v)  # [B, H, L, D]
    deltas = [delta]
    for i in range(len(ws) - 1, 0, -1):
        delta = (delta @ ws[i].transpose(-1, -2)) * _silu_grad(zs[i - 1])
        deltas.append(delta)
    return inputs, deltas[::-1]


def _chunk_update(
    state_m: list[Tensor], state_s: list[Tensor], inputs: list[Tensor], deltas: list[Tensor],
    theta: Tensor, eta: Tensor, alpha: Tensor,
) -> tuple[list[Tensor], list[Tensor]]:
    """Apply the momentum/forgetting recurrence over L tokens of one chunk in closed form.

    With la_t = sum_{r<=t} log(1 - alpha_r) and le_t = sum_{r<=t} log eta_r (gates ``[B, H, L]``):
      S_L = E_L S_0 + sum_s exp(le_L - le_s) u_s
      M_L = A_L M_0 + beta S_0 + sum_s c_s u_s,  beta = sum_t exp(la_L - la_t + le_t),
      c_s = sum_{t>=s} exp(la_L - la_t + le_t - le_s),  u_s = -theta_s grad l_s.
    Every exponent is <= 0: no overflow, no division by small gates.
    """
    la = torch.log((1 - alpha).clamp_min(LOG_FLOOR)).cumsum(-1)  # [B, H, L]
    le = torch.log(eta.clamp_min(LOG_FLOOR)).cumsum(-1)
    la_end, le_end = la[..., -1:], le[..., -1:]
    beta = torch.exp(la_end - la + le).sum(-1)  # [B, H]
    expo = (la_end - la + le).unsqueeze(-2) - le.unsqueeze(-1)  # [B, H, L(s), L(t)]
    n = la.shape[-1]
    later = torch.ones(n, n, dtype=torch.bool, device=la.device).triu()  # t >= s
    c = torch.exp(expo.masked_fill(~later, float("-inf"))).sum(-1)  # [B, H, L]
    d = torch.exp(le_end - le)  # [B, H, L]
    a_end, e_end = la_end.exp()[..., None], le_end.exp()[..., None]  # [B, H, 1, 1]
    new_m, new_s = [], []
    for m0, s0, x, g in zip(state_m, state_s, inputs, deltas):
        new_m.append(a_end * m0 + beta[..., None, None] * s0 - torch.einsum("bhs,bhsi,bhso->bhio", c * theta, x, g))
        new_s.append(e_end * s0 - torch.einsum("bhs,bhsi,bhso->bhio", d * theta, x, g))
    return new_m, new_s


def _pieces(positions: Tensor, chunk_size: int, reset: Tensor | None) -> list[tuple[int, int]]:
    """Split [0, T) where any row ends a chunk (after the token) or starts a document (before it):
    inside a piece every row stays in one chunk and one document."""
    t = positions.shape[1]
    cut = torch.zeros(t + 1, dtype=torch.bool, device=positions.device)
    cut[1:] |= (positions % chunk_size == chunk_size - 1).any(0)
    if reset is not None:
        cut[:-1] |= reset.any(0)
    cut[0] = cut[-1] = True
    idx = torch.nonzero(cut).flatten().tolist()
    return list(zip(idx[:-1], idx[1:]))


def memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    state: MemoryState,
    init: list[Tensor],
    positions: Tensor,
    chunk_size: int,
    reset: Tensor | None = None,
) -> tuple[Tensor, MemoryState]:
    """Read and train the memory over T new tokens.

    q, k, v: ``[B, T, H, D]`` (queries and keys already L2-normalised); theta, eta, alpha:
    ``[B, T, H]`` in [0, 1]; state: the memory before these tokens; init: the learned initial
    weights ``[H, d_in, d_out]`` per layer (restored at resets); positions ``[B, T]`` (position in
    the document, or the absolute index) place the chunk ends; reset ``[B, T]`` bool or None.
    Returns ``y [B, T, H, D]`` (fp32; ``y_t = M_{W0}(q_t)``, W0 the weights at t's chunk start)
    and the state after the T tokens. Differentiable in every input, ``init`` included.
    """
    b, t, h, dh = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"memory_scan: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != (b, t, h):
            raise ValueError(f"memory_scan: {name} {tuple(g.shape)} must be {(b, t, h)}")
    if positions.shape != (b, t) or (reset is not None and reset.shape != (b, t)):
        raise ValueError(f"memory_scan: positions/reset must be {(b, t)}")
    with torch.autocast(q.device.type, enabled=False):  # the inner gradient descent runs in fp32
        return _scan(q, k, v, theta, eta, alpha, state, init, positions, chunk_size, reset)


def _scan(
    q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor, state: MemoryState,
    init: list[Tensor], positions: Tensor, chunk_size: int, reset: Tensor | None,
) -> tuple[Tensor, MemoryState]:
    """:func:`memory_scan` after its checks: one piece (a chunk, or part of one) at a time."""
    b = q.shape[0]
    qh, kh, vh = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    th, et, al = (x.float().transpose(1, 2) for x in (theta, eta, alpha))  # [B, H, T]
    w0, m, s = list(state.w0), list(state.m), list(state.s)
    ys = []
    for t0, t1 in _pieces(positions, chunk_size, reset):
        if reset is not None:
            r = reset[:, t0].view(b, 1, 1, 1)
            w0 = [torch.where(r, p.float(), x) for p, x in zip(init, w0)]
            m = [torch.where(r, p.float(), x) for p, x in zip(init, m)]
            s = [torch.where(r, torch.zeros_like(x), x) for x in s]
        ys.append(mlp_forward(w0, qh[:, :, t0:t1])[0])
        inputs, deltas = _output_grads(w0, kh[:, :, t0:t1], vh[:, :, t0:t1])
        m, s = _chunk_update(m, s, inputs, deltas, th[..., t0:t1], et[..., t0:t1], al[..., t0:t1])
        done = (positions[:, t1 - 1] % chunk_size == chunk_size - 1).view(b, 1, 1, 1)
        w0 = [torch.where(done, x, y) for x, y in zip(m, w0)]
    y = torch.cat(ys, dim=2).transpose(1, 2)  # [B, T, H, D]
    return y, MemoryState(w0, m, s)
