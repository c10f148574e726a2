"""Barlow Twins' defining properties: the cross-correlation of batch-standardised embeddings, driven to the
identity (on-diagonal (1 − C_ii)², off-diagonal λ·C_ij²), its 8192-wide projector and λ."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import BarlowTwinsLoss

from bench.augment import Views
from bench.methods import build_method, parse_method
from bench.methods.barlowtwins import barlow_twins_loss, cross_correlation
from tests.conftest import tiny_backbone, tiny_context


def make(text: str = "barlowtwins:proj_dim=32"):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone)).train()


def test_defaults_and_projector():
    spec = parse_method("barlowtwins")
    assert spec.cfg == {"lambda": 0.0051, "proj_dim": 8192} and spec.cls.recipe == "byol"
    method = make("barlowtwins:proj_dim=64")
    linears = [(m.in_features, m.out_features) for m in method.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(512, 64), (64, 64), (64, 64)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in method.projector.modules()) == 2


def test_loss_by_hand():
    """N = 2, d = 2: each dimension standardises to (±1); C = [[1, −1], [1, −1]] → L = 0 + 4 + λ·(1 + 1)."""
    z1 = torch.tensor([[1.0, 3.0], [-1.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    lam = 0.0051
    # batch-norm eps 1e-5: the standardised values are ±1/√(1 + 1e-5) for variance 1 and ±1/√(1 + 4e-5) for 0.25
    a, b = 1 / math.sqrt(1 + 1e-5), 1 / math.sqrt(1 + 4e-5)
    c = [[a * a, -a * b], [a * a, -a * b]]
    expected = (1 - c[0][0]) ** 2 + (1 - c[1][1]) ** 2 + lam * (c[0][1] ** 2 + c[1][0] ** 2)
    assert barlow_twins_loss(z1, z2, lam).item() == pytest.approx(expected, rel=1e-5)
    assert BarlowTwinsLoss(lam)(z1, z2).item() == pytest.approx(expected, rel=1e-5)  # lightly's agrees
    torch.testing.assert_close(cross_correlation(z1, z2), torch.tensor(c))


def test_gram_form_equals_lightlys_loss():
    g = torch.Generator().manual_seed(0)
    for n, d in ((3, 5), (8, 64), (16, 300)):
        z1, z2 = 2 * torch.randn(n, d, generator=g) + 1, torch.randn(n, d, generator=g)
        assert barlow_twins_loss(z1, z2, 0.0051).item() == pytest.approx(BarlowTwinsLoss(0.0051)(z1, z2).item(),
                                                                         rel=1e-5)


def test_training_step_and_perfect_twins():
    torch.manual_seed(0)
    method = make()
    g = torch.Generator().manual_seed(0)
    box, flip = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(8, 1), torch.zeros(8, dtype=torch.bool)
    x = torch.randn(8, 3, 64, 64, generator=g)
    views = Views(x, torch.randn(8, 3, 64, 64, generator=g), box, box, flip, flip, torch.arange(8))
    loss, logs = method.training_step(views, 0)
    with torch.no_grad():
        z1 = method.projector(method.backbone(views.x1)[-1].mean((2, 3)))
        z2 = method.projector(method.backbone(views.x2)[-1].mean((2, 3)))
        c = cross_correlation(z1, z2)
        off = c - torch.diag(torch.diagonal(c))
        expected = ((1 - torch.diagonal(c)) ** 2).sum() + 0.0051 * (off**2).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["loss_invariance"].item() == pytest.approx(((1 - torch.diagonal(c)) ** 2).sum().item(), rel=1e-4)
    # identical views: the diagonal is exactly 1, the invariance term vanishes
    same = Views(x, x.clone(), box, box, flip, flip, torch.arange(8))
    assert method.training_step(same, 1)[1]["loss_invariance"].item() == pytest.approx(0.0, abs=1e-3)
