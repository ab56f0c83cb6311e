"""The model's loss path (``model(ids, labels=...)``: the head fused with the cross-entropy, no
logits) against the materialised logits and F.cross_entropy: the loss, the z-loss in the
auxiliary outputs, and the gradient of every parameter, with a tied and an untied head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.hybrid import HybridLM

VOCAB = 97


def _model(tie: bool, z_loss_coef: float) -> HybridLM:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, tie_embeddings=tie, z_loss_coef=z_loss_coef,
                      layer_pattern="swa")
    cfg.attention.n_heads = 2
    cfg.attention.window = 4
    torch.manual_seed(0)
    return HybridLM(cfg)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_fused_loss_equals_materialised_logits(tie, z_loss_coef):
    model = _model(tie, z_loss_coef)
    gen = torch.Generator().manual_seed(1)
    ids, labels = (torch.randint(0, VOCAB, (2, 11), generator=gen) for _ in range(2))
    labels[0, 3] = -100
    pos = torch.cat([torch.arange(5), torch.arange(6)]).repeat(2, 1)

    logits = model(ids, position_ids=pos)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    lse = torch.logsumexp(logits, dim=-1)[labels != -100]
    z = z_loss_coef * lse.square().mean()
    want = torch.autograd.grad(ce + z, list(model.parameters()))

    loss, aux = model(ids, position_ids=pos, labels=labels, return_aux=True)
    torch.testing.assert_close(loss, ce, rtol=1e-6, atol=1e-6)  # the value logged: the cross-entropy
    if z_loss_coef:
        torch.testing.assert_close(aux["metric/z_loss"], z, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(aux["aux_loss"], z, rtol=1e-6, atol=1e-7)
        assert not aux["aux_loss"].requires_grad  # its gradient travels with the loss
    else:
        assert aux == {}
    total = loss + aux.get("aux_loss", 0.0)
    got = torch.autograd.grad(total, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
