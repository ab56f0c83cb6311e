"""Mamba-2: chunked SSD against the per-token recurrence, and the 'mamba2' mixer in a HybridLM
(decoding parity, packed documents, init, weight decay, a short training run)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import Mamba2Config, load_config
from pretrain.models import build_model, count_parameters
from pretrain.models.layers.mamba2 import Mamba2
from kernels.ssd.chunk_torch import segsum, ssd_chunked, ssd_step
from pretrain.train.optim import param_groups
from tests.conftest import ROOT, losses, tiny_overrides
from tests.models.util import assert_scan_matches, decode as _decode

CHUNK = 4
T = 13  # several chunks, not a multiple of CHUNK


def naive_ssd(x, dt, A, B, C, D=None, h0=None, reset=None):
    """The recurrence token by token, differentiated by autograd. x [B, T, H, P], B/C [B, T, G, N]."""
    b, t, h, p = x.shape
    k = h // B.shape[2]
    state = x.new_zeros(b, h, p, B.shape[-1]) if h0 is None else h0
    ys = []
    for i in range(t):
        decay = torch.exp(dt[:, i] * A)  # [B, H]
        if reset is not None:
            decay = torch.where(reset[:, i, None], torch.zeros_like(decay), decay)
        Bi = B[:, i].repeat_interleave(k, dim=1)  # [B, H, N]
        Ci = C[:, i].repeat_interleave(k, dim=1)
        state = decay[..., None, None] * state + (dt[:, i, :, None] * x[:, i])[..., None] * Bi[:, :, None, :]
        y = (state * Ci[:, :, None, :]).sum(-1)
        ys.append(y if D is None else y + D[:, None] * x[:, i])
    return torch.stack(ys, dim=1), state


def _inputs(b, t, h, p, g, n, with_h0, with_reset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, t, h, generator=gen) - 1)
    A = -torch.exp(torch.randn(h, generator=gen))
    B, C = torch.randn(b, t, g, n, generator=gen), torch.randn(b, t, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    h0 = torch.randn(b, h, p, n, generator=gen) if with_h0 else None
    reset = torch.rand(b, t, generator=gen) < 0.25 if with_reset else None
    return [x, dt, A, B, C, D, h0], reset


def test_segsum_is_sums_of_segments_without_nan():
    a = torch.tensor([0.5, -1.0, float("-inf"), 2.0])
    s = segsum(a)
    for i in range(4):
        for j in range(4):
            want = a[j + 1 : i + 1].sum() if j <= i else float("-inf")
            assert s[i, j] == want, (i, j)
    assert not s.isnan().any()


@pytest.mark.parametrize("t", [1, 3, CHUNK, 2 * CHUNK + 3])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_chunked_matches_naive(t, with_h0, with_reset, groups, nan_poison):
    tensors, reset = _inputs(2, t, 4, 3, groups, 5, with_h0, with_reset)
    leaves = [z.requires_grad_() if z is not None else None for z in tensors]
    y, h = ssd_chunked(*leaves, reset=reset, chunk_size=CHUNK)
    y_ref, h_ref = naive_ssd(*leaves, reset=reset)
    assert_scan_matches(y, h, y_ref, h_ref, leaves)


def test_ssd_without_skip_and_with_resets_at_chunk_edges():
    (x, dt, A, B, C, _, h0), _ = _inputs(1, 12, 2, 3, 1, 4, with_h0=True, with_reset=False)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    reset[0, [0, 4, 5, 11]] = True  # first token, a chunk start, back to back, the last token
    y, h = ssd_chunked(x, dt, A, B, C, h0=h0, reset=reset, chunk_size=CHUNK)
    y_ref, h_ref = naive_ssd(x, dt, A, B, C, h0=h0, reset=reset)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    y_tail, _ = ssd_chunked(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:], chunk_size=CHUNK)
    torch.testing.assert_close(y[:, 5:11], y_tail[:, :6], rtol=1e-5, atol=1e-5)


def test_ssd_step_is_one_step_of_the_recurrence():
    (x, dt, A, B, C, D, h0), _ = _inputs(3, 1, 4, 3, 2, 5, with_h0=True, with_reset=False, seed=1)
    reset = torch.tensor([[True], [False], [False]])
    y, h = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, reset=reset[:, 0])
    y_ref, h_ref = naive_ssd(x, dt, A, B, C, D, h0, reset)
    torch.testing.assert_close(y, y_ref[:, 0])
    torch.testing.assert_close(h, h_ref)


def test_ssd_rejects_bad_shapes():
    (x, dt, A, B, C, D, _), _ = _inputs(2, 4, 4, 3, 2, 5, False, False)
    with pytest.raises(ValueError, match="B"):
        ssd_chunked(x, dt, A, B[:, :3], C, D)
    with pytest.raises(ValueError, match="G dividing"):
        ssd_chunked(x, dt, A, torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5), D)
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(x, dt[:, :, :2], A, B, C, D)


# ------------------------------------------------------------------------------ the mixer

M2 = dict(d_state=8, d_conv=4, expand=2, head_dim=16, n_groups=2, chunk_size=CHUNK)  # 4 heads of 16


def _cfg(make_cfg, pattern, **kw):
    return make_cfg(pattern, mamba2=Mamba2Config(**M2), init_std=0.2, **kw)


@pytest.mark.parametrize("pattern", ["mamba2", "mamba2 swa"])
def test_decoding_parity(make_cfg, pattern, rel_err):
    cfg = _cfg(make_cfg, pattern, n_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids)
        for chunks in ([1] * T, [3, 1, 5, 1, 3], [2, 11]):
            assert rel_err(_decode(model, ids, chunks), full) <= 1e-4, chunks


def test_decoding_parity_with_document_starts(make_cfg, rel_err):
    cfg = _cfg(make_cfg, "mamba2 swa", n_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    positions = torch.stack([torch.cat([torch.arange(a), torch.arange(T - a)]) for a in (6, 2)])
    with torch.no_grad():
        full = model(ids, positions)
        for chunks in ([1] * T, [5, 1, 3, 4]):
            assert rel_err(_decode(model, ids, chunks, positions), full) <= 1e-4, chunks


def test_packed_equals_separate(make_cfg):
    cfg = _cfg(make_cfg, "mamba2", n_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    lengths = [[5, 11], [3, 6, 7]]  # docs shorter than d_conv, across chunk edges
    g = torch.Generator().manual_seed(0)
    docs = [[torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        packed = model(ids, positions)
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = model(doc[None])[0]
                got = packed[b, start : start + len(doc)]
                assert (got - alone).abs().max() <= 1e-5 * max(1.0, alone.abs().max().item())
                start += len(doc)
        cfg.doc_masking = False  # sanity: without resets the later documents see their predecessors
        assert (model(ids, positions)[1, 3:] - packed[1, 3:]).abs().max() > 1e-3


def test_gated_norm_and_layout_follow_mamba_ssm(make_cfg):
    cfg = _cfg(make_cfg, "mamba2", n_layers=1)
    torch.manual_seed(0)
    mixer = build_model(cfg).blocks["0"].mixer
    assert isinstance(mixer, Mamba2)
    d_inner, gn, h = 64, 2 * 8, 4
    # mamba_ssm's fused in_proj [z, x, B, C, dt] and conv over [x, B, C], one module per segment
    rows = {"z": d_inner, "x": d_inner, "B": gn, "C": gn, "dt": h}
    assert {k: getattr(mixer, f"in_proj_{k}").weight.shape for k in rows} == {k: (n, 32) for k, n in rows.items()}
    assert {k: getattr(mixer, f"conv1d_{k}").weight.shape for k in "xBC"} == {k: (rows[k], 1, 4) for k in "xBC"}
    x, z = torch.randn(2, 3, d_inner), torch.randn(2, 3, d_inner)
    mixer.norm.weight.data.uniform_(0.5, 1.5)
    gated = (x * z * torch.sigmoid(z)).view(2, 3, 2, d_inner // 2)  # two groups of 32
    want = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    torch.testing.assert_close(mixer.norm(x, z), want.view(2, 3, d_inner) * mixer.norm.weight)


def test_init_and_weight_decay_exemptions(make_cfg):
    cfg = _cfg(make_cfg, "mamba2", n_layers=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    mixer = model.blocks["0"].mixer
    A = mixer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all() and A.std() > 0
    dt = F.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert (mixer.D == 1).all()
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    for name in ("A_log", "dt_bias", "D", "conv1d_x.bias", "conv1d_B.bias", "norm.weight"):
        assert id(mixer.get_parameter(name)) in no_decay, name
    for name in ("in_proj_x.weight", "in_proj_B.weight", "out_proj.weight"):
        assert id(mixer.get_parameter(name)) not in no_decay, name


def test_meta_build_then_init_reproduces_seeded_build(make_cfg):
    cfg = _cfg(make_cfg, "mamba2 swa", n_layers=2)
    torch.manual_seed(7)
    ref = build_model(cfg).state_dict()
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    model.init_weights()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, ref[name], rtol=0, atol=0, msg=name)


def test_every_parameter_gets_a_finite_gradient_with_resets(make_cfg):
    cfg = _cfg(make_cfg, "mamba2", n_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    positions = torch.tensor([[0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5], list(range(11))])
    logits = model(ids, positions)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_paper_config_parameter_count():
    cfg = load_config(ROOT / "configs" / "mamba2_370m.toml", [])
    total = count_parameters(cfg.model)["total"]
    assert math.isclose(total, 370e6, rel_tol=0.05), total


def test_tiny_config_trains(small_corpus, prepared_dir, tmp_path):
    from pretrain.train.trainer import train

    overrides = tiny_overrides(
        small_corpus, prepared_dir, tmp_path,
        **{
            "model.layer_pattern": "'mamba2:none'",
            "model.mamba2.d_state": 8,
            "model.mamba2.head_dim": 16,
            "model.mamba2.chunk_size": 8,
            "train.max_steps": 6,
            "checkpoint.interval": 0,
            "optim.lr": 1e-2,  # a clear drop within 6 steps for this 2-block model
        },
    )
    train(load_config(None, overrides))
    got = [loss for _, loss in losses(tmp_path)]
    assert sum(got[-2:]) / 2 < got[0], got
