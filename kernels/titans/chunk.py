"""Titans' neural long-term memory, the linear memory (depth 1), in Triton: forward and backward.

Per head, with ``W`` the ``[D, D]`` memory (``M(x) = x W``), the chunk-start weights ``W0``,
and the per-token write of Behrouz et al. 2024 ("Titans: Learning to Memorize at Test Time",
eqs. 13-14, with mini-batch gradients at the chunk start):

    delta_t = 2 (k_t W0 - v_t)                     (d l_t / d (k_t W0); grad l_t = k_t^T delta_t)
    S_t = eta_t S_{t-1} - theta_t k_t^T delta_t     (momentum)
    M_t = (1 - alpha_t) M_{t-1} + S_t               (weights)
    y_t = q_t W0  ('chunk_start')   or   q_t M_t  ('per_token')

The reference is :mod:`kernels.titans.chunk_torch` (same equations, chunking and resets). One
program owns one (batch, head) and walks that row's *pieces* in order, with W0, M and S in fp32
registers. A piece is a run of at most ``BT`` tokens inside one chunk and one document: pieces
start at t = 0, at a document start (``reset``: memory back to ``init``, momentum 0), after a chunk
end (``position % chunk_size == chunk_size - 1``: W0 <- M) and at every multiple of ``BT``. Any
split inside a chunk gives the same result (gradients are all taken at W0), so the ``BT`` cuts
only bound the tile. Inside a piece everything is closed form with cumulative log gates
``la = cumsum log(1 - alpha)``, ``le = cumsum log eta`` (see ``chunk_torch._chunk_update`` and
``_read_per_token``): the decays ``Da[i, t] = exp(la_i - la_t)``, ``De[t, s] = exp(le_t - le_s)``
(t <= i, s <= t: every exponent <= 0) and ``C = Da @ De`` give

    S_end = e S0 - K^T diag(theta d) Delta,  M_end = a M0 + beta S0 - K^T diag(theta c) Delta,
    y_i = A_i q_i M0 + b_i q_i S0 - sum_s C[i, s] theta_s (q_i . k_s) delta_s   ('per_token')

with ``A_i = exp(la_i)``, ``b_i = sum_t Da[i, t] exp(le_t)``, and ``a, beta, c, d, e`` the last
token's ``A``, ``b``, row of ``C``, row of ``De`` and ``exp(le)``.

The forward stores the state entering every piece (after its reset) as an fp32 checkpoint,
``3 D^2`` per piece; the backward walks the pieces last to first from those checkpoints,
carrying the gradients of W0, M and S in registers, and differentiates the closed forms
(gate gradients through ``la``/``le``: a reverse cumulative sum inside the piece). The
gradient of ``init`` is written per (batch, head) and summed over the batch afterwards, so there
are no atomics and the backward is bitwise deterministic. Pointer arithmetic only (no block
pointers: Triton 3.9), and every offset that multiplies a batch, token or piece index is int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows


@triton.jit
def _tile_ptrs(i_bh, D: tl.constexpr, BD: tl.constexpr):
    """Offsets and mask of one [D, D] state inside a per-(batch, head) [B, H, D, D] buffer."""
    o_d = tl.arange(0, BD)
    p = i_bh.to(tl.int64) * D * D + o_d[:, None] * D + o_d[None, :]
    return p, (o_d < D)[:, None] & (o_d < D)[None, :]


@triton.jit
def _load_piece(q, k, v, theta, eta, alpha, i_b, i_h, t0, t1, T, s_b, s_t, s_h,
                H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Tokens [t0, t1) of one (batch, head) (zero past t1) and the piece's decay quantities."""
    o_c = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_t = t0 + o_c
    m_t = o_t < t1
    m_td = m_t[:, None] & (o_d < D)[None, :]
    # int64: B * T * H * D passes 2^31 at long contexts (and s_b may be any view's stride)
    p_x = i_b.to(tl.int64) * s_b + o_t.to(tl.int64)[:, None] * s_t + i_h.to(tl.int64) * s_h + o_d[None, :]
    b_q = tl.load(q + p_x, mask=m_td, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_x, mask=m_td, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_x, mask=m_td, other=0.0).to(tl.float32)
    p_g = (i_b.to(tl.int64) * T + o_t.to(tl.int64)) * H + i_h
    b_th = tl.load(theta + p_g, mask=m_t, other=0.0).to(tl.float32)
    b_eta = tl.load(eta + p_g, mask=m_t, other=1.0).to(tl.float32)
    b_al = tl.load(alpha + p_g, mask=m_t, other=0.0).to(tl.float32)
    # past the piece: log gates 0, so la / le stay at the last token's value; the floor 1e-30 is
    # chunk_torch.LOG_FLOOR (gates of exactly 0 stay finite in log space)
    la = tl.cumsum(tl.log(tl.maximum(1.0 - b_al, 1e-30)), axis=0)
    le = tl.cumsum(tl.log(tl.maximum(b_eta, 1e-30)), axis=0)
    tri = (o_c[:, None] >= o_c[None, :]) & m_t[:, None] & m_t[None, :]
    d_a = tl.exp(tl.where(tri, la[:, None] - la[None, :], float("-inf")))  # [i, t]
    d_e = tl.exp(tl.where(tri, le[:, None] - le[None, :], float("-inf")))  # [t, s]
    last = o_c == (t1 - t0 - 1)
    return b_q, b_k, b_v, b_th, b_eta, b_al, p_x, p_g, m_t, m_td, la, le, d_a, d_e, last, tri


@triton.jit
def _piece_decays(la, le, d_a, d_e, last):
    """C = Da @ De, the last token's rows c (of C) and d (of De), A = exp(la), b, and the last
    token's a, beta (its A, b) and e = exp(le_last)."""
    c_mat = tl.dot(d_a, d_e, input_precision="ieee")  # [i, s]
    c_last = tl.sum(tl.where(last[:, None], c_mat, 0.0), axis=0)  # [BT] over s
    d_last = tl.sum(tl.where(last[:, None], d_e, 0.0), axis=0)
    big_a = tl.exp(la)
    exp_le = tl.exp(le)
    b_vec = tl.sum(d_a * exp_le[None, :], axis=1)
    a_end = tl.sum(tl.where(last, big_a, 0.0), axis=0)
    beta = tl.sum(tl.where(last, b_vec, 0.0), axis=0)
    e_end = tl.exp(tl.sum(tl.where(last, le, 0.0), axis=0))
    return c_mat, c_last, d_last, big_a, exp_le, b_vec, a_end, beta, e_end


@triton.jit
def _gate_grads(d_c, d_de, d_bvec, d_bigA, de, d_a, d_e, big_a, exp_le, e_end, b_eta, b_al, m_t, last, tri,
                BT: tl.constexpr):
    """d eta and d alpha of a piece from the gradients of C, De (beyond C's), b, A and e:
    through la / le (C = Da @ De, b_i = sum_t Da[i, t] exp(le_t), A_i = exp(la_i)), then the
    reverse cumulative sum inside the piece and the derivative of the clamped logs."""
    o_c = tl.arange(0, BT)
    d_da = tl.dot(d_c, tl.trans(d_e), input_precision="ieee") + d_bvec[:, None] * exp_le[None, :]
    d_de += tl.dot(tl.trans(d_a), d_c, input_precision="ieee")
    h_a = tl.where(tri, d_da * d_a, 0.0)
    h_e = tl.where(tri, d_de * d_e, 0.0)
    g_b = d_bvec[:, None] * d_a * exp_le[None, :]
    d_la = tl.sum(h_a, axis=1) - tl.sum(h_a, axis=0) + d_bigA * big_a
    d_le = tl.sum(h_e, axis=1) - tl.sum(h_e, axis=0) + tl.sum(g_b, axis=0) + tl.where(last, de * e_end, 0.0)
    d_la = tl.where(m_t, d_la, 0.0)
    d_le = tl.where(m_t, d_le, 0.0)
    later = o_c[:, None] <= o_c[None, :]  # [r, j]: j >= r; la_j sums the log gates r <= j
    d_lal = tl.sum(tl.where(later, d_la[None, :], 0.0), axis=1)
    d_lel = tl.sum(tl.where(later, d_le[None, :], 0.0), axis=1)
    keep = 1.0 - b_al
    b_dal = tl.where(keep > 1e-30, -d_lal / keep, 0.0)
    b_deta = tl.where(b_eta > 1e-30, d_lel / b_eta, 0.0)
    return b_deta, b_dal


@triton.jit
def _titans_linear_fwd_kernel(q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, init,
                              w0_in, m_in, s_in, y, w0_out, m_out, s_out, ckpt, T, P_MAX,
                              s_b, s_t, s_h, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                              BD: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_RESET: tl.constexpr,
                              STORE_CKPT: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    p_s, m_s = _tile_ptrs(i_bh, D, BD)
    b_w0 = tl.load(w0_in + p_s, mask=m_s, other=0.0).to(tl.float32)
    b_m = tl.load(m_in + p_s, mask=m_s, other=0.0).to(tl.float32)
    b_s = tl.load(s_in + p_s, mask=m_s, other=0.0).to(tl.float32)
    p_init = i_h.to(tl.int64) * D * D + (p_s - i_bh.to(tl.int64) * D * D)
    n = tl.load(n_pieces + i_b)
    for p in range(0, n):
        t0 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p)
        t1 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p + 1)
        if HAS_RESET:
            r = tl.load(reset + i_b.to(tl.int64) * T + t0) != 0
            b_init = tl.load(init + p_init, mask=m_s, other=0.0).to(tl.float32)
            b_w0 = tl.where(r, b_init, b_w0)
            b_m = tl.where(r, b_init, b_m)
            b_s = tl.where(r, 0.0, b_s)
        if STORE_CKPT:
            p_c = ((i_bh.to(tl.int64) * P_MAX + p) * 3) * D * D + (p_s - i_bh.to(tl.int64) * D * D)
            tl.store(ckpt + p_c, b_w0, mask=m_s)
            tl.store(ckpt + p_c + D * D, b_m, mask=m_s)
            tl.store(ckpt + p_c + 2 * D * D, b_s, mask=m_s)
        b_q, b_k, b_v, b_th, b_eta, b_al, p_x, p_g, m_t, m_td, la, le, d_a, d_e, last, tri = _load_piece(
            q, k, v, theta, eta, alpha, i_b, i_h, t0, t1, T, s_b, s_t, s_h, H, D, BT, BD)
        # ieee: fp32 dots, so the kernel matches the fp32 reference (tf32 would drop 13 bits)
        b_delta = 2.0 * (tl.dot(b_k, b_w0, input_precision="ieee") - b_v)  # [BT, BD]; 0 past t1
        c_mat, c_last, d_last, big_a, exp_le, b_vec, a_end, beta, e_end = _piece_decays(la, le, d_a, d_e, last)
        p_y = (i_b.to(tl.int64) * T + (t0 + tl.arange(0, BT)).to(tl.int64))[:, None] * H * D + i_h * D \
            + tl.arange(0, BD)[None, :]
        if PER_TOKEN:
            qk = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [i, s]
            pmat = c_mat * qk * b_th[None, :]
            b_y = big_a[:, None] * tl.dot(b_q, b_m, input_precision="ieee")
            b_y += b_vec[:, None] * tl.dot(b_q, b_s, input_precision="ieee")
            b_y -= tl.dot(pmat, b_delta, input_precision="ieee")
        else:
            b_y = tl.dot(b_q, b_w0, input_precision="ieee")
        tl.store(y + p_y, b_y, mask=m_td)
        k_th = b_k * b_th[:, None]
        new_s = e_end * b_s - tl.dot(tl.trans(k_th * d_last[:, None]), b_delta, input_precision="ieee")
        b_m = a_end * b_m + beta * b_s - tl.dot(tl.trans(k_th * c_last[:, None]), b_delta, input_precision="ieee")
        b_s = new_s
        fin = tl.load(done + i_b.to(tl.int64) * T + t1 - 1) != 0
        b_w0 = tl.where(fin, b_m, b_w0)
    tl.store(w0_out + p_s, b_w0, mask=m_s)
    tl.store(m_out + p_s, b_m, mask=m_s)
    tl.store(s_out + p_s, b_s, mask=m_s)


@triton.jit
def _titans_linear_bwd_kernel(q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, ckpt, dy,
                              dw0_T, dm_T, ds_T, dq, dk, dv, dtheta, deta, dalpha, dw0_in, dm_in,
                              ds_in, dinit, T, P_MAX, s_b, s_t, s_h, H: tl.constexpr,
                              D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                              PER_TOKEN: tl.constexpr, HAS_RESET: tl.constexpr):
    """The pieces last to first; dW0, dM, dS: gradients of the state leaving the current piece."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    p_s, m_s = _tile_ptrs(i_bh, D, BD)
    b_dw0 = tl.load(dw0_T + p_s, mask=m_s, other=0.0)
    b_dm = tl.load(dm_T + p_s, mask=m_s, other=0.0)
    b_ds = tl.load(ds_T + p_s, mask=m_s, other=0.0)
    b_dinit = tl.zeros([BD, BD], dtype=tl.float32)
    o_c = tl.arange(0, BT)
    n = tl.load(n_pieces + i_b)
    for pr in range(0, n):
        p = n - 1 - pr
        t0 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p)
        t1 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p + 1)
        p_c = ((i_bh.to(tl.int64) * P_MAX + p) * 3) * D * D + (p_s - i_bh.to(tl.int64) * D * D)
        b_w0 = tl.load(ckpt + p_c, mask=m_s, other=0.0)
        b_m0 = tl.load(ckpt + p_c + D * D, mask=m_s, other=0.0)
        b_s0 = tl.load(ckpt + p_c + 2 * D * D, mask=m_s, other=0.0)
        b_q, b_k, b_v, b_th, b_eta, b_al, p_x, p_g, m_t, m_td, la, le, d_a, d_e, last, tri = _load_piece(
            q, k, v, theta, eta, alpha, i_b, i_h, t0, t1, T, s_b, s_t, s_h, H, D, BT, BD)
        b_delta = 2.0 * (tl.dot(b_k, b_w0, input_precision="ieee") - b_v)
        c_mat, c_last, d_last, big_a, exp_le, b_vec, a_end, beta, e_end = _piece_decays(la, le, d_a, d_e, last)
        # W0 <- M_end at a chunk end: the leaving W0's gradient joins M_end's, else W0 carries it
        fin = tl.load(done + i_b.to(tl.int64) * T + t1 - 1) != 0
        b_dm = tl.where(fin, b_dm + b_dw0, b_dm)
        b_dw0 = tl.where(fin, 0.0, b_dw0)
        # M_end = a M0 + beta S0 - K^T diag(theta c) Delta;  S_end = e S0 - K^T diag(theta d) Delta
        kds = tl.dot(b_k, b_ds, input_precision="ieee")  # [BT, BD]
        kdm = tl.dot(b_k, b_dm, input_precision="ieee")
        g_s = tl.sum(kds * b_delta, axis=1)  # k_s dS delta_s^T
        g_m = tl.sum(kdm * b_delta, axis=1)
        th_d, th_c = b_th * d_last, b_th * c_last
        d_delta = -th_d[:, None] * kds - th_c[:, None] * kdm
        b_dk = -th_d[:, None] * tl.dot(b_delta, tl.trans(b_ds), input_precision="ieee")
        b_dk -= th_c[:, None] * tl.dot(b_delta, tl.trans(b_dm), input_precision="ieee")
        b_dth = -d_last * g_s - c_last * g_m
        d_c = tl.where(last[:, None], (-b_th * g_m)[None, :], 0.0)  # dC (row "last" from c)
        d_de = tl.where(last[:, None], (-b_th * g_s)[None, :], 0.0)  # dDe (row "last" from d)
        da = tl.sum(tl.sum(b_dm * b_m0, axis=1), axis=0)
        de = tl.sum(tl.sum(b_ds * b_s0, axis=1), axis=0)
        dbeta = tl.sum(tl.sum(b_dm * b_s0, axis=1), axis=0)
        d_bigA = tl.where(last, da, 0.0)
        d_bvec = tl.where(last, dbeta, 0.0)
        new_dm = a_end * b_dm
        new_ds = e_end * b_ds + beta * b_dm
        b_dy = tl.load(dy + (i_b.to(tl.int64) * T + (t0 + o_c).to(tl.int64))[:, None] * H * D + i_h * D
                       + tl.arange(0, BD)[None, :], mask=m_td, other=0.0)
        if PER_TOKEN:
            d_bigA += tl.sum(b_dy * tl.dot(b_q, b_m0, input_precision="ieee"), axis=1)
            d_bvec += tl.sum(b_dy * tl.dot(b_q, b_s0, input_precision="ieee"), axis=1)
            new_dm += tl.dot(tl.trans(b_q * big_a[:, None]), b_dy, input_precision="ieee")
            new_ds += tl.dot(tl.trans(b_q * b_vec[:, None]), b_dy, input_precision="ieee")
            b_dq = big_a[:, None] * tl.dot(b_dy, tl.trans(b_m0), input_precision="ieee")
            b_dq += b_vec[:, None] * tl.dot(b_dy, tl.trans(b_s0), input_precision="ieee")
            # y_i -= sum_s P[i, s] delta_s with P = C * (q k^T) * theta_s
            qk = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
            pmat = c_mat * qk * b_th[None, :]
            d_p = -tl.dot(b_dy, tl.trans(b_delta), input_precision="ieee")  # [i, s]
            d_p = tl.where(tri, d_p, 0.0)
            d_delta -= tl.dot(tl.trans(pmat), b_dy, input_precision="ieee")
            d_qk = d_p * c_mat * b_th[None, :]
            b_dq += tl.dot(d_qk, b_k, input_precision="ieee")
            b_dk += tl.dot(tl.trans(d_qk), b_q, input_precision="ieee")
            d_c += d_p * qk * b_th[None, :]
            b_dth += tl.sum(d_p * c_mat * qk, axis=0)
        else:
            b_dq = tl.dot(b_dy, tl.trans(b_w0), input_precision="ieee")
            b_dw0 += tl.dot(tl.trans(b_q), b_dy, input_precision="ieee")
        # delta = 2 (k W0 - v)
        b_dk += 2.0 * tl.dot(d_delta, tl.trans(b_w0), input_precision="ieee")
        b_dw0 += 2.0 * tl.dot(tl.trans(b_k), d_delta, input_precision="ieee")
        b_deta, b_dal = _gate_grads(d_c, d_de, d_bvec, d_bigA, de, d_a, d_e, big_a, exp_le, e_end, b_eta, b_al,
                                    m_t, last, tri, BT)
        p_o = (i_b.to(tl.int64) * T + (t0 + o_c).to(tl.int64))[:, None] * H * D + i_h * D + tl.arange(0, BD)[None, :]
        tl.store(dq + p_o, b_dq, mask=m_td)
        tl.store(dk + p_o, b_dk, mask=m_td)
        tl.store(dv + p_o, -2.0 * d_delta, mask=m_td)
        tl.store(dtheta + p_g, b_dth, mask=m_t)
        tl.store(deta + p_g, b_deta, mask=m_t)
        tl.store(dalpha + p_g, b_dal, mask=m_t)
        b_dm, b_ds = new_dm, new_ds
        if HAS_RESET:  # the piece started from init and zero momentum
            r = tl.load(reset + i_b.to(tl.int64) * T + t0) != 0
            b_dinit += tl.where(r, b_dw0 + b_dm, 0.0)
            b_dw0 = tl.where(r, 0.0, b_dw0)
            b_dm = tl.where(r, 0.0, b_dm)
            b_ds = tl.where(r, 0.0, b_ds)
    tl.store(dw0_in + p_s, b_dw0, mask=m_s)
    tl.store(dm_in + p_s, b_dm, mask=m_s)
    tl.store(ds_in + p_s, b_ds, mask=m_s)
    tl.store(dinit + p_s, b_dinit, mask=m_s)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(chunk_size: int) -> int:
    # tl.dot needs >= 16; past 64 the [BT, BT] decays and the [D, D] states compete for registers
    return max(16, min(64, triton.next_power_of_2(chunk_size)))


def pieces(positions: Tensor, chunk_size: int, reset: Tensor | None, bt: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per row, where its pieces start (see the module docstring), without a loop over T.

    Returns ``done [B, T]`` int32 (the token ends a chunk), ``starts [B, P + 1]`` int32 (piece p
    is ``[starts[p], starts[p + 1])``; unused slots hold T), ``n_pieces [B]`` int32, and P, the
    largest piece count of a row."""
    b, t = positions.shape
    done = positions % chunk_size == chunk_size - 1
    first = torch.arange(t, device=positions.device) % bt == 0
    first = first.expand(b, t).clone()
    first[:, 1:] |= done[:, :-1]
    if reset is not None:
        first |= reset
    n = first.sum(1)
    p_max = int(n.max())
    slot = torch.where(first, first.cumsum(1) - 1, p_max)  # non-starts go to a spare slot
    starts = torch.full((b, p_max + 1), t, dtype=torch.int64, device=positions.device)
    starts.scatter_(1, slot, torch.arange(t, device=positions.device).expand(b, t).contiguous())
    starts[:, p_max] = t
    return done.to(torch.int32).contiguous(), starts.to(torch.int32).contiguous(), n.to(torch.int32), p_max


def _strides(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int]]:
    """q, k, v as they are when they share one layout with unit channel stride (any batch, token
    and head strides: views, long contexts), else contiguous."""
    if q.stride(-1) == 1 and k.stride() == q.stride() and v.stride() == q.stride():
        return q, k, v, q.stride()[:3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v, q.stride()[:3]


def linear_fwd(q, k, v, theta, eta, alpha, w0, m, s, init, meta, store_ckpt):
    """Launcher: ``y [B, T, H, D]`` fp32, the final ``w0, m, s`` fp32 and the piece checkpoints."""
    b, t, h, d = q.shape
    reset, done, starts, n_pieces, p_max, per_token, bt = meta
    q, k, v, (s_b, s_t, s_h) = _strides(q, k, v)
    bd = max(16, triton.next_power_of_2(d))
    y = _new((b, t, h, d), torch.float32, q.device)
    outs = [_new((b, h, d, d), torch.float32, q.device) for _ in range(3)]
    ckpt = _new((b, h, p_max, 3, d, d), torch.float32, q.device) if store_ckpt else None
    _titans_linear_fwd_kernel[(b * h,)](
        q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, init, w0, m, s, y, *outs, ckpt, t, p_max,
        s_b, s_t, s_h, H=h, D=d, BT=bt, BD=bd, PER_TOKEN=per_token, HAS_RESET=reset is not None,
        STORE_CKPT=store_ckpt)
    return y, *outs, ckpt


def linear_bwd(q, k, v, theta, eta, alpha, ckpt, meta, dy, dw0, dm, ds):
    """Launcher: gradients of q, k, v, theta, eta, alpha (fp32), of the incoming w0, m, s, and of init."""
    b, t, h, d = q.shape
    reset, done, starts, n_pieces, p_max, per_token, bt = meta
    q, k, v, (s_b, s_t, s_h) = _strides(q, k, v)
    bd = max(16, triton.next_power_of_2(d))
    zeros = lambda g: torch.zeros(b, h, d, d, device=q.device) if g is None else g.float().contiguous()  # noqa: E731
    dy = torch.zeros(b, t, h, d, device=q.device) if dy is None else dy.float().contiguous()
    dq, dk, dv = (_new((b, t, h, d), torch.float32, q.device) for _ in range(3))
    dgates = [_new((b, t, h), torch.float32, q.device) for _ in range(3)]
    dstate = [_new((b, h, d, d), torch.float32, q.device) for _ in range(3)]
    dinit = _new((b, h, d, d), torch.float32, q.device)
    _titans_linear_bwd_kernel[(b * h,)](
        q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, ckpt, dy, zeros(dw0), zeros(dm), zeros(ds),
        dq, dk, dv, *dgates, *dstate, dinit, t, p_max, s_b, s_t, s_h, H=h, D=d, BT=bt, BD=bd,
        PER_TOKEN=per_token, HAS_RESET=reset is not None)
    return dq, dk, dv, *dgates, *dstate, dinit.sum(0)  # fixed-order sum over the batch: deterministic


class LinearMemoryScan(torch.autograd.Function):
    """Differentiable in q, k, v, the gates, the incoming state and init; ``meta`` is constant."""

    @staticmethod
    def forward(ctx, q, k, v, theta, eta, alpha, w0, m, s, init, meta):  # type: ignore[override]
        y, w0_t, m_t, s_t, ckpt = linear_fwd(q, k, v, theta, eta, alpha, w0, m, s, init, meta, True)
        ctx.save_for_backward(q, k, v, theta, eta, alpha, ckpt)
        ctx.meta = meta
        ctx.dtypes = [x.dtype for x in (q, k, v, theta, eta, alpha, w0, m, s, init)]
        return y, w0_t, m_t, s_t

    @staticmethod
    def backward(ctx, dy, dw0, dm, ds):  # type: ignore[override]
        q, k, v, theta, eta, alpha, ckpt = ctx.saved_tensors
        grads = linear_bwd(q, k, v, theta, eta, alpha, ckpt, ctx.meta, dy, dw0, dm, ds)
        return *(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(q: Tensor, state_dtypes: list[torch.dtype], depth: int) -> str | None:
    """Why the Triton path cannot run this call, or None when it can."""
    if depth not in (1, 2):
        return f"memory depth {depth} (the Triton kernels have depths 1 and 2)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"{q.dtype} inputs (fp32, bf16 or fp16 only)"
    if any(dt != torch.float32 for dt in state_dtypes):
        return f"memory state dtypes {sorted(set(map(str, state_dtypes)))} (fp32 only)"
    return None


def memory_scan_triton(q, k, v, theta, eta, alpha, state, init, positions, chunk_size, reset=None, read="chunk_start"):
    """:func:`kernels.titans.memory_scan` for the linear memory (depth 1) and, through
    :mod:`kernels.titans.chunk_mlp`, the 2-layer MLP memory (depth 2) in Triton.

    Args and returns as :func:`kernels.titans.chunk_torch.memory_scan`: q, k, v ``[B, T, H, D]``
    (fp32, bf16 or fp16; computed in fp32), theta, eta, alpha ``[B, T, H]``, ``state`` of fp32
    ``[B, H, d_in, d_out]`` tensors, ``init`` ``[[H, D, D]]`` or ``[[H, D, E], [H, E, D]]``,
    positions ``[B, T]`` integers, reset ``[B, T]`` bool or None. ``y`` and the new state are
    fp32. One host sync per call (the largest piece count sizes the checkpoints).

    Raises:
        ValueError: mismatched shapes, or what :func:`unsupported` names (depth > 2, fp64).
    """
    from kernels.titans.chunk_torch import MemoryState  # noqa: PLC0415

    b, t, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or t == 0:
        raise ValueError(f"memory_scan: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match, T > 0")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != (b, t, h):
            raise ValueError(f"memory_scan: {name} {tuple(g.shape)} must be {(b, t, h)}")
    if positions.shape != (b, t) or (reset is not None and reset.shape != (b, t)):
        raise ValueError(f"memory_scan: positions/reset must be {(b, t)}")
    if read not in ("chunk_start", "per_token"):
        raise ValueError(f"memory_scan: read={read!r} is not 'chunk_start' or 'per_token'")
    why = unsupported(q, [x.dtype for x in (*state.w0, *state.m, *state.s)], len(init))
    if why is not None:
        raise ValueError(f"memory_scan: the Triton kernel does not support {why}")
    e = init[0].shape[-1]
    shapes = [(d, d)] if len(init) == 1 else [(d, e), (e, d)]
    for i, shape in enumerate(shapes):
        if init[i].shape != (h, *shape):
            raise ValueError(f"memory_scan: init[{i}] {tuple(init[i].shape)} must be {(h, *shape)}")
        for x in (state.w0[i], state.m[i], state.s[i]):
            if x.shape != (b, h, *shape):
                raise ValueError(f"memory_scan: state tensor {tuple(x.shape)} must be {(b, h, *shape)}")
    bt = _tile(chunk_size)
    done, starts, n_pieces, p_max = pieces(positions, chunk_size, reset, bt)
    reset_i = reset.to(torch.int32).contiguous() if reset is not None else None
    meta = (reset_i, done, starts, n_pieces, p_max, read == "per_token", bt)
    gates = [g.contiguous() for g in (theta, eta, alpha)]
    c = lambda x: x.contiguous()  # noqa: E731  (fresh states are expanded views of init)
    with torch.autocast(q.device.type, enabled=False):
        if len(init) == 1:
            y, w0, m, s = LinearMemoryScan.apply(
                q, k, v, *gates, c(state.w0[0]), c(state.m[0]), c(state.s[0]), c(init[0]), meta)
            return y, MemoryState([w0], [m], [s])
        from kernels.titans.chunk_mlp import MLPMemoryScan  # noqa: PLC0415  (it imports this module)

        layers = [c(x) for i in range(2) for x in (state.w0[i], state.m[i], state.s[i])]
        y, w1, m1, s1, w2, m2, s2 = MLPMemoryScan.apply(q, k, v, *gates, *layers, c(init[0]), c(init[1]), meta)
    return y, MemoryState([w1, w2], [m1, m2], [s1, s2])
