"""Titans neural long-term memory: the chunked test-time-training scan in pure PyTorch (the CPU
path; called through :mod:`kernels.titans`).

The memory of one head is an MLP ``M`` over vectors of the head width D: linear (``M(x) = x W``)
when its depth is 1, else ``M(x) = x + W_L silu(... silu(x W_1))`` (residual, SiLU). Each token
t writes with the associative loss ``l_t = ||M(k_t) - v_t||^2`` and the data-dependent learning
rate theta_t, momentum eta_t and forgetting alpha_t:

    S_t = eta_t S_{t-1} - theta_t grad l_t(W0)          (momentum, the "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                   (weights)

Mini-batch gradient descent: every gradient of a chunk is taken at ``W0``, the weights at the
chunk's start. A query reads either ``W0`` too (``read="chunk_start"``: ``y_t = M_{W0}(q_t)``) or
the running weights right after its own token's write (``read="per_token"``: ``y_t = M_t(q_t)``;
causal, since M_t depends on tokens <= t only), computed without forming per-token weights by
the dual form of TTT (Sun et al. 2024, "Learning to (Learn at Test Time)"). Chunks are
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

from kernels.dispatch import at_least_fp32

LOG_FLOOR = 1e-30  # gates of exactly 0 (eta, 1 - alpha) stay finite in log space


@dataclass
class MemoryState:
    """Per layer of the memory MLP, ``[B, H, d_in, d_out]`` tensors in at least fp32."""

    w0: list[Tensor]
    """Weights at the start of the current chunk: what its queries read and its gradients use."""
    m: list[Tensor]
    """Running weights, including the updates of the current (possibly unfinished) chunk."""
    s: list[Tensor]
    """Momentum."""

    @classmethod
    def fresh(cls, init: list[Tensor], batch_size: int) -> MemoryState:
        """The initial memory ``init`` (``[H, d_in, d_out]`` per layer) for a batch, zero momentum."""
        w = [at_least_fp32(p).unsqueeze(0).expand(batch_size, *p.shape) for p in init]
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


def _log_gates(eta: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative ``log(1 - alpha)`` and ``log eta`` over the last dim (the tokens of a piece)."""
    la = torch.log((1 - alpha).clamp_min(LOG_FLOOR)).cumsum(-1)
    le = torch.log(eta.clamp_min(LOG_FLOOR)).cumsum(-1)
    return la, le


def _decays(lg: Tensor) -> Tensor:
    """``D[i, j] = exp(lg_i - lg_j)`` for ``j <= i``, else 0: ``[..., L] -> [..., L, L]``. The
    exponent of every kept entry is <= 0 (log gates only decrease), so nothing overflows."""
    n = lg.shape[-1]
    later = torch.ones(n, n, dtype=torch.bool, device=lg.device).tril()  # [i, j]: j <= i
    return torch.exp((lg.unsqueeze(-1) - lg.unsqueeze(-2)).masked_fill(~later, float("-inf")))


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
    la, le = _log_gates(eta, alpha)  # [B, H, L]
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


def _read_per_token(
    state_m: list[Tensor], state_s: list[Tensor], q: Tensor, inputs: list[Tensor], deltas: list[Tensor],
    theta: Tensor, eta: Tensor, alpha: Tensor,
) -> Tensor:
    """``M_i(q_i)`` for every token i of a piece inside one chunk, M_i the running weights after
    token i's write, without forming M_i (TTT's dual form).

    state_m, state_s: running weights and momentum before the piece; q ``[B, H, L, D]``; inputs,
    deltas: each layer's input and output gradient of the piece's keys at W0; gates ``[B, H, L]``.
    Unrolling the recurrence, ``M_i = A_i M_0 + beta_i S_0 + sum_{s<=i} C[i, s] u_s`` with
    ``u_s = -theta_s x_s^T delta_s``, ``A_i = exp(la_i)``, ``beta_i = sum_{t<=i} exp(la_i - la_t
    + le_t)`` and ``C = D_alpha @ D_eta`` (:func:`_decays`; forgetting after momentum). A layer
    then maps its query-side input h_i (computed with the per-token weights of the layers below) to
    ``A_i h_i M_0 + beta_i h_i S_0 - sum_s C[i, s] theta_s (h_i . x_s) delta_s``: O(L^2) per layer
    like causal attention, instead of L weight copies.
    """
    la, le = _log_gates(eta, alpha)
    d_alpha = _decays(la)  # [B, H, L(i), L(t)]
    c = (d_alpha @ _decays(le)) * theta.unsqueeze(-2)  # [B, H, L(i), L(s)], theta_s folded in
    a = la.exp().unsqueeze(-1)  # [B, H, L, 1]
    beta = d_alpha @ le.exp().unsqueeze(-1)  # [B, H, L, 1]
    h, last = q, len(state_m) - 1
    for i, (m0, s0, x, g) in enumerate(zip(state_m, state_s, inputs, deltas)):
        z = a * (h @ m0) + beta * (h @ s0) - (c * (h @ x.transpose(-1, -2))) @ g  # [B, H, L, d_out]
        h = F.silu(z) if i < last else z
    return h if len(state_m) == 1 else q + h


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
    read: str = "chunk_start",
) -> tuple[Tensor, MemoryState]:
    """Read and train the memory over T new tokens.

    q, k, v: ``[B, T, H, D]`` (queries and keys already L2-normalised); theta, eta, alpha:
    ``[B, T, H]`` in [0, 1]; state: the memory before these tokens; init: the learned initial
    weights ``[H, d_in, d_out]`` per layer (restored at resets); positions ``[B, T]`` (position in
    the document, or the absolute index) place the chunk ends; reset ``[B, T]`` bool or None;
    read: 'chunk_start' (``y_t = M_{W0}(q_t)``, W0 the weights at t's chunk start) or
    'per_token' (``y_t = M_t(q_t)``, the weights after t's own write). Returns ``y [B, T, H, D]``
    (at least fp32) and the state after the T tokens. Differentiable in every input, ``init`` included.
    Raises ValueError on mismatched shapes or an unknown ``read``.
    """
    b, t, h, dh = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"memory_scan: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != (b, t, h):
            raise ValueError(f"memory_scan: {name} {tuple(g.shape)} must be {(b, t, h)}")
    if positions.shape != (b, t) or (reset is not None and reset.shape != (b, t)):
        raise ValueError(f"memory_scan: positions/reset must be {(b, t)}")
    if read not in ("chunk_start", "per_token"):
        raise ValueError(f"memory_scan: read={read!r} is not 'chunk_start' or 'per_token'")
    with torch.autocast(q.device.type, enabled=False):  # the inner gradient descent runs in at least fp32
        return _scan(q, k, v, theta, eta, alpha, state, init, positions, chunk_size, reset, read == "per_token")


def _scan(
    q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor, state: MemoryState,
    init: list[Tensor], positions: Tensor, chunk_size: int, reset: Tensor | None, per_token: bool,
) -> tuple[Tensor, MemoryState]:
    """:func:`memory_scan` after its checks: one piece (a chunk, or part of one) at a time."""
    b = q.shape[0]
    qh, kh, vh = (at_least_fp32(x).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    th, et, al = (at_least_fp32(x).transpose(1, 2) for x in (theta, eta, alpha))  # [B, H, T]
    w0, m, s = list(state.w0), list(state.m), list(state.s)
    ys = []
    for t0, t1 in _pieces(positions, chunk_size, reset):
        if reset is not None:
            r = reset[:, t0].view(b, 1, 1, 1)
            w0 = [torch.where(r, at_least_fp32(p), x) for p, x in zip(init, w0)]
            m = [torch.where(r, at_least_fp32(p), x) for p, x in zip(init, m)]
            s = [torch.where(r, torch.zeros_like(x), x) for x in s]
        inputs, deltas = _output_grads(w0, kh[:, :, t0:t1], vh[:, :, t0:t1])
        gates = th[..., t0:t1], et[..., t0:t1], al[..., t0:t1]
        if per_token:  # m, s: the running state before this piece (mid-chunk when decoding)
            ys.append(_read_per_token(m, s, qh[:, :, t0:t1], inputs, deltas, *gates))
        else:
            ys.append(mlp_forward(w0, qh[:, :, t0:t1])[0])
        m, s = _chunk_update(m, s, inputs, deltas, *gates)
        done = (positions[:, t1 - 1] % chunk_size == chunk_size - 1).view(b, 1, 1, 1)
        w0 = [torch.where(done, x, y) for x, y in zip(m, w0)]
    y = torch.cat(ys, dim=2).transpose(1, 2)  # [B, T, H, D]
    return y, MemoryState(w0, m, s)
