"""VICReg's defining properties: invariance (MSE) + variance hinge on the per-dimension std + off-diagonal
covariance, weighted 25/25/1, on an 8192-wide expander."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import VICRegLoss
from lightly.loss.vicreg_loss import covariance_loss

from bench.augment import Views
from bench.methods import build_method, parse_method
from bench.methods.vicreg import covariance_term, vicreg_terms
from tests.conftest import tiny_backbone, tiny_context


def make(text: str = "vicreg:proj_dim=32"):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone)).train()


def test_defaults():
    spec = parse_method("vicreg")
    assert spec.cfg == {"inv": 25.0, "var": 25.0, "cov": 1.0, "proj_dim": 8192} and spec.cls.recipe == "byol"
    method = make("vicreg:proj_dim=48")
    linears = [(m.in_features, m.out_features) for m in method.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(512, 48), (48, 48), (48, 48)]


def test_loss_by_hand():
    """Z = [[0, 0], [2, 2]], Z′ = [[0, 0], [0.5, 0.5]] (N = 2, d = 2, unbiased variances)."""
    z1 = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    z2 = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    invariance = (1.5**2 + 1.5**2) / 4  # mean squared difference over N·d entries
    v1 = 0.0  # std √(2 + 1e-4) > 1
    v2 = 1 - math.sqrt(0.125 + 1e-4)  # per dimension, both dimensions alike
    c1 = (2.0**2 + 2.0**2) / 2  # off-diagonal covariance 2 (twice), squared, / d
    c2 = (0.125**2 + 0.125**2) / 2
    expected = 25 * invariance + 25 * (v1 + v2) / 2 + 1 * (c1 + c2)
    terms = vicreg_terms(z1, z2)
    total = 25 * terms["loss_invariance"] + 25 * terms["loss_variance"] + terms["loss_covariance"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert VICRegLoss()(z1, z2).item() == pytest.approx(expected, rel=1e-5)  # lightly's agrees


def test_gram_covariance_equals_lightlys():
    g = torch.Generator().manual_seed(0)
    for n, d in ((2, 3), (5, 64), (16, 257)):
        x = 3 * torch.randn(n, d, generator=g) + 1
        assert covariance_term(x).item() == pytest.approx(covariance_loss(x).item(), rel=1e-4)
    z1, z2 = torch.randn(8, 100, generator=g), torch.randn(8, 100, generator=g)
    terms = vicreg_terms(z1, z2)
    total = 25 * terms["loss_invariance"] + 25 * terms["loss_variance"] + terms["loss_covariance"]
    assert total.item() == pytest.approx(VICRegLoss()(z1, z2).item(), rel=1e-5)


def test_training_step_logs_the_terms():
    torch.manual_seed(0)
    method = make()
    g = torch.Generator().manual_seed(0)
    box, flip = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(6, 1), torch.zeros(6, dtype=torch.bool)
    views = Views(torch.randn(6, 3, 64, 64, generator=g), torch.randn(6, 3, 64, 64, generator=g), box, box, flip, flip,
                  torch.arange(6))
    loss, logs = method.training_step(views, 0)
    combined = 25 * logs["loss_invariance"] + 25 * logs["loss_variance"] + logs["loss_covariance"]
    assert loss.item() == pytest.approx(combined.item(), rel=1e-4)
    with torch.no_grad():
        z1 = method.projector(method.backbone(views.x1)[-1].mean((2, 3)))
        z2 = method.projector(method.backbone(views.x2)[-1].mean((2, 3)))
    assert logs["loss_invariance"].item() == pytest.approx(((z1 - z2) ** 2).mean().item(), rel=1e-4)
