"""Parameter counts, FLOPs and memory against hand-written formulas."""

from __future__ import annotations

import math

import pytest

from pretrain.models import build_model, count_parameters, flops_per_token, memory_estimate


def _hand_counts(d, h, kv, hd, hidden, di, n, k, r):
    """Parameters of one attention mixer, one Mamba mixer and one SwiGLU."""
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mamba = d * 2 * di + (di * k + di) + di * (r + 2 * n) + (r * di + di) + di * n + di + di * d
    mlp = 3 * d * hidden
    return attn, mamba, mlp


@pytest.mark.parametrize("tie", [True, False])
def test_count_parameters_by_hand(make_cfg, tie):
    # 'mamba:none swa attn' x 2: two Mamba blocks without FFN, four attention blocks with one
    cfg = make_cfg("mamba:none swa attn", n_layers=6, tie_embeddings=tie)
    d, v = 32, 61
    attn, mamba, mlp = _hand_counts(d, 4, 2, 8, 48, 64, 4, 4, math.ceil(32 / 16))
    norms = (2 * 1 + 4 * 2) * d + d  # 1 norm per FFN-less block, 2 per other block, final norm
    embedding = v * d * (1 if tie else 2)
    expected = {
        "total": embedding + 2 * mamba + 4 * attn + 4 * mlp + norms,
        "embedding": embedding,
        "non_embedding": 2 * mamba + 4 * attn + 4 * mlp + norms,
        "norm": norms,
        "mixer.mamba": 2 * mamba,
        "mixer.swa": 2 * attn,
        "mixer.attn": 2 * attn,
        "ffn.mlp": 4 * mlp,
        "ffn.none": 0,
    }
    assert count_parameters(cfg) == expected
    assert count_parameters(build_model(cfg)) == expected


def test_flops_per_token_by_hand(make_cfg):
    cfg = make_cfg("mamba swa attn")  # window 4
    t = 10
    attn, mamba, mlp = _hand_counts(32, 4, 2, 8, 48, 64, 4, 4, 2)
    biases_and_ssm = 64 + 64 + 64 * 4 + 64  # conv bias, dt bias, A_log, D: not matmul weights
    matmul = 2 * attn + (mamba - biases_and_ssm) + 3 * mlp + 61 * 32
    swa_keys = (4 * 5 / 2 + (t - 4) * 4) / t  # 1, 2, 3, 4, 4, ...
    full_keys = (t + 1) / 2
    f = flops_per_token(cfg, t)
    assert f["matmul_params"] == matmul
    assert f["dense"] == 6 * matmul
    assert f["attention"] == pytest.approx(12 * 4 * 8 * (swa_keys + full_keys))
    assert f["scan"] == 21 * 64 * 4
    assert f["total"] == pytest.approx(f["dense"] + f["attention"] + f["scan"])


def test_memory_estimate_shapes(make_cfg):
    cfg = make_cfg()
    total = count_parameters(cfg)["total"]
    m1, m4 = memory_estimate(cfg, 2, 16), memory_estimate(cfg, 2, 16, dp=4)
    assert m1["params"] == 4 * total and m1["optimizer"] == 8 * total
    assert m4["grads"] == m1["grads"] / 4
    assert m1["activations"] == sum(m1["activations_by_type"].values()) > 0
    assert {"mixer.mamba", "mixer.swa", "mixer.attn", "ffn.mlp", "norm", "head"} <= set(m1["activations_by_type"])
    assert m1["total"] == pytest.approx(m1["params"] + m1["grads"] + m1["optimizer"] + m1["activations"])
    assert memory_estimate(cfg, 4, 16)["activations"] == pytest.approx(2 * m1["activations"])
