"""Titans' neural long-term memory, the 2-layer MLP memory (depth 2), in Triton: forward and backward.

``M(x) = x + silu(x W1) W2`` with ``W1 [D, E]``, ``W2 [E, D]`` (E = memory_expand * D). The
pieces, gates, checkpoints and state passing are those of :mod:`kernels.titans.chunk` (read its
docstring first); what changes is the per-token gradient at the chunk-start weights, two outer
products per token (``chunk_torch._output_grads``):

    z = k W1, h = silu(z), delta2 = 2 (k + h W2 - v), delta1 = (delta2 W2^T) * silu'(z)
    grad_W1 l = k^T delta1,  grad_W2 l = h^T delta2

and each layer's momentum/forgetting update is the linear kernel's closed form with its own input
(k, then h) and output gradient (delta1, then delta2). The 'per_token' read applies the dual form
layer by layer (``chunk_torch._read_per_token``): the query's hidden ``silu(zq)`` of layer 1 (read
with each token's own running W1) is the input of layer 2's read.

One program per (batch, head) holds the six ``[D, E]`` / ``[E, D]`` tensors (W0, M, S per layer)
in fp32 registers; the backward recomputes each piece from its fp32 checkpoint (``6 D E`` per
piece) and differentiates the reads, the updates and the key-side chain
``delta1 <- delta2 <- (k, h) <- z`` analytically. Deterministic (no atomics), int64 offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.titans.chunk import _gate_grads, _load_piece, _new, _piece_decays, _strides

# six [D, E] states (twelve with their gradients in the backward) share one program's registers:
# twice the default warps halves the registers each thread needs (fewer spills at D = 32, E = 64)
NUM_WARPS = 8


@triton.jit
def _mlp_ptrs(i_bh, D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    """Offsets (without the (batch, head) base) and masks of a [D, E] and an [E, D] tile."""
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    p1 = o_d[:, None] * E + o_e[None, :]
    p2 = o_e[:, None] * D + o_d[None, :]
    m1 = (o_d < D)[:, None] & (o_e < E)[None, :]
    m2 = (o_e < E)[:, None] & (o_d < D)[None, :]
    return p1, p2, m1, m2, i_bh.to(tl.int64) * D * E


@triton.jit
def _keys_at_w0(b_k, b_v, b_w1, b_w2):
    """The key side at the chunk-start weights: z, sigmoid(z), h, delta2, delta2 W2^T, silu'(z), delta1."""
    z = tl.dot(b_k, b_w1, input_precision="ieee")  # [BT, BE]
    sg = tl.sigmoid(z)
    h = z * sg
    delta2 = 2.0 * (b_k + tl.dot(h, b_w2, input_precision="ieee") - b_v)  # [BT, BD]; 0 past the piece
    g = tl.dot(delta2, tl.trans(b_w2), input_precision="ieee")
    sp = sg * (1.0 + z * (1.0 - sg))
    return z, sg, h, delta2, g, sp, g * sp


@triton.jit
def _titans_mlp_fwd_kernel(q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, init1, init2,
                           w1_in, m1_in, s1_in, w2_in, m2_in, s2_in, y, w1_out, m1_out, s1_out,
                           w2_out, m2_out, s2_out, ckpt, T, P_MAX, s_b, s_t, s_h, H: tl.constexpr,
                           D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                           BE: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_RESET: tl.constexpr,
                           STORE_CKPT: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    p1, p2, m1, m2, base = _mlp_ptrs(i_bh, D, E, BD, BE)
    b_w1 = tl.load(w1_in + base + p1, mask=m1, other=0.0).to(tl.float32)
    b_m1 = tl.load(m1_in + base + p1, mask=m1, other=0.0).to(tl.float32)
    b_s1 = tl.load(s1_in + base + p1, mask=m1, other=0.0).to(tl.float32)
    b_w2 = tl.load(w2_in + base + p2, mask=m2, other=0.0).to(tl.float32)
    b_m2 = tl.load(m2_in + base + p2, mask=m2, other=0.0).to(tl.float32)
    b_s2 = tl.load(s2_in + base + p2, mask=m2, other=0.0).to(tl.float32)
    o_c = tl.arange(0, BT)
    n = tl.load(n_pieces + i_b)
    for p in range(0, n):
        t0 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p)
        t1 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p + 1)
        if HAS_RESET:
            r = tl.load(reset + i_b.to(tl.int64) * T + t0) != 0
            b_i1 = tl.load(init1 + i_h.to(tl.int64) * D * E + p1, mask=m1, other=0.0).to(tl.float32)
            b_i2 = tl.load(init2 + i_h.to(tl.int64) * D * E + p2, mask=m2, other=0.0).to(tl.float32)
            b_w1 = tl.where(r, b_i1, b_w1)
            b_m1 = tl.where(r, b_i1, b_m1)
            b_s1 = tl.where(r, 0.0, b_s1)
            b_w2 = tl.where(r, b_i2, b_w2)
            b_m2 = tl.where(r, b_i2, b_m2)
            b_s2 = tl.where(r, 0.0, b_s2)
        if STORE_CKPT:
            p_c = ckpt + (i_bh.to(tl.int64) * P_MAX + p) * 6 * D * E
            tl.store(p_c + p1, b_w1, mask=m1)
            tl.store(p_c + D * E + p1, b_m1, mask=m1)
            tl.store(p_c + 2 * D * E + p1, b_s1, mask=m1)
            tl.store(p_c + 3 * D * E + p2, b_w2, mask=m2)
            tl.store(p_c + 4 * D * E + p2, b_m2, mask=m2)
            tl.store(p_c + 5 * D * E + p2, b_s2, mask=m2)
        b_q, b_k, b_v, b_th, b_eta, b_al, p_x, p_g, m_t, m_td, la, le, d_a, d_e, last, tri = _load_piece(
            q, k, v, theta, eta, alpha, i_b, i_h, t0, t1, T, s_b, s_t, s_h, H, D, BT, BD)
        c_mat, c_last, d_last, big_a, exp_le, b_vec, a_end, beta, e_end = _piece_decays(la, le, d_a, d_e, last)
        z, sg, h, delta2, g, sp, delta1 = _keys_at_w0(b_k, b_v, b_w1, b_w2)
        if PER_TOKEN:
            zq = big_a[:, None] * tl.dot(b_q, b_m1, input_precision="ieee")
            zq += b_vec[:, None] * tl.dot(b_q, b_s1, input_precision="ieee")
            zq -= tl.dot(c_mat * tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * b_th[None, :], delta1,
                         input_precision="ieee")
            hq = zq * tl.sigmoid(zq)
            b_y = b_q + big_a[:, None] * tl.dot(hq, b_m2, input_precision="ieee")
            b_y += b_vec[:, None] * tl.dot(hq, b_s2, input_precision="ieee")
            b_y -= tl.dot(c_mat * tl.dot(hq, tl.trans(h), input_precision="ieee") * b_th[None, :], delta2,
                          input_precision="ieee")
        else:
            zq = tl.dot(b_q, b_w1, input_precision="ieee")
            b_y = b_q + tl.dot(zq * tl.sigmoid(zq), b_w2, input_precision="ieee")
        p_y = (i_b.to(tl.int64) * T + (t0 + o_c).to(tl.int64))[:, None] * H * D + i_h * D + tl.arange(0, BD)[None, :]
        tl.store(y + p_y, b_y, mask=m_td)
        k_th, h_th = b_k * b_th[:, None], h * b_th[:, None]
        new_s1 = e_end * b_s1 - tl.dot(tl.trans(k_th * d_last[:, None]), delta1, input_precision="ieee")
        b_m1 = a_end * b_m1 + beta * b_s1 - tl.dot(tl.trans(k_th * c_last[:, None]), delta1, input_precision="ieee")
        new_s2 = e_end * b_s2 - tl.dot(tl.trans(h_th * d_last[:, None]), delta2, input_precision="ieee")
        b_m2 = a_end * b_m2 + beta * b_s2 - tl.dot(tl.trans(h_th * c_last[:, None]), delta2, input_precision="ieee")
        b_s1, b_s2 = new_s1, new_s2
        fin = tl.load(done + i_b.to(tl.int64) * T + t1 - 1) != 0
        b_w1 = tl.where(fin, b_m1, b_w1)
        b_w2 = tl.where(fin, b_m2, b_w2)
    tl.store(w1_out + base + p1, b_w1, mask=m1)
    tl.store(m1_out + base + p1, b_m1, mask=m1)
    tl.store(s1_out + base + p1, b_s1, mask=m1)
    tl.store(w2_out + base + p2, b_w2, mask=m2)
    tl.store(m2_out + base + p2, b_m2, mask=m2)
    tl.store(s2_out + base + p2, b_s2, mask=m2)


@triton.jit
def _update_grads(x, delta, ds, dm, th_d, th_c):
    """Backward of ``S' = e S - x^T diag(theta d) delta``, ``M' = ... - x^T diag(theta c) delta``
    in x and delta; and the per-token ``x dS delta^T``, ``x dM delta^T`` the gates need."""
    xds = tl.dot(x, ds, input_precision="ieee")
    xdm = tl.dot(x, dm, input_precision="ieee")
    g_s = tl.sum(xds * delta, axis=1)
    g_m = tl.sum(xdm * delta, axis=1)
    d_delta = -th_d[:, None] * xds - th_c[:, None] * xdm
    d_x = -th_d[:, None] * tl.dot(delta, tl.trans(ds), input_precision="ieee")
    d_x -= th_c[:, None] * tl.dot(delta, tl.trans(dm), input_precision="ieee")
    return d_delta, d_x, g_s, g_m


@triton.jit
def _dual_read_grads(x, keys, delta, m0, s0, d_out, c_mat, big_a, b_vec, b_th, tri):
    """Backward of one layer's dual-form read ``out = A (x M0) + b (x S0) - (C * (x keys^T) *
    theta) delta``: gradients of x, keys, delta, M0, S0, and the A, b, C, theta terms."""
    xk = tl.dot(x, tl.trans(keys), input_precision="ieee")
    d_big_a = tl.sum(d_out * tl.dot(x, m0, input_precision="ieee"), axis=1)
    d_bvec = tl.sum(d_out * tl.dot(x, s0, input_precision="ieee"), axis=1)
    d_m0 = tl.dot(tl.trans(x * big_a[:, None]), d_out, input_precision="ieee")
    d_s0 = tl.dot(tl.trans(x * b_vec[:, None]), d_out, input_precision="ieee")
    d_x = big_a[:, None] * tl.dot(d_out, tl.trans(m0), input_precision="ieee")
    d_x += b_vec[:, None] * tl.dot(d_out, tl.trans(s0), input_precision="ieee")
    d_p = tl.where(tri, -tl.dot(d_out, tl.trans(delta), input_precision="ieee"), 0.0)
    d_delta = -tl.dot(tl.trans(c_mat * xk * b_th[None, :]), d_out, input_precision="ieee")
    d_xk = d_p * c_mat * b_th[None, :]
    d_x += tl.dot(d_xk, keys, input_precision="ieee")
    d_keys = tl.dot(tl.trans(d_xk), x, input_precision="ieee")
    return d_x, d_keys, d_delta, d_m0, d_s0, d_big_a, d_bvec, d_p * xk * b_th[None, :], tl.sum(d_p * c_mat * xk, axis=0)


@triton.jit
def _titans_mlp_bwd_kernel(q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, ckpt, dy,
                           dw1_T, dm1_T, ds1_T, dw2_T, dm2_T, ds2_T, dq, dk, dv, dtheta, deta, dalpha,
                           dw1_in, dm1_in, ds1_in, dw2_in, dm2_in, ds2_in, dinit1, dinit2, T, P_MAX,
                           s_b, s_t, s_h, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                           BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                           PER_TOKEN: tl.constexpr, HAS_RESET: tl.constexpr):
    """The pieces last to first, carrying the gradients of the leaving W0, M, S of both layers."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    p1, p2, m1, m2, base = _mlp_ptrs(i_bh, D, E, BD, BE)
    b_dw1 = tl.load(dw1_T + base + p1, mask=m1, other=0.0)
    b_dm1 = tl.load(dm1_T + base + p1, mask=m1, other=0.0)
    b_ds1 = tl.load(ds1_T + base + p1, mask=m1, other=0.0)
    b_dw2 = tl.load(dw2_T + base + p2, mask=m2, other=0.0)
    b_dm2 = tl.load(dm2_T + base + p2, mask=m2, other=0.0)
    b_ds2 = tl.load(ds2_T + base + p2, mask=m2, other=0.0)
    b_di1 = tl.zeros([BD, BE], dtype=tl.float32)
    b_di2 = tl.zeros([BE, BD], dtype=tl.float32)
    o_c = tl.arange(0, BT)
    n = tl.load(n_pieces + i_b)
    for pr in range(0, n):
        p = n - 1 - pr
        t0 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p)
        t1 = tl.load(starts + i_b.to(tl.int64) * (P_MAX + 1) + p + 1)
        p_c = ckpt + (i_bh.to(tl.int64) * P_MAX + p) * 6 * D * E
        b_w1 = tl.load(p_c + p1, mask=m1, other=0.0)
        b_m1 = tl.load(p_c + D * E + p1, mask=m1, other=0.0)
        b_s1 = tl.load(p_c + 2 * D * E + p1, mask=m1, other=0.0)
        b_w2 = tl.load(p_c + 3 * D * E + p2, mask=m2, other=0.0)
        b_m2 = tl.load(p_c + 4 * D * E + p2, mask=m2, other=0.0)
        b_s2 = tl.load(p_c + 5 * D * E + p2, mask=m2, other=0.0)
        b_q, b_k, b_v, b_th, b_eta, b_al, p_x, p_g, m_t, m_td, la, le, d_a, d_e, last, tri = _load_piece(
            q, k, v, theta, eta, alpha, i_b, i_h, t0, t1, T, s_b, s_t, s_h, H, D, BT, BD)
        c_mat, c_last, d_last, big_a, exp_le, b_vec, a_end, beta, e_end = _piece_decays(la, le, d_a, d_e, last)
        z, sg, h, delta2, g, sp, delta1 = _keys_at_w0(b_k, b_v, b_w1, b_w2)
        # W0 <- M_end at a chunk end: the leaving W0's gradient joins M_end's
        fin = tl.load(done + i_b.to(tl.int64) * T + t1 - 1) != 0
        b_dm1 = tl.where(fin, b_dm1 + b_dw1, b_dm1)
        b_dw1 = tl.where(fin, 0.0, b_dw1)
        b_dm2 = tl.where(fin, b_dm2 + b_dw2, b_dm2)
        b_dw2 = tl.where(fin, 0.0, b_dw2)
        # the updates of both layers (inputs k and h, output gradients delta1 and delta2)
        th_d, th_c = b_th * d_last, b_th * c_last
        d_delta1, b_dk, g_s, g_m = _update_grads(b_k, delta1, b_ds1, b_dm1, th_d, th_c)
        d_delta2, d_h, g_s2, g_m2 = _update_grads(h, delta2, b_ds2, b_dm2, th_d, th_c)
        g_s += g_s2
        g_m += g_m2
        b_dth = -d_last * g_s - c_last * g_m
        d_c = tl.where(last[:, None], (-b_th * g_m)[None, :], 0.0)
        d_de = tl.where(last[:, None], (-b_th * g_s)[None, :], 0.0)
        da = tl.sum(tl.sum(b_dm1 * b_m1, axis=1), axis=0) + tl.sum(tl.sum(b_dm2 * b_m2, axis=1), axis=0)
        de = tl.sum(tl.sum(b_ds1 * b_s1, axis=1), axis=0) + tl.sum(tl.sum(b_ds2 * b_s2, axis=1), axis=0)
        dbeta = tl.sum(tl.sum(b_dm1 * b_s1, axis=1), axis=0) + tl.sum(tl.sum(b_dm2 * b_s2, axis=1), axis=0)
        d_big_a = tl.where(last, da, 0.0)
        d_bvec = tl.where(last, dbeta, 0.0)
        new_dm1, new_ds1 = a_end * b_dm1, e_end * b_ds1 + beta * b_dm1
        new_dm2, new_ds2 = a_end * b_dm2, e_end * b_ds2 + beta * b_dm2
        b_dy = tl.load(dy + (i_b.to(tl.int64) * T + (t0 + o_c).to(tl.int64))[:, None] * H * D + i_h * D
                       + tl.arange(0, BD)[None, :], mask=m_td, other=0.0)
        if PER_TOKEN:
            zq = big_a[:, None] * tl.dot(b_q, b_m1, input_precision="ieee")
            zq += b_vec[:, None] * tl.dot(b_q, b_s1, input_precision="ieee")
            zq -= tl.dot(c_mat * tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * b_th[None, :], delta1,
                         input_precision="ieee")
            sq = tl.sigmoid(zq)
            hq = zq * sq
            # layer 2: input hq, keys h
            d_hq, d_keys, d_dl, d_m0, d_s0, dA, dB, dC, dT = _dual_read_grads(
                hq, h, delta2, b_m2, b_s2, b_dy, c_mat, big_a, b_vec, b_th, tri)
            d_h += d_keys
            d_delta2 += d_dl
            new_dm2 += d_m0
            new_ds2 += d_s0
            d_big_a += dA
            d_bvec += dB
            d_c += dC
            b_dth += dT
            d_zq = d_hq * sq * (1.0 + zq * (1.0 - sq))
            # layer 1: input q, keys k
            d_q1, d_keys, d_dl, d_m0, d_s0, dA, dB, dC, dT = _dual_read_grads(
                b_q, b_k, delta1, b_m1, b_s1, d_zq, c_mat, big_a, b_vec, b_th, tri)
            b_dq = b_dy + d_q1
            b_dk += d_keys
            d_delta1 += d_dl
            new_dm1 += d_m0
            new_ds1 += d_s0
            d_big_a += dA
            d_bvec += dB
            d_c += dC
            b_dth += dT
        else:
            zq = tl.dot(b_q, b_w1, input_precision="ieee")
            sq = tl.sigmoid(zq)
            b_dw2 += tl.dot(tl.trans(zq * sq), b_dy, input_precision="ieee")
            d_zq = tl.dot(b_dy, tl.trans(b_w2), input_precision="ieee") * sq * (1.0 + zq * (1.0 - sq))
            b_dw1 += tl.dot(tl.trans(b_q), d_zq, input_precision="ieee")
            b_dq = b_dy + tl.dot(d_zq, tl.trans(b_w1), input_precision="ieee")
        # the key side: delta1 = g * silu'(z), g = delta2 W2^T, delta2 = 2 (k + h W2 - v), h = silu(z), z = k W1
        d_g = d_delta1 * sp
        d_z = d_delta1 * g * sg * (1.0 - sg) * (2.0 + z * (1.0 - 2.0 * sg))
        d_delta2 += tl.dot(d_g, b_w2, input_precision="ieee")
        b_dw2 += tl.dot(tl.trans(d_g), delta2, input_precision="ieee")
        d_o = 2.0 * d_delta2
        b_dk += d_o
        d_h += tl.dot(d_o, tl.trans(b_w2), input_precision="ieee")
        b_dw2 += tl.dot(tl.trans(h), d_o, input_precision="ieee")
        d_z += d_h * sp
        b_dk += tl.dot(d_z, tl.trans(b_w1), input_precision="ieee")
        b_dw1 += tl.dot(tl.trans(b_k), d_z, input_precision="ieee")
        b_deta, b_dal = _gate_grads(d_c, d_de, d_bvec, d_big_a, de, d_a, d_e, big_a, exp_le, e_end, b_eta, b_al,
                                    m_t, last, tri, BT)
        p_o = (i_b.to(tl.int64) * T + (t0 + o_c).to(tl.int64))[:, None] * H * D + i_h * D + tl.arange(0, BD)[None, :]
        tl.store(dq + p_o, b_dq, mask=m_td)
        tl.store(dk + p_o, b_dk, mask=m_td)
        tl.store(dv + p_o, -d_o, mask=m_td)
        tl.store(dtheta + p_g, b_dth, mask=m_t)
        tl.store(deta + p_g, b_deta, mask=m_t)
        tl.store(dalpha + p_g, b_dal, mask=m_t)
        b_dm1, b_ds1, b_dm2, b_ds2 = new_dm1, new_ds1, new_dm2, new_ds2
        if HAS_RESET:  # the piece started from init and zero momentum
            r = tl.load(reset + i_b.to(tl.int64) * T + t0) != 0
            b_di1 += tl.where(r, b_dw1 + b_dm1, 0.0)
            b_di2 += tl.where(r, b_dw2 + b_dm2, 0.0)
            b_dw1 = tl.where(r, 0.0, b_dw1)
            b_dm1 = tl.where(r, 0.0, b_dm1)
            b_ds1 = tl.where(r, 0.0, b_ds1)
            b_dw2 = tl.where(r, 0.0, b_dw2)
            b_dm2 = tl.where(r, 0.0, b_dm2)
            b_ds2 = tl.where(r, 0.0, b_ds2)
    tl.store(dw1_in + base + p1, b_dw1, mask=m1)
    tl.store(dm1_in + base + p1, b_dm1, mask=m1)
    tl.store(ds1_in + base + p1, b_ds1, mask=m1)
    tl.store(dw2_in + base + p2, b_dw2, mask=m2)
    tl.store(dm2_in + base + p2, b_dm2, mask=m2)
    tl.store(ds2_in + base + p2, b_ds2, mask=m2)
    tl.store(dinit1 + base + p1, b_di1, mask=m1)
    tl.store(dinit2 + base + p2, b_di2, mask=m2)


def mlp_fwd(q, k, v, theta, eta, alpha, states, inits, meta, store_ckpt):
    """Launcher: ``y [B, T, H, D]`` fp32, the final (w1, m1, s1, w2, m2, s2) fp32 and the checkpoints."""
    b, t, h, d = q.shape
    e = inits[0].shape[-1]
    reset, done, starts, n_pieces, p_max, per_token, bt = meta
    q, k, v, (s_b, s_t, s_h) = _strides(q, k, v)
    bd, be = (max(16, triton.next_power_of_2(x)) for x in (d, e))
    y = _new((b, t, h, d), torch.float32, q.device)
    outs = [_new((b, h) + (shape), torch.float32, q.device) for shape in [(d, e)] * 3 + [(e, d)] * 3]
    ckpt = _new((b, h, p_max, 6, d * e), torch.float32, q.device) if store_ckpt else None
    _titans_mlp_fwd_kernel[(b * h,)](
        q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, *inits, *states, y, *outs, ckpt, t, p_max,
        s_b, s_t, s_h, H=h, D=d, E=e, BT=bt, BD=bd, BE=be, PER_TOKEN=per_token, HAS_RESET=reset is not None,
        STORE_CKPT=store_ckpt, num_warps=NUM_WARPS)
    return y, outs, ckpt


def mlp_bwd(q, k, v, theta, eta, alpha, ckpt, e, meta, dy, dstates_t):
    """Launcher: gradients of q, k, v, theta, eta, alpha, of the incoming six state tensors and
    of the two init tensors (summed over the batch in a fixed order)."""
    b, t, h, d = q.shape
    reset, done, starts, n_pieces, p_max, per_token, bt = meta
    q, k, v, (s_b, s_t, s_h) = _strides(q, k, v)
    bd, be = (max(16, triton.next_power_of_2(x)) for x in (d, e))
    shapes = [(b, h, d, e)] * 3 + [(b, h, e, d)] * 3
    finals = [torch.zeros(s, device=q.device) if g is None else g.float().contiguous() for s, g in zip(shapes, dstates_t)]
    dy = torch.zeros(b, t, h, d, device=q.device) if dy is None else dy.float().contiguous()
    dq, dk, dv = (_new((b, t, h, d), torch.float32, q.device) for _ in range(3))
    dgates = [_new((b, t, h), torch.float32, q.device) for _ in range(3)]
    dstates = [_new(s, torch.float32, q.device) for s in shapes]
    dinits = [_new(shapes[0], torch.float32, q.device), _new(shapes[3], torch.float32, q.device)]
    _titans_mlp_bwd_kernel[(b * h,)](
        q, k, v, theta, eta, alpha, reset, done, starts, n_pieces, ckpt, dy, *finals, dq, dk, dv, *dgates,
        *dstates, *dinits, t, p_max, s_b, s_t, s_h, H=h, D=d, E=e, BT=bt, BD=bd, BE=be,
        PER_TOKEN=per_token, HAS_RESET=reset is not None, num_warps=NUM_WARPS)
    return [dq, dk, dv, *dgates, *dstates, dinits[0].sum(0), dinits[1].sum(0)]


class MLPMemoryScan(torch.autograd.Function):
    """Differentiable in q, k, v, the gates, the six incoming state tensors (w0, m, s of each
    layer) and both init tensors; ``meta`` is constant."""

    @staticmethod
    def forward(ctx, q, k, v, theta, eta, alpha, w1, m1, s1, w2, m2, s2, init1, init2, meta):  # type: ignore[override]
        y, outs, ckpt = mlp_fwd(q, k, v, theta, eta, alpha, (w1, m1, s1, w2, m2, s2), (init1, init2), meta, True)
        ctx.save_for_backward(q, k, v, theta, eta, alpha, ckpt)
        ctx.meta, ctx.e = meta, init1.shape[-1]
        ctx.dtypes = [x.dtype for x in (q, k, v, theta, eta, alpha, w1, m1, s1, w2, m2, s2, init1, init2)]
        return y, *outs

    @staticmethod
    def backward(ctx, dy, *dstates):  # type: ignore[override]
        q, k, v, theta, eta, alpha, ckpt = ctx.saved_tensors
        grads = mlp_bwd(q, k, v, theta, eta, alpha, ckpt, ctx.e, ctx.meta, dy, dstates)
        return *(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None
